// AVX2 (+FMA, F16C) path of the int8-activation kernels (qk_common.h), for CPUs without AVX-512 VNNI: its GEMM
// (qk_avx2_gemm.h, vpmaddubsw / vpmaddwd), the activations' quantization and the float ops (qk_ops.h). The
// AVX-VNNI path (qk_avxvnni.cpp: the same GEMM on vpdpbusd) shares everything here but the GEMM.
// Compiled for these instructions by the pragma below; only called after a run-time CPU check.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "qk_common.h"

#pragma GCC target("avx2,fma,f16c")

#define LLMC_QK_AVX2_GEMM gemm_avx2
#include "qk_avx2_gemm.h"

namespace llmc_qk {
namespace {

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int32_t hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

}  // namespace

void quantize_avx2(const float* x, int64_t ldx, int64_t in, int64_t c0, int64_t c1, int64_t blocks, int8_t* q,
                   ActMeta* meta) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i lowest = _mm256_set1_epi32(-127);
  for (int64_t c = c0; c < c1; ++c) {
    const float* xc = x + c * ldx;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k = b * kBlock;
      __m256 v[4];
      for (int j = 0; j < 4; ++j) {
        const int64_t n = in - k - 8 * j;
        if (n >= 8) {
          v[j] = _mm256_loadu_ps(xc + k + 8 * j);
        } else {
          float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          for (int64_t i = 0; i < n; ++i) tmp[i] = xc[k + 8 * j + i];
          v[j] = _mm256_loadu_ps(tmp);
        }
      }
      const __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                      _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
      const float amax = hmax8(mx);
      const float d = amax / 127.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      const __m256 idv = _mm256_set1_ps(id);
      __m256i iv[4];
      for (int j = 0; j < 4; ++j) iv[j] = _mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[j], idv)), lowest);
      // pack 32 int32 -> 32 int8 in order (packs work per 128-bit lane: fix the order with a permute)
      const __m256i p01 = _mm256_packs_epi32(iv[0], iv[1]);
      const __m256i p23 = _mm256_packs_epi32(iv[2], iv[3]);
      __m256i p = _mm256_packs_epi16(p01, p23);
      p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      int8_t* qb = q + c * blocks * kBlock + k;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), p);
      const int32_t h0 = hsum8i(_mm256_add_epi32(iv[0], iv[1])), h1 = hsum8i(_mm256_add_epi32(iv[2], iv[3]));
      meta[c * blocks + b] = act_meta(d, h0, h1);
    }
  }
}

}  // namespace llmc_qk

#define LLMC_QK_ISA avx2
#define LLMC_QK_SIMD 1
#define LLMC_QK_MADD(a, b, c) __builtin_fmaf((a), (b), (c))
#include "qk_ops.h"

namespace llmc_qk {
const OpsTable ops_avx2 = {"avx2", gemm_avx2, quantize_avx2, avx2::rms_norm, avx2::elementwise, avx2::rope,
                             avx2::attention, avx2::to_half};
// AVX-VNNI (VEX vpdpbusd on 256 bits, e.g. Intel cores without AVX-512): the AVX2 path's ops and its GEMM on
// vpdpbusd (qk_avxvnni.cpp).
const OpsTable ops_avxvnni = {"avxvnni", gemm_avxvnni, quantize_avx2, avx2::rms_norm, avx2::elementwise, avx2::rope,
                              avx2::attention, avx2::to_half};
}  // namespace llmc_qk
