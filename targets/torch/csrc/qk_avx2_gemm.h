// The GEMM of the AVX2 path (qk_avx2.cpp) and of the AVX-VNNI path (qk_avxvnni.cpp): included by those two
// translation units only, after their `#pragma GCC target`, with LLMC_QK_AVX2_GEMM naming the entry point
// (gemm_avx2 / gemm_avxvnni) and LLMC_QK_AVX_VNNI 1 where the integer sums use vpdpbusd (VEX, 256 bits).
// A tile's 16 rows are done as two halves of 8 (one ymm lane per row). Products come from
// vpmaddubsw (u8 x s8 -> pairs summed in int16) and vpmaddwd (int16 pairs -> int32):
//   codes <= 63: pairs of vpmaddubsw results are summed in int16 (2 * 2 * 63 * 127 < 2^15); 4-bit codes
//                too: summing 8 of them (8 * 2 * 15 * 127 < 2^15) is fewer instructions, but 20% slower at
//                4 columns (measured on Zen 5: one long dependency chain per column)
//   codes <= 255: each alone on the signed codes u - 128 (the sign trick: |2 * 128 * 127| < 2^15),
//                 then + 128 * sum(q) to return to u.
// Compiled for these instructions by the including unit's pragma; only called after a run-time CPU check.
// With AVX-VNNI every code takes one vpdpbusd per code vector and column (u8 x s8, 4 products summed into
// int32: no int16 stage, no sign trick), the same exact integer sums, so the same bits as every path.
// No include guard: the header is parameterized by those two macros, and each unit includes it once.
#ifndef LLMC_QK_AVX2_GEMM
#error "define LLMC_QK_AVX2_GEMM (the entry point's name) before including qk_avx2_gemm.h"
#endif
#ifndef LLMC_QK_AVX_VNNI
#define LLMC_QK_AVX_VNNI 0
#endif

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "qk_common.h"

namespace llmc_qk {
namespace {

enum Codes { kSmall = 1, kFull = 2 };

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

// Byte i of the result is `bit` where bit i of m is set, else 0.
inline __m256i plane_bits(uint32_t m, __m256i bit) {
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                          3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i select = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(m)), spread);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, select), select), bit);
}

// Code vector j of half `half` (rows 8*half .. 8*half+7) of block b of a tile (its codes at tile_codes,
// BITS the layout of qk_common.h): inputs 4j..4j+3 of the 8 rows as bytes.
template <int BITS>
__attribute__((always_inline)) inline __m256i code_vec(const uint8_t* tile_codes, int64_t b, int half, int j) {
  constexpr int64_t cb = code_block_bytes(BITS);
  const uint8_t* block = tile_codes + b * cb;
  if (BITS == 8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + j * 64 + half * 32));
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + (j & 3) * 64 + half * 32));
  __m256i v = _mm256_and_si256(j < 4 ? p : _mm256_srli_epi16(p, 4), m4);
  for (int plane = 0; plane < BITS - 4; ++plane) {  // bit 4 + plane of each code: this half's 32 bits a word
    uint32_t m;
    std::memcpy(&m, block + 256 + plane * 64 + j * 8 + half * 4, 4);
    v = _mm256_or_si256(v, plane_bits(m, _mm256_set1_epi8(static_cast<char>(0x10 << plane))));
  }
  return v;
}

// Tiles [t0, t1) of w's codes rewritten as 8-bit codes (512 bytes a block) into out: a GEMM over many
// columns expands each block once instead of once per group of 4 columns.
template <int BITS>
void expand_tiles(const QWeight& w, int64_t t0, int64_t t1, uint8_t* out) {
  const int64_t nb = w.blocks, cb = w.code_bytes_per_block();
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t b = 0; b < nb; ++b)
      for (int half = 0; half < 2; ++half) {
        uint8_t* dst = out + ((t - t0) * nb + b) * 512 + half * 32;
        for (int j = 0; j < 8; ++j)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j * 64), code_vec<BITS>(w.codes + t * nb * cb, b, half, j));
      }
}

// The tile's scales (or offsets) of rows 8*half .. 8*half+7 for sub-block `part` of block b.
template <bool SUB16>
__attribute__((always_inline)) inline __m256 part_scales(const QWeight& w, const void* base, int64_t t, int half,
                                                         int64_t b, int part) {
  constexpr int nsub = SUB16 ? 2 : 1;
  return load_scales8(base, ((t * w.blocks + b) * nsub + part) * kRows + half * 8, w.f16_scales != 0);
}

// Adds the float value of one part's integer sums (`isum`: sum of u * q; plus `corr`, the shift times
// the part's sum of q, when SHIFT) to acc, in the order of qk_common.h (d: the block's scale, sx: d times
// the part's sum).
template <bool SHIFT, bool SYM>
__attribute__((always_inline)) inline __m256 part_value(__m256 acc, __m256i isum, const int32_t* corr, const float* d,
                                                        const float* sx, __m256 sc, __m256 off) {
  if (SHIFT) isum = _mm256_add_epi32(isum, _mm256_set1_epi32(*corr));
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(sc, _mm256_set1_ps(*d)), acc);
  if (!SYM) acc = _mm256_fmadd_ps(off, _mm256_set1_ps(*sx), acc);
  return acc;
}

// Starts loading block b + kAhead of the tile (codes, scales, offsets) on the first pass over it.
template <int BITS, bool SUB16, bool SYM>
__attribute__((always_inline)) inline void prefetch_ahead(const QWeight& w, const uint8_t* tile_codes, int64_t t,
                                                          int64_t b) {
  constexpr int64_t cb = code_block_bytes(BITS);
  constexpr int nsub = SUB16 ? 2 : 1;
  const int64_t esz = w.f16_scales ? 2 : 4;
  const int64_t si = (t * w.blocks + b + kAhead) * nsub * kRows * esz;
  const char* next = reinterpret_cast<const char*>(tile_codes + (b + kAhead) * cb);
  for (int l = 0; l < cb; l += 64) _mm_prefetch(next + l, _MM_HINT_T0);
  _mm_prefetch(static_cast<const char*>(w.scales) + si, _MM_HINT_T0);
  if (!SYM) _mm_prefetch(static_cast<const char*>(w.offsets) + si, _MM_HINT_T0);
}

// Stores the NC accumulators of rows 8*half .. 8*half+7 of tile t (the rows that exist).
template <int NC>
__attribute__((always_inline)) inline void store_rows(const QWeight& w, const __m256* acc, int64_t t, int half,
                                                      int64_t c0, float* y, int64_t ldy) {
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

// Half `half` (rows 8*half .. 8*half+7) of tile t against columns [c0, c0 + NC), codes <= 63 (any code with
// AVX-VNNI; the tile's codes at tile_codes in layout BITS: w.code_bits, or 8 after expand_tiles): the block's
// 8 code vectors are decoded once and held while each column's pairs of vpmaddubsw results are summed in
// int16 (or each column's vpdpbusd chains run).
template <int NC, int BITS, bool SUB16, bool SYM>
void half_cols_small(const QWeight& w, const uint8_t* tile_codes, const PackedAct& a, int64_t t, int half, int64_t c0,
                     float* y, int64_t ldy) {
  constexpr int nsub = SUB16 ? 2 : 1;
  __m256 acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.blocks; ++b) {
    if ((NC <= 2 || c0 == 0) && half == 0) prefetch_ahead<BITS, SUB16, SYM>(w, tile_codes, t, b);  // 2nd half: L1
    __m256i wv[8];
    for (int j = 0; j < 8; ++j) wv[j] = code_vec<BITS>(tile_codes, b, half, j);
    const __m256 s0 = part_scales<SUB16>(w, w.scales, t, half, b, 0);
    const __m256 s1 = SUB16 ? part_scales<SUB16>(w, w.scales, t, half, b, 1) : s0;
    const __m256 o0 = SYM ? _mm256_setzero_ps() : part_scales<SUB16>(w, w.offsets, t, half, b, 0);
    const __m256 o1 = SYM || !SUB16 ? o0 : part_scales<SUB16>(w, w.offsets, t, half, b, 1);
    const int64_t i0 = b * a.cols + c0;  // column c0 of block b
    for (int c = 0; c < NC; ++c) {
      const int8_t* q = a.q + (i0 + c) * kBlock;
      const int32_t* corr = a.corr + (i0 + c) * nsub;
      const float* sx = a.sx + (i0 + c) * nsub;
#if LLMC_QK_AVX_VNNI
      // vpdpbusd: 4 products u8 x s8 summed into int32 with no saturation, so any code up to 255; two chains
      // (inputs 0-15 and 16-31: the sub16 parts)
      __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        lo = _mm256_dpbusd_avx_epi32(lo, wv[j], bcast4(q + 4 * j));
        hi = _mm256_dpbusd_avx_epi32(hi, wv[4 + j], bcast4(q + 16 + 4 * j));
      }
#else
      __m256i s[4];
      for (int j = 0; j < 4; ++j)
        s[j] = madd1(_mm256_add_epi16(_mm256_maddubs_epi16(wv[2 * j], bcast4(q + 8 * j)),
                                      _mm256_maddubs_epi16(wv[2 * j + 1], bcast4(q + 8 * j + 4))));
      const __m256i lo = _mm256_add_epi32(s[0], s[1]), hi = _mm256_add_epi32(s[2], s[3]);
#endif
      const float* d = a.d + i0 + c;
      if (SUB16) {  // symmetric codes are shifted by -zero, the others' offsets are in sx
        acc[c] = part_value<SYM, SYM>(acc[c], lo, corr, d, sx, s0, o0);
        acc[c] = part_value<SYM, SYM>(acc[c], hi, corr + 1, d, sx + 1, s1, o1);
      } else {
        acc[c] = part_value<SYM, SYM>(acc[c], _mm256_add_epi32(lo, hi), corr, d, sx, s0, o0);
      }
    }
  }
  store_rows<NC>(w, acc, t, half, c0, y, ldy);
}

#if !LLMC_QK_AVX_VNNI
// As half_cols_small for any code (8-bit codes up to 255): |u - 128| x (q with the sign of u - 128),
// then + 128 * sum(q). Each code vector needs two registers (u - 128 and its magnitude): one at a time,
// for all columns together (held for the block, the 16 of them spill out of the 16 ymm registers).
template <int NC, bool SUB16, bool SYM>
void half_cols_full(const QWeight& w, const uint8_t* tile_codes, const PackedAct& a, int64_t t, int half, int64_t c0,
                    float* y, int64_t ldy) {
  constexpr int nsub = SUB16 ? 2 : 1;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.blocks; ++b) {
    if ((NC <= 2 || c0 == 0) && half == 0) prefetch_ahead<8, SUB16, SYM>(w, tile_codes, t, b);
    const int64_t i0 = b * a.cols + c0;  // column c0 of block b
    for (int part = 0; part < nsub; ++part) {  // sub16: inputs 0-15, then 16-31; else all 32 at once
      __m256i isum[NC];
      for (int c = 0; c < NC; ++c) isum[c] = _mm256_setzero_si256();
      for (int j = part * 8 / nsub; j < (part + 1) * 8 / nsub; ++j) {
        const __m256i ws = _mm256_xor_si256(code_vec<8>(tile_codes, b, half, j), flip);
        const __m256i wa = _mm256_abs_epi8(ws);
        for (int c = 0; c < NC; ++c) {
          const int8_t* q = a.q + (i0 + c) * kBlock + 4 * j;
          isum[c] = _mm256_add_epi32(isum[c], madd1(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(bcast4(q), ws))));
        }
      }
      const __m256 sc = part_scales<SUB16>(w, w.scales, t, half, b, part);
      const __m256 off = SYM ? _mm256_setzero_ps() : part_scales<SUB16>(w, w.offsets, t, half, b, part);
      for (int c = 0; c < NC; ++c)  // the codes are shifted by 128 - zero (symmetric) or 128
        acc[c] = part_value<true, SYM>(acc[c], isum[c], a.corr + (i0 + c) * nsub + part, a.d + i0 + c,
                                       a.sx + (i0 + c) * nsub + part, sc, off);
    }
  }
  store_rows<NC>(w, acc, t, half, c0, y, ldy);
}
#endif

template <int NC, int BITS, int CODES, bool SUB16, bool SYM>
void half_cols(const QWeight& w, const uint8_t* tile_codes, const PackedAct& a, int64_t t, int half, int64_t c0,
               float* y, int64_t ldy) {
#if LLMC_QK_AVX_VNNI
  static_assert(CODES == kSmall, "AVX-VNNI takes every code in half_cols_small");
  half_cols_small<NC, BITS, SUB16, SYM>(w, tile_codes, a, t, half, c0, y, ldy);
#else
  if constexpr (CODES == kSmall)
    half_cols_small<NC, BITS, SUB16, SYM>(w, tile_codes, a, t, half, c0, y, ldy);
  else
    half_cols_full<NC, SUB16, SYM>(w, tile_codes, a, t, half, c0, y, ldy);
#endif
}

// Columns [c0, c0 + NC) against tiles [g0, g1), whose codes (layout BITS) start at codes (tile g0's).
template <int NC, int BITS, int CODES, bool SUB16, bool SYM>
void tiles_cols(const QWeight& w, const uint8_t* codes, const PackedAct& a, int64_t g0, int64_t g1, int64_t c0,
                float* y, int64_t ldy) {
  constexpr int64_t cb = code_block_bytes(BITS);
  for (int64_t t = g0; t < g1; ++t)
    for (int h = 0; h < 2; ++h)
      half_cols<NC, BITS, CODES, SUB16, SYM>(w, codes + (t - g0) * w.blocks * cb, a, t, h, c0, y, ldy);
}

// All columns against tiles [g0, g1) (codes as in tiles_cols): 4 at a time, then 2, then 1.
template <int BITS, int CODES, bool SUB16, bool SYM>
void group_cols(const QWeight& w, const uint8_t* codes, const PackedAct& a, int64_t g0, int64_t g1, float* y,
                int64_t ldy) {
  int64_t c = 0;
  for (; c + 4 <= a.cols; c += 4) tiles_cols<4, BITS, CODES, SUB16, SYM>(w, codes, a, g0, g1, c, y, ldy);
  if (c + 2 <= a.cols) {
    tiles_cols<2, BITS, CODES, SUB16, SYM>(w, codes, a, g0, g1, c, y, ldy);
    c += 2;
  }
  if (c < a.cols) tiles_cols<1, BITS, CODES, SUB16, SYM>(w, codes, a, g0, g1, c, y, ldy);
}

// Tiles in groups of ~256 KiB (the weights stay in L2 while every column passes over them). With more
// than 4 columns, 5- and 6-bit codes are first expanded to bytes, once per group (the bit planes cost
// more than the dot products they feed when every 4 columns repeat them); with AVX-VNNI 4-bit codes too
// (its dot products are cheap enough for the nibble masks to cost: in lockstep at 32 rows on an Intel Xeon,
// Q4_0 5.7% faster, Q4_K even; on AVX2 the same expansion was 5-7% slower there).
template <int BITS, int CODES, bool SUB16, bool SYM>
void gemm_variant(const QWeight& w, const QAct& qa, int64_t t0, int64_t t1, float* y, int64_t ldy) {
  // codes u shifted to u - zero (symmetric) or, for the sign trick on full bytes, to u - 128
  const int32_t shift = CODES == kFull ? 128 - (SYM ? w.zero : 0) : (SYM ? -w.zero : 0);
  const PackedAct a = pack_act(qa, SUB16 ? 2 : 1, shift);
  constexpr bool expand = BITS == 5 || BITS == 6 || (LLMC_QK_AVX_VNNI && BITS == 4);
  const bool expanding = expand && a.cols > 4;
  const int64_t tile_bytes = w.tile_bytes(expanding ? code_block_bytes(8) : w.code_bytes_per_block());
  const int64_t group = a.cols <= 4 ? (t1 - t0) : (tile_bytes > 0 ? (256 * 1024) / tile_bytes + 1 : 1);
  uint8_t* expanded = expanding ? thread_scratch(group * w.blocks * 512) : nullptr;
  for (int64_t g0 = t0; g0 < t1; g0 += group) {
    const int64_t g1 = g0 + group < t1 ? g0 + group : t1;
    if constexpr (expand) {
      if (expanding) {
        expand_tiles<BITS>(w, g0, g1, expanded);
        group_cols<8, CODES, SUB16, SYM>(w, expanded, a, g0, g1, y, ldy);
        continue;
      }
    }
    group_cols<BITS, CODES, SUB16, SYM>(w, w.codes + g0 * w.blocks * w.code_bytes_per_block(), a, g0, g1, y, ldy);
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

}  // namespace

void LLMC_QK_AVX2_GEMM(const QWeight& w, const QAct& a, int64_t t0, int64_t t1, float* y, int64_t ldy) {
  switch (w.code_bits) {  // codes up to 63 (4, 5 and 6 bits, or 8-bit storage) take kSmall's dot product
    case 4: gemm_codes<4, kSmall>(w, a, t0, t1, y, ldy); break;
    case 5: gemm_codes<5, kSmall>(w, a, t0, t1, y, ldy); break;
    case 6: gemm_codes<6, kSmall>(w, a, t0, t1, y, ldy); break;
    default:
#if LLMC_QK_AVX_VNNI
      gemm_codes<8, kSmall>(w, a, t0, t1, y, ldy);
#else
      w.max_code <= 63 ? gemm_codes<8, kSmall>(w, a, t0, t1, y, ldy) : gemm_codes<8, kFull>(w, a, t0, t1, y, ldy);
#endif
  }
}

}  // namespace llmc_qk
