// Weight-only group-quantized GEMV/GEMM for a few float32 rows (decode), llmc's weight layout.
//
// codes: uint8 [out, in] (8-bit) or [out, in/2] (4-bit, low nibble = even input index)
// scales, offsets: float32 [out, n_groups]; the last group may be shorter than `group`.
// symmetric: w = s * (q - 2**(bits-1)); asymmetric: w = s * q + o (one fma).
// The float weight is never materialized: 16 codes at a time are widened to float and scaled in
// registers, then FMA'd against up to 4 input rows (the weight row stays in L1 across rows).
// Each row's result is computed in the same order whatever the number of rows (batch invariant).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
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

// Input rows [r0, r0 + RB) against output row o. Codes are widened and scaled to the float
// weight in registers (w = s * (q - z) or fma(q, s, o), shared by the RB rows), then FMA'd.
template <int RB, int BITS, bool SYM>
void row_avx2(const Problem& p, int64_t r0, int64_t o) {
  const float zero = SYM ? static_cast<float>(1 << (BITS - 1)) : 0.0f;
  const uint8_t* row = p.codes + o * p.packed;
  const float* srow = p.scales + o * p.groups;
  const float* orow = SYM ? nullptr : p.offsets + o * p.groups;
  __m256 acc0[RB], acc1[RB];
  float tail[RB];
  for (int r = 0; r < RB; ++r) {
    acc0[r] = acc1[r] = _mm256_setzero_ps();
    tail[r] = 0.0f;
  }
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t k0 = g * p.group;
    const int64_t k1 = (k0 + p.group < p.in) ? k0 + p.group : p.in;
    const float s = srow[g];
    const float off = SYM ? 0.0f : orow[g];
    const __m256 sv = _mm256_set1_ps(s);
    const __m256 ov = _mm256_set1_ps(off);
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) {
      const __m128i c = load16<BITS, SYM>(row, k);
      __m256 w0 = widen<SYM>(c);
      __m256 w1 = widen<SYM>(_mm_srli_si128(c, 8));
      if constexpr (SYM) {
        w0 = _mm256_mul_ps(w0, sv);
        w1 = _mm256_mul_ps(w1, sv);
      } else {
        w0 = _mm256_fmadd_ps(w0, sv, ov);
        w1 = _mm256_fmadd_ps(w1, sv, ov);
      }
      for (int r = 0; r < RB; ++r) {
        const float* xr = p.x + (r0 + r) * p.in + k;
        acc0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc0[r]);
        acc1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc1[r]);
      }
    }
    for (int64_t j = k; j < k1; ++j) {  // ragged group / group not a multiple of 16
      const float q = static_cast<float>(code_at(row, j, BITS));
      const float w = SYM ? s * (q - zero) : std::fma(q, s, off);
      for (int r = 0; r < RB; ++r) tail[r] += w * p.x[(r0 + r) * p.in + j];
    }
  }
  for (int r = 0; r < RB; ++r) {
    p.y[(r0 + r) * p.out + o] = hsum(_mm256_add_ps(acc0[r], acc1[r])) + tail[r];
  }
}
#endif

// Portable path (no AVX2): same arithmetic, scalar.
void row_scalar(const Problem& p, int64_t r0, int64_t rb, int64_t o) {
  const bool sym = p.offsets == nullptr;
  const float zero = sym ? static_cast<float>(1 << (p.bits - 1)) : 0.0f;
  const uint8_t* row = p.codes + o * p.packed;
  for (int64_t r = r0; r < r0 + rb; ++r) {
    const float* xr = p.x + r * p.in;
    float total = 0.0f;
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t k0 = g * p.group;
      const int64_t k1 = (k0 + p.group < p.in) ? k0 + p.group : p.in;
      const float s = p.scales[o * p.groups + g];
      const float off = sym ? 0.0f : p.offsets[o * p.groups + g];
      for (int64_t k = k0; k < k1; ++k) {
        const float q = static_cast<float>(code_at(row, k, p.bits));
        total += (sym ? s * (q - zero) : std::fma(q, s, off)) * xr[k];
      }
    }
    p.y[r * p.out + o] = total;
  }
}

template <int RB>
void dispatch_row(const Problem& p, int64_t r0, int64_t o) {
#if LLMC_QGEMV_AVX2
  const bool sym = p.offsets == nullptr;
  if (p.bits == 4) {
    sym ? row_avx2<RB, 4, true>(p, r0, o) : row_avx2<RB, 4, false>(p, r0, o);
  } else {
    sym ? row_avx2<RB, 8, true>(p, r0, o) : row_avx2<RB, 8, false>(p, r0, o);
  }
#else
  row_scalar(p, r0, RB, o);
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
  torch::Tensor off;
  if (offsets.has_value() && offsets->defined()) {
    off = *offsets;
    TORCH_CHECK(off.scalar_type() == torch::kFloat32 && off.is_contiguous() && off.sizes() == scales.sizes(),
                "offsets: float32 contiguous like scales");
  }
  if (rows == 0 || out == 0) return y;
  Problem p{xc.data_ptr<float>(), codes.data_ptr<uint8_t>(), scales.data_ptr<float>(),
            off.defined() ? off.data_ptr<float>() : nullptr, y.data_ptr<float>(),
            rows, in, out, group, groups, packed, static_cast<int>(bits)};
  // grain: enough output rows per task that scheduling costs little against the weight stream
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, in));
  at::parallel_for(0, out, grain, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {  // one weight row (in L1) against every input row
      // every block size does the same arithmetic per row: results do not depend on the row count
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) dispatch_row<4>(p, r, o);
      if (r + 2 <= rows) {
        dispatch_row<2>(p, r, o);
        r += 2;
      }
      if (r < rows) dispatch_row<1>(p, r, o);
    }
  });
  return y;
}

bool has_avx2() { return LLMC_QGEMV_AVX2 != 0; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qgemv", &qgemv, "group-quantized weight x float32 rows (llmc layout)");
  m.def("has_avx2", &has_avx2, "whether the AVX2+FMA path was compiled");
}
