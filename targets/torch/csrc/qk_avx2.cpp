// AVX2 (+FMA, F16C) path of the int8-activation kernels (qk_common.h), for CPUs without AVX-512 VNNI.
// A tile's 16 rows are done as two halves of 8 (one ymm lane per row). Products come from
// vpmaddubsw (u8 x s8 -> pairs summed in int16) and vpmaddwd (int16 pairs -> int32):
//   codes <= 15: 8 vpmaddubsw results are summed in int16 (|sum| <= 8 * 2 * 15 * 127 < 2^15)
//   codes <= 63: pairs of them (2 * 2 * 63 * 127 < 2^15)
//   codes <= 255: each alone on the signed codes u - 128 (the sign trick: |2 * 128 * 127| < 2^15),
//                 then + 128 * sum(q) to return to u.
// Compiled for these instructions by the pragma below; only called after a run-time CPU check.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "qk_common.h"

#pragma GCC target("avx2,fma,f16c")

namespace llmc_qk {
namespace {

enum Codes { kNibble = 0, kSmall = 1, kFull = 2 };

constexpr int64_t kAhead = 12;  // blocks prefetched ahead by the few-column kernels

inline __m256 load_scales8(const void* base, int64_t index, bool f16) {
  if (f16) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
      static_cast<const uint16_t*>(base) + index)));
  return _mm256_loadu_ps(static_cast<const float*>(base) + index);
}

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

inline __m256i madd1(__m256i v16) { return _mm256_madd_epi16(v16, _mm256_set1_epi16(1)); }

// Exact integer dot products of the 8 rows' codes (wv[j]: inputs 4j..4j+3) with the block's
// activations: lo = inputs 0-15, hi = inputs 16-31.
template <int CODES>
inline void dots(const __m256i* wv, const int8_t* q, const ActMeta& m, __m256i* lo, __m256i* hi) {
  if (CODES == kNibble) {
    __m256i a = _mm256_maddubs_epi16(wv[0], bcast4(q));
    __m256i b = _mm256_maddubs_epi16(wv[4], bcast4(q + 16));
    for (int j = 1; j < 4; ++j) {
      a = _mm256_add_epi16(a, _mm256_maddubs_epi16(wv[j], bcast4(q + 4 * j)));
      b = _mm256_add_epi16(b, _mm256_maddubs_epi16(wv[j + 4], bcast4(q + 16 + 4 * j)));
    }
    *lo = madd1(a);
    *hi = madd1(b);
  } else if (CODES == kSmall) {
    __m256i s[4];
    for (int j = 0; j < 4; ++j) {
      s[j] = madd1(_mm256_add_epi16(_mm256_maddubs_epi16(wv[2 * j], bcast4(q + 8 * j)),
                                    _mm256_maddubs_epi16(wv[2 * j + 1], bcast4(q + 8 * j + 4))));
    }
    *lo = _mm256_add_epi32(s[0], s[1]);
    *hi = _mm256_add_epi32(s[2], s[3]);
  } else {
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256i s[8];
    for (int j = 0; j < 8; ++j) {
      const __m256i ws = _mm256_xor_si256(wv[j], flip);  // u - 128 as int8
      s[j] = madd1(_mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(bcast4(q + 4 * j), ws)));
    }
    const __m256i l = _mm256_add_epi32(_mm256_add_epi32(s[0], s[1]), _mm256_add_epi32(s[2], s[3]));
    const __m256i h = _mm256_add_epi32(_mm256_add_epi32(s[4], s[5]), _mm256_add_epi32(s[6], s[7]));
    *lo = _mm256_add_epi32(l, _mm256_set1_epi32(128 * m.s_half[0]));
    *hi = _mm256_add_epi32(h, _mm256_set1_epi32(128 * m.s_half[1]));
  }
}

// Byte i of the result is `bit` where bit i of m is set, else 0.
inline __m256i plane_bits(uint32_t m, __m256i bit) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                          3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i select = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(m)), spread);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, select), select), bit);
}

// Half `half` (rows 8*half .. 8*half+7) of tile t against columns [c0, c0 + NC); BITS = w.code_bits
// (the layout, qk_common.h), CODES the dot product the codes' range allows.
template <int NC, int BITS, int CODES, bool SUB16, bool SYM>
void half_cols(const QWeight& w, const QAct& a, int64_t t, int half, int64_t c0, float* y, int64_t ldy) {
  const int64_t nb = w.blocks;
  constexpr bool bits8 = BITS == 8;
  constexpr int64_t cb = bits8 ? 512 : 256 + 64 * (BITS - 4);
  const uint8_t* codes = w.codes + t * nb * cb + half * 32;
  const int nsub = SUB16 ? 2 : 1;
  const int64_t sbase = t * nb * nsub * kRows + half * 8;
  const bool f16 = w.f16_scales != 0;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256 acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = _mm256_setzero_ps();
  const int64_t esz = f16 ? 2 : 4;
  const char* sbytes = static_cast<const char*>(w.scales) + (t * nb * nsub * kRows) * esz;
  const char* obytes = SYM ? nullptr : static_cast<const char*>(w.offsets) + (t * nb * nsub * kRows) * esz;
  const uint8_t* tile_codes = w.codes + t * nb * cb;
  for (int64_t b = 0; b < nb; ++b) {
    if ((NC <= 2 || c0 == 0) && half == 0) {  // few columns or the first pass over a tile: fetch ahead (the
      // second half hits L1)
      const char* next = reinterpret_cast<const char*>(tile_codes + (b + kAhead) * cb);
      for (int l = 0; l < cb; l += 64) _mm_prefetch(next + l, _MM_HINT_T0);
      _mm_prefetch(sbytes + (b + kAhead) * nsub * kRows * esz, _MM_HINT_T0);
      if (!SYM) _mm_prefetch(obytes + (b + kAhead) * nsub * kRows * esz, _MM_HINT_T0);
    }
    __m256i wv[8];
    if (bits8) {
      for (int j = 0; j < 8; ++j) wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + b * 512 + j * 64));
    } else {
      for (int j = 0; j < 4; ++j) {
        const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + b * cb + j * 64));
        wv[j] = _mm256_and_si256(p, m4);
        wv[j + 4] = _mm256_and_si256(_mm256_srli_epi16(p, 4), m4);
      }
      for (int plane = 0; plane < BITS - 4; ++plane) {  // bit 4 + plane of each code: this half's 32 bits a word
        const __m256i bit = _mm256_set1_epi8(static_cast<char>(0x10 << plane));
        for (int j = 0; j < 8; ++j) {
          uint32_t m;
          std::memcpy(&m, tile_codes + b * cb + 256 + plane * 64 + j * 8 + half * 4, 4);
          wv[j] = _mm256_or_si256(wv[j], plane_bits(m, bit));
        }
      }
    }
    const int64_t si = sbase + b * nsub * kRows;
    const __m256 s0 = load_scales8(w.scales, si, f16);
    const __m256 s1 = SUB16 ? load_scales8(w.scales, si + kRows, f16) : s0;
    __m256 o0 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps();
    if (!SYM) {
      o0 = load_scales8(w.offsets, si, f16);
      if (SUB16) o1 = load_scales8(w.offsets, si + kRows, f16);
    }
    for (int c = 0; c < NC; ++c) {
      const int8_t* q = a.q + (c0 + c) * a.blocks * kBlock + b * kBlock;
      const ActMeta& m = a.meta[(c0 + c) * a.blocks + b];
      const __m256 dv = _mm256_set1_ps(m.d);
      __m256i lo, hi;
      dots<CODES>(wv, q, m, &lo, &hi);
      if (!SUB16) {
        __m256i s = _mm256_add_epi32(lo, hi);
        if (SYM) s = _mm256_sub_epi32(s, _mm256_set1_epi32(w.zero * m.s));
        acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(s0, dv), acc[c]);
        if (!SYM) acc[c] = _mm256_fmadd_ps(o0, _mm256_set1_ps(m.sx), acc[c]);
      } else {
        if (SYM) {
          lo = _mm256_sub_epi32(lo, _mm256_set1_epi32(w.zero * m.s_half[0]));
          hi = _mm256_sub_epi32(hi, _mm256_set1_epi32(w.zero * m.s_half[1]));
        }
        acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(s0, dv), acc[c]);
        if (!SYM) acc[c] = _mm256_fmadd_ps(o0, _mm256_set1_ps(m.sx_half[0]), acc[c]);
        acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(s1, dv), acc[c]);
        if (!SYM) acc[c] = _mm256_fmadd_ps(o1, _mm256_set1_ps(m.sx_half[1]), acc[c]);
      }
    }
  }
  const int64_t left = w.out - t * kRows - half * 8;
  if (left <= 0) return;
  for (int c = 0; c < NC; ++c) {
    float* dst = y + (c0 + c) * ldy + t * kRows + half * 8;
    if (left >= 8) {
      _mm256_storeu_ps(dst, acc[c]);
    } else {
      float tmp[8];
      _mm256_storeu_ps(tmp, acc[c]);
      for (int64_t r = 0; r < left; ++r) dst[r] = tmp[r];
    }
  }
}

template <int BITS, int CODES, bool SUB16, bool SYM>
void gemm_variant(const QWeight& w, const QAct& a, int64_t t0, int64_t t1, float* y, int64_t ldy) {
  const int64_t esz = w.f16_scales ? 2 : 4;
  const int64_t tile_bytes = w.blocks * (w.code_bytes_per_block() + w.nsub() * kRows * esz * (SYM ? 1 : 2));
  const int64_t group = a.cols <= 4 ? (t1 - t0) : (tile_bytes > 0 ? (256 * 1024) / tile_bytes + 1 : 1);
  for (int64_t g0 = t0; g0 < t1; g0 += group) {
    const int64_t g1 = g0 + group < t1 ? g0 + group : t1;
    int64_t c = 0;
    for (; c + 4 <= a.cols; c += 4)
      for (int64_t t = g0; t < g1; ++t)
        for (int h = 0; h < 2; ++h) half_cols<4, BITS, CODES, SUB16, SYM>(w, a, t, h, c, y, ldy);
    if (c + 2 <= a.cols) {
      for (int64_t t = g0; t < g1; ++t)
        for (int h = 0; h < 2; ++h) half_cols<2, BITS, CODES, SUB16, SYM>(w, a, t, h, c, y, ldy);
      c += 2;
    }
    if (c < a.cols)
      for (int64_t t = g0; t < g1; ++t)
        for (int h = 0; h < 2; ++h) half_cols<1, BITS, CODES, SUB16, SYM>(w, a, t, h, c, y, ldy);
  }
}

template <int BITS, int CODES>
void gemm_codes(const QWeight& w, const QAct& a, int64_t t0, int64_t t1, float* y, int64_t ldy) {
  const bool s16 = w.sub16 != 0, sym = w.offsets == nullptr;
  if (s16) {
    sym ? gemm_variant<BITS, CODES, true, true>(w, a, t0, t1, y, ldy)
        : gemm_variant<BITS, CODES, true, false>(w, a, t0, t1, y, ldy);
  } else {
    sym ? gemm_variant<BITS, CODES, false, true>(w, a, t0, t1, y, ldy)
        : gemm_variant<BITS, CODES, false, false>(w, a, t0, t1, y, ldy);
  }
}

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

void gemm_avx2(const QWeight& w, const QAct& a, int64_t t0, int64_t t1, float* y, int64_t ldy) {
  switch (w.code_bits) {  // codes up to 63 (5 and 6 bits, or 8-bit storage) take kSmall's dot product
    case 4: gemm_codes<4, kNibble>(w, a, t0, t1, y, ldy); break;
    case 5: gemm_codes<5, kSmall>(w, a, t0, t1, y, ldy); break;
    case 6: gemm_codes<6, kSmall>(w, a, t0, t1, y, ldy); break;
    default:
      w.max_code <= 63 ? gemm_codes<8, kSmall>(w, a, t0, t1, y, ldy) : gemm_codes<8, kFull>(w, a, t0, t1, y, ldy);
  }
}

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
                             avx2::attention, avx2::attention_prefetch, avx2::to_half};
}  // namespace llmc_qk
