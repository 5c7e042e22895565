// Python binding of llmc's int8-activation CPU kernels: the kernel-layout weight (KernelWeight),
// run-time ISA dispatch and the matmul entry point used by the torch target.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "qk_common.h"

namespace llmc_qk {
namespace {

struct Isa {
  std::string name;
  GemmFn gemm;
  QuantizeFn quantize;
};

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("avx512dq");
}

std::vector<Isa> supported_isas() {  // best first
  std::vector<Isa> out;
  if (cpu_has_avx512()) out.push_back({"avx512", gemm_avx512, quantize_avx512});
  if (cpu_has_avx2()) out.push_back({"avx2", gemm_avx2, quantize_avx2});
  out.push_back({"scalar", gemm_scalar, quantize_scalar});
  return out;
}

const Isa& find_isa(const std::string& name) {
  static const std::vector<Isa> isas = supported_isas();
  if (name.empty()) return isas.front();
  for (const auto& isa : isas)
    if (isa.name == name) return isa;
  std::string have;
  for (const auto& isa : isas) have += (have.empty() ? "" : ", ") + isa.name;
  throw std::invalid_argument("CPU kernel path '" + name + "' is not available on this CPU (it has: " + have + ")");
}

std::string& selected_isa() {
  static std::string name = [] {
    const char* env = std::getenv("LLMC_CPU_ISA");
    return std::string(env ? env : "");
  }();
  return name;
}

}  // namespace

// A quantized [out, in] weight in the kernel layout (qk_common.h), owning its tensors.
class KernelWeight {
 public:
  KernelWeight(const torch::Tensor& codes, const torch::Tensor& scales, const c10::optional<torch::Tensor>& offsets,
               int64_t group, int64_t zero, int64_t max_code) {
    TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kUInt8, "codes: uint8 [out, in]");
    TORCH_CHECK(scales.dim() == 2 && scales.size(0) == codes.size(0), "scales: [out, groups]");
    TORCH_CHECK(max_code >= 1 && max_code <= 255, "max_code must be in 1..255");
    TORCH_CHECK(group == 16 || (group > 0 && group % 32 == 0), "groups of 16 or a multiple of 32 inputs");
    out_ = codes.size(0);
    in_ = codes.size(1);
    TORCH_CHECK(out_ > 0 && in_ > 0, "empty weight");
    const int64_t groups = scales.size(1);
    TORCH_CHECK(groups == (in_ + group - 1) / group, "scales hold one column per group of inputs");
    const bool f16 = scales.scalar_type() == torch::kFloat16;
    auto sc = f16 ? scales.contiguous() : scales.to(torch::kFloat32).contiguous();
    torch::Tensor off;
    if (offsets.has_value() && offsets->defined()) {
      TORCH_CHECK(offsets->sizes() == scales.sizes(), "offsets must have the shape of the scales");
      off = f16 ? offsets->to(torch::kFloat16).contiguous() : offsets->to(torch::kFloat32).contiguous();
    }
    w_.out = out_;
    w_.tiles = (out_ + kRows - 1) / kRows;
    w_.blocks = (in_ + kBlock - 1) / kBlock;
    w_.code_bits = max_code <= 15 ? 4 : 8;
    w_.max_code = static_cast<int>(max_code);
    w_.sub16 = group == 16;
    w_.f16_scales = f16;
    w_.zero = static_cast<int>(zero);
    const auto cc = codes.contiguous();
    const uint8_t* src = cc.data_ptr<uint8_t>();
    const int64_t cb = w_.code_bytes_per_block();
    codes_ = torch::zeros({w_.tiles * w_.blocks * cb}, torch::kUInt8);
    uint8_t* dst = codes_.data_ptr<uint8_t>();
    for (int64_t row = 0; row < out_; ++row) {
      const int64_t t = row / kRows, r = row % kRows;
      for (int64_t k = 0; k < in_; ++k) {
        const int u = src[row * in_ + k];
        TORCH_CHECK(u <= max_code, "code ", u, " above max_code ", max_code);
        const int64_t b = k / kBlock, kk = k % kBlock;
        uint8_t* block = dst + (t * w_.blocks + b) * cb;
        if (w_.code_bits == 8) {
          block[(kk >> 2) * 64 + r * 4 + (kk & 3)] = static_cast<uint8_t>(u);
        } else {
          const int64_t k16 = kk & 15;
          block[(k16 >> 2) * 64 + r * 4 + (k16 & 3)] |= static_cast<uint8_t>(kk < 16 ? u : u << 4);
        }
      }
    }
    const int nsub = w_.nsub();
    const auto options = f16 ? torch::kFloat16 : torch::kFloat32;
    scales_ = torch::zeros({w_.tiles * w_.blocks * nsub * kRows}, options);
    if (off.defined()) offsets_ = torch::zeros_like(scales_);
    const int64_t esz = f16 ? 2 : 4;
    const char* ssrc = static_cast<const char*>(sc.data_ptr());
    const char* osrc = off.defined() ? static_cast<const char*>(off.data_ptr()) : nullptr;
    char* sdst = static_cast<char*>(scales_.data_ptr());
    char* odst = off.defined() ? static_cast<char*>(offsets_.data_ptr()) : nullptr;
    for (int64_t row = 0; row < out_; ++row) {
      const int64_t t = row / kRows, r = row % kRows;
      for (int64_t b = 0; b < w_.blocks; ++b) {
        for (int h = 0; h < nsub; ++h) {
          const int64_t first = b * kBlock + h * 16;
          if (first >= in_) continue;
          const int64_t g = first / group;
          const int64_t di = ((t * w_.blocks + b) * nsub + h) * kRows + r;
          std::memcpy(sdst + di * esz, ssrc + (row * groups + g) * esz, esz);
          if (odst) std::memcpy(odst + di * esz, osrc + (row * groups + g) * esz, esz);
        }
      }
    }
    w_.codes = codes_.data_ptr<uint8_t>();
    w_.scales = scales_.data_ptr();
    w_.offsets = offsets_.defined() ? offsets_.data_ptr() : nullptr;
  }

  torch::Tensor linear(const torch::Tensor& x, const std::string& isa_name) const {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32, "x: float32 on CPU");
    TORCH_CHECK(x.size(-1) == in_, "x has ", x.size(-1), " features, the weight ", in_);
    const Isa& isa = find_isa(isa_name.empty() ? selected_isa() : isa_name);
    auto x2 = x.reshape({-1, in_}).contiguous();
    const int64_t cols = x2.size(0);
    auto sizes = x.sizes().vec();
    sizes.back() = out_;
    auto y = torch::empty(sizes, x.options());
    if (cols == 0) return y;
    std::vector<int8_t> q(static_cast<size_t>(cols * w_.blocks * kBlock));
    std::vector<ActMeta> meta(static_cast<size_t>(cols * w_.blocks));
    const float* xp = x2.data_ptr<float>();
    const int64_t in = in_, blocks = w_.blocks;
    at::parallel_for(0, cols, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, in)), [&](int64_t c0, int64_t c1) {
      isa.quantize(xp, in, in, c0, c1, blocks, q.data(), meta.data());
    });
    const QAct act{q.data(), meta.data(), cols, blocks};
    float* yp = y.data_ptr<float>();
    const int64_t work_per_tile = std::max<int64_t>(1, w_.blocks * cols);
    const int64_t grain = std::max<int64_t>(1, 2048 / work_per_tile);
    at::parallel_for(0, w_.tiles, grain, [&](int64_t t0, int64_t t1) { isa.gemm(w_, act, t0, t1, yp, out_); });
    return y;
  }

  torch::Tensor rows(const torch::Tensor& ids) const {
    auto idx = ids.to(torch::kInt64).contiguous();
    const int64_t n = idx.numel();
    auto y = torch::empty({n, in_}, torch::kFloat32);
    const int64_t* ip = idx.data_ptr<int64_t>();
    float* yp = y.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(ip[i] >= 0 && ip[i] < out_, "row ", ip[i], " out of range for ", out_, " rows");
      for (int64_t k = 0; k < in_; ++k) yp[i * in_ + k] = weight_value(w_, ip[i], k);
    }
    return y;
  }

  torch::Tensor dequantize() const {
    return rows(torch::arange(out_, torch::kInt64));
  }

  int64_t nbytes() const {
    int64_t total = codes_.numel() + scales_.numel() * scales_.element_size();
    if (offsets_.defined()) total += offsets_.numel() * offsets_.element_size();
    return total;
  }

  int64_t out_features() const { return out_; }
  int64_t in_features() const { return in_; }
  const QWeight& layout() const { return w_; }

 private:
  int64_t out_ = 0, in_ = 0;
  torch::Tensor codes_, scales_, offsets_;
  QWeight w_{};
};

std::vector<std::string> isa_names() {
  std::vector<std::string> out;
  for (const auto& isa : supported_isas()) out.push_back(isa.name);
  return out;
}

void set_isa(const std::string& name) {
  if (!name.empty()) find_isa(name);  // refuses a path this CPU lacks
  selected_isa() = name;
}

std::string current_isa() { return find_isa(selected_isa()).name; }

torch::Tensor quantize_activations(const torch::Tensor& x, const std::string& isa_name) {
  // Test hook: int8 values, and per block (d, sx, s) as float64 columns.
  auto x2 = x.to(torch::kFloat32).contiguous();
  TORCH_CHECK(x2.dim() == 2, "x: [rows, in]");
  const Isa& isa = find_isa(isa_name.empty() ? selected_isa() : isa_name);
  const int64_t cols = x2.size(0), in = x2.size(1), blocks = (in + kBlock - 1) / kBlock;
  auto q = torch::empty({cols, blocks * kBlock}, torch::kInt8);
  std::vector<ActMeta> meta(static_cast<size_t>(cols * blocks));
  isa.quantize(x2.data_ptr<float>(), in, in, 0, cols, blocks, q.data_ptr<int8_t>(), meta.data());
  auto m = torch::empty({cols, blocks, 2}, torch::kFloat64);
  auto mp = m.accessor<double, 3>();
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t b = 0; b < blocks; ++b) {
      mp[c][b][0] = meta[c * blocks + b].d;
      mp[c][b][1] = meta[c * blocks + b].s;
    }
  return torch::cat({q.to(torch::kFloat64).view({cols, blocks, kBlock}), m}, 2);
}

}  // namespace llmc_qk

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using llmc_qk::KernelWeight;
  namespace py = pybind11;
  py::class_<KernelWeight>(m, "KernelWeight")
      .def(py::init<const torch::Tensor&, const torch::Tensor&, const c10::optional<torch::Tensor>&, int64_t, int64_t,
                    int64_t>(),
           py::arg("codes"), py::arg("scales"), py::arg("offsets"), py::arg("group"), py::arg("zero"),
           py::arg("max_code"))
      .def("linear", &KernelWeight::linear, py::arg("x"), py::arg("isa") = "",
           py::call_guard<py::gil_scoped_release>())
      .def("rows", &KernelWeight::rows)
      .def("dequantize", &KernelWeight::dequantize)
      .def_property_readonly("nbytes", &KernelWeight::nbytes)
      .def_property_readonly("out_features", &KernelWeight::out_features)
      .def_property_readonly("in_features", &KernelWeight::in_features);
  m.def("isa_paths", &llmc_qk::isa_names, "kernel paths this CPU runs, best first");
  m.def("set_isa", &llmc_qk::set_isa, "force a kernel path ('' = the best)");
  m.def("current_isa", &llmc_qk::current_isa);
  m.def("quantize_activations", &llmc_qk::quantize_activations, py::arg("x"), py::arg("isa") = "");
}
