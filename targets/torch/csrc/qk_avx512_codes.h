// What the AVX-512 and AMX units both read of a weight tile (qk_common.h's layout): a block's codes as
// bytes, a block's 16 scales, and the mask of a tile's valid rows. Included after each unit's
// `#pragma GCC target`, so it is compiled for AVX-512 in each, with internal linkage (no copy for the
// linker to merge).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "qk_common.h"

namespace llmc_qk {
namespace {

// One block of a tile's codes as 8 vectors of bytes in the 8-bit layout: byte r*4 + i of vector j is
// u(r, 4j + i).
template <int BITS>
inline void decode_block(const uint8_t* src, __m512i* wv) {
  if (BITS == 8) {
    for (int j = 0; j < 8; ++j) wv[j] = _mm512_loadu_si512(src + j * 64);
    return;
  }
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  for (int j = 0; j < 4; ++j) {
    const __m512i p = _mm512_loadu_si512(src + j * 64);
    wv[j] = _mm512_and_si512(p, m4);
    wv[j + 4] = _mm512_and_si512(_mm512_srli_epi16(p, 4), m4);
  }
  for (int plane = 0; plane < BITS - 4; ++plane) {  // bit 4 + plane of each code, one mask bit a byte
    const __m512i bit = _mm512_set1_epi8(static_cast<char>(0x10 << plane));
    for (int j = 0; j < 8; ++j) {
      uint64_t m;
      std::memcpy(&m, src + 256 + plane * 64 + j * 8, 8);
      wv[j] = _mm512_or_si512(wv[j], _mm512_maskz_mov_epi8(static_cast<__mmask64>(m), bit));
    }
  }
}

// The 16 scales (or offsets) from element `index` of float16 or float32 storage.
inline __m512 load_scales(const void* base, int64_t index, bool f16) {
  if (f16) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
      static_cast<const uint16_t*>(base) + index)));
  return _mm512_loadu_ps(static_cast<const float*>(base) + index);
}

// Rows of tile t that hold outputs (the last tile may be partial).
inline __mmask16 valid_rows(const QWeight& w, int64_t t) {
  const int64_t left = w.out - t * kRows;
  return left >= kRows ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

}  // namespace
}  // namespace llmc_qk
