// Weight-only group-quantized GEMV/GEMM for a few float32 rows (decode), llmc's weight layout.
//
// codes: uint8 [out, in] (8-bit) or [out, in/2] (4-bit, low nibble = even input index)
// scales, offsets: float32 [out, n_groups]; the last group may be shorter than `group`.
// symmetric: w = s * (q - 2**(bits-1))  -> y = s * dot(q - z, x_g)        (exact integer codes)
// asymmetric: w = s * q + o             -> y = s * dot(q, x_g) + o * sum(x_g)
// The float weight is never materialized: codes are widened to float in registers.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLMC_QGEMV_AVX2 1
#else
#define LLMC_QGEMV_AVX2 0
#endif

namespace {

struct Problem {
  const float* x;        // [rows, in]
  const uint8_t* codes;  // [out, packed]
  const float* scales;   // [out, groups]
  const float* offsets;  // [out, groups] or nullptr (symmetric)
  const float* xsum;     // [rows, groups] or nullptr (symmetric)
  float* y;              // [rows, out]
  int64_t rows, in, out, group, groups, packed;
  int bits;
};

inline int code_at(const uint8_t* row, int64_t k, int bits) {
  if (bits == 8) return row[k];
  const uint8_t b = row[k >> 1];
  return (k & 1) ? (b >> 4) : (b & 0x0F);
}

#if LLMC_QGEMV_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 consecutive codes starting at element k (k even) as 16 bytes in element order,
// minus the zero point when symmetric (then signed bytes).
template <int BITS, bool SYM>
inline __m128i load16(const uint8_t* row, int64_t k) {
  if constexpr (BITS == 8) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k));
    if constexpr (SYM) b = _mm_xor_si128(b, _mm_set1_epi8(static_cast<char>(0x80)));
    return b;
  } else {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + (k >> 1)));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(b, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    __m128i v = _mm_unpacklo_epi8(lo, hi);
    if constexpr (SYM) v = _mm_sub_epi8(v, _mm_set1_epi8(8));
    return v;
  }
}

template <bool SYM>
inline __m256 widen(__m128i bytes8) {
  const __m256i i = SYM ? _mm256_cvtepi8_epi32(bytes8) : _mm256_cvtepu8_epi32(bytes8);
  return _mm256_cvtepi32_ps(i);
}

// RB input rows against output rows [o0, o1).
template <int RB, int BITS, bool SYM>
void block_avx2(const Problem& p, int64_t r0, int64_t o0, int64_t o1) {
  const float zero = SYM ? static_cast<float>(1 << (BITS - 1)) : 0.0f;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = p.codes + o * p.packed;
    const float* srow = p.scales + o * p.groups;
    const float* orow = SYM ? nullptr : p.offsets + o * p.groups;
    __m256 tot[RB];
    float tail[RB];
    for (int r = 0; r < RB; ++r) {
      tot[r] = _mm256_setzero_ps();
      tail[r] = 0.0f;
    }
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t k0 = g * p.group;
      const int64_t k1 = (k0 + p.group < p.in) ? k0 + p.group : p.in;
      __m256 acc0[RB], acc1[RB];
      for (int r = 0; r < RB; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
      int64_t k = k0;
      for (; k + 16 <= k1; k += 16) {
        const __m128i c = load16<BITS, SYM>(row, k);
        const __m256 w0 = widen<SYM>(c);
        const __m256 w1 = widen<SYM>(_mm_srli_si128(c, 8));
        for (int r = 0; r < RB; ++r) {
          const float* xr = p.x + (r0 + r) * p.in + k;
          acc0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc0[r]);
          acc1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc1[r]);
        }
      }
      const float s = srow[g];
      const __m256 sv = _mm256_set1_ps(s);
      for (int r = 0; r < RB; ++r) {
        tot[r] = _mm256_fmadd_ps(_mm256_add_ps(acc0[r], acc1[r]), sv, tot[r]);
        float rem = 0.0f;
        const float* xr = p.x + (r0 + r) * p.in;
        for (int64_t j = k; j < k1; ++j) rem += (static_cast<float>(code_at(row, j, BITS)) - zero) * xr[j];
        tail[r] += s * rem;
        if constexpr (!SYM) tail[r] += orow[g] * p.xsum[(r0 + r) * p.groups + g];
      }
    }
    for (int r = 0; r < RB; ++r) p.y[(r0 + r) * p.out + o] = hsum(tot[r]) + tail[r];
  }
}
#endif

// Portable path (no AVX2): same arithmetic, scalar.
template <int RB>
void block_scalar(const Problem& p, int64_t r0, int64_t o0, int64_t o1) {
  const bool sym = p.offsets == nullptr;
  const float zero = sym ? static_cast<float>(1 << (p.bits - 1)) : 0.0f;
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = p.codes + o * p.packed;
    for (int r = 0; r < RB; ++r) {
      const float* xr = p.x + (r0 + r) * p.in;
      float total = 0.0f;
      for (int64_t g = 0; g < p.groups; ++g) {
        const int64_t k0 = g * p.group;
        const int64_t k1 = (k0 + p.group < p.in) ? k0 + p.group : p.in;
        float acc = 0.0f;
        for (int64_t k = k0; k < k1; ++k) acc += (static_cast<float>(code_at(row, k, p.bits)) - zero) * xr[k];
        total += p.scales[o * p.groups + g] * acc;
        if (!sym) total += p.offsets[o * p.groups + g] * p.xsum[(r0 + r) * p.groups + g];
      }
      p.y[(r0 + r) * p.out + o] = total;
    }
  }
}

template <int RB>
void dispatch_block(const Problem& p, int64_t r0, int64_t o0, int64_t o1) {
#if LLMC_QGEMV_AVX2
  const bool sym = p.offsets == nullptr;
  if (p.bits == 4) {
    sym ? block_avx2<RB, 4, true>(p, r0, o0, o1) : block_avx2<RB, 4, false>(p, r0, o0, o1);
  } else {
    sym ? block_avx2<RB, 8, true>(p, r0, o0, o1) : block_avx2<RB, 8, false>(p, r0, o0, o1);
  }
#else
  block_scalar<RB>(p, r0, o0, o1);
#endif
}

}  // namespace

torch::Tensor qgemv(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                    const c10::optional<torch::Tensor>& offsets, int64_t bits, int64_t group, int64_t out) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2, "x: float32 [rows, in] on CPU");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(group > 0 && (bits == 8 || group % 2 == 0), "bad group size");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.dim() == 2, "codes: uint8 contiguous");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous(), "scales: float32 contiguous");
  const auto xc = x.contiguous();
  const int64_t rows = xc.size(0), in = xc.size(1);
  const int64_t groups = (in + group - 1) / group;
  const int64_t packed = bits == 8 ? in : in / 2;
  TORCH_CHECK(codes.size(0) == out && codes.size(1) == packed, "codes shape does not match [out, packed in]");
  TORCH_CHECK(scales.size(0) == out && scales.size(1) == groups, "scales shape does not match [out, groups]");
  auto y = torch::empty({rows, out}, xc.options());
  torch::Tensor xsum, off;
  if (offsets.has_value() && offsets->defined()) {
    off = *offsets;
    TORCH_CHECK(off.scalar_type() == torch::kFloat32 && off.is_contiguous() && off.sizes() == scales.sizes(),
                "offsets: float32 contiguous like scales");
    xsum = torch::empty({rows, groups}, xc.options());
    const float* xp = xc.data_ptr<float>();
    float* sp = xsum.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k1 = std::min(in, (g + 1) * group);
        float s = 0.0f;
        for (int64_t k = g * group; k < k1; ++k) s += xp[r * in + k];
        sp[r * groups + g] = s;
      }
  }
  if (rows == 0 || out == 0) return y;
  Problem p{xc.data_ptr<float>(), codes.data_ptr<uint8_t>(), scales.data_ptr<float>(),
            off.defined() ? off.data_ptr<float>() : nullptr, xsum.defined() ? xsum.data_ptr<float>() : nullptr,
            y.data_ptr<float>(), rows, in, out, group, groups, packed, static_cast<int>(bits)};
  // grain: enough output rows per task that scheduling costs little against the weight stream
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, in));
  at::parallel_for(0, out, grain, [&](int64_t o0, int64_t o1) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) dispatch_block<4>(p, r, o0, o1);
    if (r + 2 <= rows) {
      dispatch_block<2>(p, r, o0, o1);
      r += 2;
    }
    if (r < rows) dispatch_block<1>(p, r, o0, o1);
  });
  return y;
}

bool has_avx2() { return LLMC_QGEMV_AVX2 != 0; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qgemv", &qgemv, "group-quantized weight x float32 rows (llmc layout)");
  m.def("has_avx2", &has_avx2, "whether the AVX2+FMA path was compiled");
}
