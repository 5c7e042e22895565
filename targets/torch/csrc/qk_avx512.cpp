// AVX-512 (F/BW/VL + VNNI) path of the int8-activation kernels (qk_common.h).
// One vpdpbusd multiplies 4 inputs of the tile's 16 interleaved rows by 4 broadcast int8
// activations; a tile's 16 outputs live in one zmm accumulator per column.
// Compiled for these instructions by the pragma below (not by -march): it is only called after
// the CPU was checked at run time. No standard-library code follows the pragma.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "qk_common.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c")

#include "qk_avx512_codes.h"

namespace llmc_qk {
namespace {

constexpr int64_t kAhead = 24;  // blocks prefetched ahead by the few-column kernels

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Tile t against columns [c0, c0 + NC) of a; BITS = w.code_bits (the layout, qk_common.h).
template <int NC, int BITS, bool SUB16, bool SYM>
void tile_cols(const QWeight& w, const PackedAct& a, int64_t t, int64_t c0, float* y, int64_t ldy) {
  const int64_t nb = w.blocks;
  constexpr int64_t cb = code_block_bytes(BITS);
  const uint8_t* codes = w.codes + t * nb * cb;
  const int nsub = SUB16 ? 2 : 1;
  const int64_t sbase = t * nb * nsub * kRows;
  const bool f16 = w.f16_scales != 0;
  __m512 acc[NC];
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) acc[c] = _mm512_setzero_ps();
  const int64_t esz = f16 ? 2 : 4;
  const char* sbytes = static_cast<const char*>(w.scales) + sbase * esz;
  const char* obytes = SYM ? nullptr : static_cast<const char*>(w.offsets) + sbase * esz;
  for (int64_t b = 0; b < nb; ++b) {
    if (NC <= 2 || c0 == 0) {  // few columns, or the first pass over a tile: fetch the weights ahead of use
      const char* next = reinterpret_cast<const char*>(codes + (b + kAhead) * cb);
      for (int l = 0; l < cb; l += 64) _mm_prefetch(next + l, _MM_HINT_T0);
      _mm_prefetch(sbytes + (b + kAhead) * nsub * kRows * esz, _MM_HINT_T0);
      if (!SYM) _mm_prefetch(obytes + (b + kAhead) * nsub * kRows * esz, _MM_HINT_T0);
    }
    __m512i wv[8];
    decode_block<BITS>(codes + b * cb, wv);
    const int64_t si = sbase + b * nsub * kRows;
    const __m512 s0 = load_scales(w.scales, si, f16);
    const __m512 s1 = SUB16 ? load_scales(w.scales, si + kRows, f16) : s0;
    __m512 o0 = _mm512_setzero_ps(), o1 = _mm512_setzero_ps();
    if (!SYM) {
      o0 = load_scales(w.offsets, si, f16);
      if (SUB16) o1 = load_scales(w.offsets, si + kRows, f16);
    }
    const int64_t i0 = b * a.cols + c0;  // column c0 of block b
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      const int8_t* q = a.q + (i0 + c) * kBlock;
      const int32_t* corr = a.corr + (i0 + c) * nsub;  // -zero * the part's sum (symmetric weights)
      const float* sx = a.sx + (i0 + c) * nsub;
      const __m512 dv = _mm512_set1_ps(a.d[i0 + c]);
      const __m512i z = _mm512_setzero_si512();
      // two independent chains: inputs 0-15 and 16-31 (also the two halves of a sub16 block)
      __m512i lo = _mm512_dpbusd_epi32(z, wv[0], bcast4(q));
      __m512i hi = _mm512_dpbusd_epi32(z, wv[4], bcast4(q + 16));
      lo = _mm512_dpbusd_epi32(lo, wv[1], bcast4(q + 4));
      hi = _mm512_dpbusd_epi32(hi, wv[5], bcast4(q + 20));
      lo = _mm512_dpbusd_epi32(lo, wv[2], bcast4(q + 8));
      hi = _mm512_dpbusd_epi32(hi, wv[6], bcast4(q + 24));
      lo = _mm512_dpbusd_epi32(lo, wv[3], bcast4(q + 12));
      hi = _mm512_dpbusd_epi32(hi, wv[7], bcast4(q + 28));
      if (!SUB16) {
        __m512i s = _mm512_add_epi32(lo, hi);
        if (SYM) s = _mm512_add_epi32(s, _mm512_set1_epi32(corr[0]));
        acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(s0, dv), acc[c]);
        if (!SYM) acc[c] = _mm512_fmadd_ps(o0, _mm512_set1_ps(sx[0]), acc[c]);
      } else {
        if (SYM) {
          lo = _mm512_add_epi32(lo, _mm512_set1_epi32(corr[0]));
          hi = _mm512_add_epi32(hi, _mm512_set1_epi32(corr[1]));
        }
        acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_mul_ps(s0, dv), acc[c]);
        if (!SYM) acc[c] = _mm512_fmadd_ps(o0, _mm512_set1_ps(sx[0]), acc[c]);
        acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_mul_ps(s1, dv), acc[c]);
        if (!SYM) acc[c] = _mm512_fmadd_ps(o1, _mm512_set1_ps(sx[1]), acc[c]);
      }
    }
  }
  const __mmask16 mask = valid_rows(w, t);
#pragma GCC unroll 16
  for (int c = 0; c < NC; ++c) _mm512_mask_storeu_ps(y + (c0 + c) * ldy + t * kRows, mask, acc[c]);
}

template <int BITS, bool SUB16, bool SYM>
void gemm_variant(const QWeight& w, const PackedAct& a, int64_t c0, int64_t t0, int64_t t1, float* y, int64_t ldy) {
  // Tiles in groups whose weights stay in L2 while every column block passes over them.
  const int64_t tile_bytes = w.tile_bytes(w.code_bytes_per_block());
  const int64_t group = a.cols <= 8 ? (t1 - t0) : (tile_bytes > 0 ? (256 * 1024) / tile_bytes + 1 : 1);
  for (int64_t g0 = t0; g0 < t1; g0 += group) {
    const int64_t g1 = g0 + group < t1 ? g0 + group : t1;
    // 16 columns a pass where there are: 16 accumulators beside the block's 8 code vectors fill the 32 zmm
    // registers, and each tile's codes are decoded and read from L2 half as often as with 8 (32 rows: the
    // GEMM 0.90-0.92x the time of 8-column passes, the Q8_0 head 0.75x, a 32-sequence step ~0.91x).
    int64_t c = c0;
    for (; c + 16 <= a.cols; c += 16)
      for (int64_t t = g0; t < g1; ++t) tile_cols<16, BITS, SUB16, SYM>(w, a, t, c, y, ldy);
    if (c + 8 <= a.cols) {
      for (int64_t t = g0; t < g1; ++t) tile_cols<8, BITS, SUB16, SYM>(w, a, t, c, y, ldy);
      c += 8;
    }
    if (c + 4 <= a.cols) {
      for (int64_t t = g0; t < g1; ++t) tile_cols<4, BITS, SUB16, SYM>(w, a, t, c, y, ldy);
      c += 4;
    }
    if (c + 2 <= a.cols) {
      for (int64_t t = g0; t < g1; ++t) tile_cols<2, BITS, SUB16, SYM>(w, a, t, c, y, ldy);
      c += 2;
    }
    if (c < a.cols)
      for (int64_t t = g0; t < g1; ++t) tile_cols<1, BITS, SUB16, SYM>(w, a, t, c, y, ldy);
  }
}

}  // namespace

namespace {

template <int BITS>
void gemm_bits(const QWeight& w, const PackedAct& a, int64_t c0, int64_t t0, int64_t t1, float* y, int64_t ldy) {
  const bool s16 = w.sub16 != 0, sym = w.offsets == nullptr;
  if (s16) {
    sym ? gemm_variant<BITS, true, true>(w, a, c0, t0, t1, y, ldy)
        : gemm_variant<BITS, true, false>(w, a, c0, t0, t1, y, ldy);
  } else {
    sym ? gemm_variant<BITS, false, true>(w, a, c0, t0, t1, y, ldy)
        : gemm_variant<BITS, false, false>(w, a, c0, t0, t1, y, ldy);
  }
}

}  // namespace

void gemm_avx512_columns(const QWeight& w, const PackedAct& a, int64_t c0, int64_t t0, int64_t t1, float* y,
                         int64_t ldy) {
  switch (w.code_bits) {
    case 4: gemm_bits<4>(w, a, c0, t0, t1, y, ldy); break;
    case 5: gemm_bits<5>(w, a, c0, t0, t1, y, ldy); break;
    case 6: gemm_bits<6>(w, a, c0, t0, t1, y, ldy); break;
    default: gemm_bits<8>(w, a, c0, t0, t1, y, ldy); break;
  }
}

void gemm_avx512(const QWeight& w, const QAct& a, int64_t t0, int64_t t1, float* y, int64_t ldy) {
  const PackedAct pa = pack_act(a, w.nsub(), w.offsets == nullptr ? -w.zero : 0);
  gemm_avx512_columns(w, pa, 0, t0, t1, y, ldy);
}

void quantize_avx512(const float* x, int64_t ldx, int64_t in, int64_t c0, int64_t c1, int64_t blocks, int8_t* q,
                     ActMeta* meta) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512i lowest = _mm512_set1_epi32(-127);
  for (int64_t c = c0; c < c1; ++c) {
    const float* xc = x + c * ldx;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k = b * kBlock;
      const int64_t n0 = in - k, n1 = in - k - 16;
      const __mmask16 m0 = n0 >= 16 ? 0xFFFF : (n0 <= 0 ? 0 : static_cast<__mmask16>((1u << n0) - 1));
      const __mmask16 m1 = n1 >= 16 ? 0xFFFF : (n1 <= 0 ? 0 : static_cast<__mmask16>((1u << n1) - 1));
      const __m512 v0 = _mm512_maskz_loadu_ps(m0, xc + k);
      const __m512 v1 = _mm512_maskz_loadu_ps(m1, xc + k + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
      const float d = amax / 127.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      const __m512 idv = _mm512_set1_ps(id);
      const __m512i i0 = _mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v0, idv)), lowest);
      const __m512i i1 = _mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v1, idv)), lowest);
      int8_t* qb = q + c * blocks * kBlock + k;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(i0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtsepi32_epi8(i1));
      const int32_t h0 = _mm512_reduce_add_epi32(i0), h1 = _mm512_reduce_add_epi32(i1);
      meta[c * blocks + b] = act_meta(d, h0, h1);
    }
  }
}

}  // namespace llmc_qk

#define LLMC_QK_ISA avx512
#define LLMC_QK_SIMD 2
#define LLMC_QK_MADD(a, b, c) __builtin_fmaf((a), (b), (c))
#include "qk_ops.h"

namespace llmc_qk {
const OpsTable ops_avx512 = {"avx512", gemm_avx512, quantize_avx512, avx512::rms_norm, avx512::elementwise, avx512::rope,
                             avx512::attention, avx512::to_half};
// AMX: the AVX-512 path's ops, and tile matrix multiplies where a GEMM has 16 columns or more (qk_amx.cpp).
const OpsTable ops_amx = {"amx", gemm_amx, quantize_avx512, avx512::rms_norm, avx512::elementwise, avx512::rope,
                          avx512::attention, avx512::to_half};
}  // namespace llmc_qk
