// Python binding of llmc's int8-activation CPU kernels: the kernel-layout weight (KernelWeight),
// run-time ISA dispatch and the matmul entry point used by the torch target.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "qk_common.h"
#include "qk_program.h"

namespace llmc_qk {
namespace {

struct Isa {
  std::string name;
  GemmFn gemm;
  QuantizeFn quantize;
  const OpsTable* ops;
};

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

bool cpu_has_avxvnni() {
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avxvnni");
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("avx512dq");
}

std::vector<Isa> supported_isas() {  // best first
  std::vector<Isa> out;
  if (cpu_has_avx512() && amx_enable()) out.push_back({"amx", gemm_amx, quantize_avx512, &ops_amx});
  if (cpu_has_avx512()) out.push_back({"avx512", gemm_avx512, quantize_avx512, &ops_avx512});
  if (cpu_has_avxvnni()) out.push_back({"avxvnni", gemm_avxvnni, quantize_avx2, &ops_avxvnni});
  if (cpu_has_avx2()) out.push_back({"avx2", gemm_avx2, quantize_avx2, &ops_avx2});
  out.push_back({"scalar", gemm_scalar, quantize_scalar, &ops_scalar});
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
    out_ = codes.size(0);
    in_ = codes.size(1);
    TORCH_CHECK(group == 16 || (group > 0 && (group % 32 == 0 || group >= in_)),
                "groups of 16, a multiple of 32 inputs, or one group per row");
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
    w_.code_bits = max_code <= 15 ? 4 : (max_code <= 31 ? 5 : (max_code <= 63 ? 6 : 8));
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
          continue;
        }
        const int64_t k16 = kk & 15;
        block[(k16 >> 2) * 64 + r * 4 + (k16 & 3)] |= static_cast<uint8_t>(kk < 16 ? (u & 15) : (u & 15) << 4);
        const int64_t bit = r * 4 + (k16 & 3), word = (kk >> 2);  // word j = the 8-bit layout's chunk j
        for (int p = 0; p < w_.code_bits - 4; ++p)
          if ((u >> (4 + p)) & 1) block[256 + p * 64 + word * 8 + bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
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
    const QAct act{q.data(), meta.data(), cols, blocks, new_act_id()};
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
      dequantize_row(w_, ip[i], in_, yp + i * in_);
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

torch::Tensor to_half_bits(const torch::Tensor& x, const std::string& isa_name) {
  // Test hook: x rounded to float16 as the KV cache stores it, as int16 bits.
  auto x1 = x.to(torch::kFloat32).contiguous().view({-1});
  const Isa& isa = find_isa(isa_name.empty() ? selected_isa() : isa_name);
  auto y = torch::empty({x1.numel()}, torch::kInt16);
  isa.ops->to_half(x1.data_ptr<float>(), reinterpret_cast<uint16_t*>(y.data_ptr<int16_t>()), x1.numel());
  return y;
}

}  // namespace llmc_qk

namespace llmc_qk {

// Python face of Program (qk_program.h); views are (buffer, first column, width) tuples.
class NativeProgram {
 public:
  using PyView = std::tuple<int64_t, int64_t, int64_t>;
  NativeProgram(int64_t layers, int64_t kv_heads, int64_t head_dim)
      : layers_(layers), kv_heads_(kv_heads), head_dim_(head_dim) {
    prog_.set_cache_shape(static_cast<int>(layers), static_cast<int>(kv_heads), static_cast<int>(head_dim));
  }
  int64_t buffer(int64_t width, bool output_rows) { return prog_.add_buffer(width, output_rows); }
  void embed(PyView dst, pybind11::object table) {
    Instr ins;
    ins.op = Op::kEmbed;
    ins.dst = view(dst);
    if (pybind11::isinstance<KernelWeight>(table)) {
      const KernelWeight& w = table.cast<const KernelWeight&>();
      TORCH_CHECK(w.in_features() == ins.dst.width, "embedding width");
      ins.weight = prog_.add_qweight(&w.layout());
      keep_.push_back(table);
      vocab_ = w.out_features();
    } else {
      auto t = table.cast<torch::Tensor>().to(torch::kFloat32).contiguous();
      TORCH_CHECK(t.dim() == 2 && t.size(1) == ins.dst.width, "embedding table [vocab, width]");
      ins.kind = 1;
      ins.weight = prog_.add_vector(std::vector<float>(t.data_ptr<float>(), t.data_ptr<float>() + t.numel()));
      vocab_ = t.size(0);
    }
    prog_.add(ins);
  }
  void rms_norm(PyView dst, pybind11::object dst1, PyView a, pybind11::object b, const torch::Tensor& w, double eps) {
    Instr ins;
    ins.op = b.is_none() ? Op::kRmsNorm : Op::kAddRmsNorm;
    ins.dst = view(dst);
    ins.a = view(a);
    if (!b.is_none()) {
      ins.b = view(b.cast<PyView>());
      ins.dst1 = view(dst1.cast<PyView>());
    }
    auto v = w.to(torch::kFloat32).contiguous();
    TORCH_CHECK(v.numel() == ins.a.width, "norm weight size");
    ins.weight = prog_.add_vector(std::vector<float>(v.data_ptr<float>(), v.data_ptr<float>() + v.numel()));
    ins.f = static_cast<float>(eps);
    prog_.add(ins);
  }
  void linear(PyView dst, PyView a, pybind11::object weight) {
    const KernelWeight& w = weight.cast<const KernelWeight&>();
    Instr ins;
    ins.op = Op::kLinear;
    ins.dst = view(dst);
    ins.a = view(a);
    TORCH_CHECK(ins.a.width == w.in_features() && ins.dst.width == w.out_features(), "linear shapes");
    ins.weight = prog_.add_qweight(&w.layout());
    keep_.push_back(weight);
    prog_.add(ins);
  }
  int64_t rope_table(const torch::Tensor& cos_t, const torch::Tensor& sin_t) {
    auto c = cos_t.to(torch::kFloat32).contiguous(), s = sin_t.to(torch::kFloat32).contiguous();
    TORCH_CHECK(c.dim() == 2 && c.sizes() == s.sizes(), "cos/sin tables [positions, rotary_dim / 2]");
    return prog_.add_rope_table(std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel()),
                                std::vector<float>(s.data_ptr<float>(), s.data_ptr<float>() + s.numel()),
                                c.size(1), c.size(0));
  }
  void rope(PyView dst, PyView a, int64_t heads, int64_t head_dim, int64_t rot, bool half, int64_t table) {
    Instr ins;
    ins.op = Op::kRope;
    ins.dst = view(dst);
    ins.a = view(a);
    set_heads(ins, heads, heads, head_dim, rot, half, table);
    prog_.add(ins);
  }
  void attention(PyView dst, PyView q, PyView k, PyView v, int64_t layer, int64_t heads, int64_t kv_heads,
                 int64_t head_dim, double scale, int64_t rope_table, int64_t rot, bool half) {
    Instr ins;
    ins.op = Op::kAttention;
    ins.dst = view(dst);
    ins.a = view(q);
    ins.b = view(k);
    ins.c = view(v);
    TORCH_CHECK(layer >= 0 && layer < layers_ && kv_heads == kv_heads_ && head_dim == head_dim_,
                "attention does not match the cache shape");
    TORCH_CHECK(heads % kv_heads == 0 && ins.a.width == heads * head_dim && ins.b.width == kv_heads * head_dim &&
                ins.c.width == kv_heads * head_dim && ins.dst.width == heads * head_dim, "attention shapes");
    ins.layer = static_cast<int32_t>(layer);
    ins.f = static_cast<float>(scale);
    set_heads(ins, heads, kv_heads, head_dim, rot, half, rope_table);
    prog_.add(ins);
  }
  void elementwise(PyView dst, PyView a, pybind11::object b, int64_t kind) {
    Instr ins;
    ins.op = Op::kElementwise;
    ins.dst = view(dst);
    ins.a = view(a);
    if (!b.is_none()) ins.b = view(b.cast<PyView>());
    ins.kind = static_cast<int32_t>(kind);
    prog_.add(ins);
  }
  void swiglu(PyView dst, PyView a) {
    Instr ins;
    ins.op = Op::kSwiglu;
    ins.dst = view(dst);
    ins.a = view(a);
    TORCH_CHECK(ins.a.width == 2 * ins.dst.width, "swiglu widths");
    prog_.add(ins);
  }
  void gather_rows(PyView dst, PyView a) {
    Instr ins;
    ins.op = Op::kGatherRows;
    ins.dst = view(dst);
    ins.a = view(a);
    prog_.add(ins);
  }
  void set_logits(PyView v) { prog_.set_logits(view(v)); }
  void set_profiling(bool on) { prog_.set_profiling(on); }
  // (op name, seconds) of every instruction, summed over the steps profiled.
  pybind11::list profile() const {
    static const char* names[] = {"embed", "rms_norm", "add_rms_norm", "linear", "rope", "attention",
                                  "elementwise", "swiglu", "gather_rows"};
    pybind11::list out;
    const auto& seconds = prog_.profile();
    for (size_t i = 0; i < seconds.size(); ++i) out.append(pybind11::make_tuple(names[prog_.op_of(i)], seconds[i]));
    return out;
  }

  torch::Tensor run(const torch::Tensor& token_ids, const torch::Tensor& query_lens, const torch::Tensor& ctx_lens,
                    const torch::Tensor& tables, const torch::Tensor& logits_rows, const torch::Tensor& k_cache,
                    const torch::Tensor& v_cache, int64_t block_size, int64_t threads, bool block_major,
                    const std::string& isa_name, const c10::optional<torch::Tensor>& out) {
    auto i64 = [](const torch::Tensor& t) { return t.to(torch::kInt64).contiguous(); };
    auto ids = i64(token_ids), ql = i64(query_lens), cl = i64(ctx_lens), tb = i64(tables), lr = i64(logits_rows);
    TORCH_CHECK(tb.dim() == 2 && tb.size(0) == ql.numel() && cl.numel() == ql.numel(), "one table per sequence");
    const bool f16 = k_cache.scalar_type() == torch::kFloat16;
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
                    (f16 || k_cache.scalar_type() == torch::kFloat32) && v_cache.scalar_type() == k_cache.scalar_type() &&
                    k_cache.sizes() == v_cache.sizes() && k_cache.dim() == 4 && k_cache.size(0) == layers_ &&
                    k_cache.size(2) == kv_heads_ && k_cache.size(3) == head_dim_,
                "kv cache: float32 or float16 [layers, slots, kv, hd], keys and values alike");
    TORCH_CHECK(block_size > 0 && (!block_major || (block_size % 16 == 0 && k_cache.size(1) % block_size == 0)),
                "block size");
    const int64_t n = ids.numel(), seqs = ql.numel(), slots = k_cache.size(1);
    const int64_t* idp = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) TORCH_CHECK(idp[i] >= 0 && idp[i] < vocab_, "token id ", idp[i], " out of range");
    const int64_t* qlp = ql.data_ptr<int64_t>();
    const int64_t* clp = cl.data_ptr<int64_t>();
    const int64_t* tbp = tb.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t s = 0; s < seqs; ++s) {
      TORCH_CHECK(qlp[s] >= 0 && clp[s] >= qlp[s], "context shorter than the query");
      TORCH_CHECK((clp[s] + block_size - 1) / block_size <= tb.size(1), "block table too short");
      for (int64_t b = 0; b < (clp[s] + block_size - 1) / block_size; ++b)
        TORCH_CHECK(tbp[s * tb.size(1) + b] >= 0 && (tbp[s * tb.size(1) + b] + 1) * block_size <= slots,
                    "block id out of range of the cache");
      total += qlp[s];
    }
    TORCH_CHECK(total == n, "query lengths do not add up to the token count");
    const int64_t* lrp = lr.data_ptr<int64_t>();
    for (int64_t i = 0; i < lr.numel(); ++i) TORCH_CHECK(lrp[i] >= 0 && lrp[i] < n, "logits row out of range");
    torch::Tensor logits;
    if (out.has_value()) {  // the caller's buffer (reused across steps: no fresh pages to fault in each step)
      logits = *out;
      TORCH_CHECK(logits.scalar_type() == torch::kFloat32 && logits.is_contiguous() && logits.dim() == 2 &&
                      logits.size(0) == lr.numel() && logits.size(1) == prog_.logits_width(),
                  "out must be a contiguous float32 [logits rows, vocab] tensor");
    } else {
      logits = torch::empty({lr.numel(), prog_.logits_width()}, torch::kFloat32);
    }
    StepInput in;
    in.token_ids = idp;
    in.tokens = n;
    in.query_lens = qlp;
    in.ctx_lens = clp;
    in.seqs = seqs;
    in.tables = tbp;
    in.table_stride = tb.size(1);
    in.block_size = block_size;
    in.logits_rows = lrp;
    in.outputs = lr.numel();
    in.k_cache = k_cache.data_ptr();
    in.v_cache = v_cache.data_ptr();
    in.kv_f16 = f16 ? 1 : 0;
    in.cache_slots = slots;
    in.block_major = block_major ? 1 : 0;
    in.logits = logits.data_ptr<float>();
    const Isa& isa = find_isa(isa_name.empty() ? selected_isa() : isa_name);
    {
      pybind11::gil_scoped_release release;
      prog_.run(in, static_cast<int>(std::max<int64_t>(1, threads)), *isa.ops);
    }
    return logits;
  }

 private:
  View view(const PyView& v) const {
    View out;
    out.buf = static_cast<int32_t>(std::get<0>(v));
    out.col = std::get<1>(v);
    out.width = std::get<2>(v);
    return out;
  }
  static void set_heads(Instr& ins, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t rot, bool half,
                        int64_t table) {
    TORCH_CHECK(rot % 2 == 0 && rot <= head_dim, "rotary dim");
    ins.heads = static_cast<int32_t>(heads);
    ins.kv_heads = static_cast<int32_t>(kv_heads);
    ins.head_dim = static_cast<int32_t>(head_dim);
    ins.rot = static_cast<int32_t>(rot);
    ins.half = half ? 1 : 0;
    ins.rope_table = static_cast<int32_t>(table);
  }
  Program prog_;
  std::vector<pybind11::object> keep_;
  int64_t layers_, kv_heads_, head_dim_, vocab_ = 0;
};

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
  using llmc_qk::NativeProgram;
  py::class_<NativeProgram>(m, "NativeProgram")
      .def(py::init<int64_t, int64_t, int64_t>(), py::arg("layers"), py::arg("kv_heads"), py::arg("head_dim"))
      .def("buffer", &NativeProgram::buffer)
      .def("embed", &NativeProgram::embed)
      .def("rms_norm", &NativeProgram::rms_norm)
      .def("linear", &NativeProgram::linear)
      .def("rope_table", &NativeProgram::rope_table)
      .def("rope", &NativeProgram::rope)
      .def("attention", &NativeProgram::attention)
      .def("elementwise", &NativeProgram::elementwise)
      .def("swiglu", &NativeProgram::swiglu)
      .def("gather_rows", &NativeProgram::gather_rows)
      .def("set_logits", &NativeProgram::set_logits)
      .def("set_profiling", &NativeProgram::set_profiling)
      .def("profile", &NativeProgram::profile)
      .def("run", &NativeProgram::run, py::arg("token_ids"), py::arg("query_lens"), py::arg("ctx_lens"),
           py::arg("tables"), py::arg("logits_rows"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_size"),
           py::arg("threads"), py::arg("block_major") = false, py::arg("isa") = "", py::arg("out") = py::none());
  m.def("isa_paths", &llmc_qk::isa_names, "kernel paths this CPU runs, best first");
  m.def("set_isa", &llmc_qk::set_isa, "force a kernel path ('' = the best)");
  m.def("current_isa", &llmc_qk::current_isa);
  m.def(
      "pool_counts",
      [] {
        const llmc_qk::PoolCounts c = llmc_qk::pool_counts();
        return std::make_tuple(c.pieces, c.repeated);
      },
      "(pieces run, pieces an idle thread computed again) by native steps on more than one thread, in this process");
  m.def("set_steal_patience_ns", &llmc_qk::set_patience_floor_ns, py::arg("ns"),
        "least time a native step's piece runs before an idle thread computes it too (0: at once, for tests; "
        "< 0: the default)");
  m.def("quantize_activations", &llmc_qk::quantize_activations, py::arg("x"), py::arg("isa") = "");
  m.def("to_half_bits", &llmc_qk::to_half_bits, py::arg("x"), py::arg("isa") = "");
}
