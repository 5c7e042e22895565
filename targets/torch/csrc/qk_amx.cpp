// AMX-INT8 path of the int8-activation kernels (qk_common.h), for GEMMs of 16 columns or more.
// One tile multiply (tdpbssd for symmetric codes, tdpbsud for the others) takes a block of 32 inputs of
// 16 columns (the A tile: a column's 32 int8 activations a row) against the block of a weight tile (the B
// tile: 8 rows of 64 bytes, byte r*4 + i of row j the code u(r, 4j + i), which is the 8-bit kernel layout)
// and gives the 16 x 16 exact integer sums S. The sums go through memory into zmm registers, where each is
// scaled and added in the order every other path uses: so the same bits as the AVX-512, AVX2 and scalar
// paths.
// Codes are widened to bytes once per tile (symmetric ones to signed u - zero, which folds the zero point's
// correction into the integer sum: the same integer), into the thread's scratch, and every column group
// reads them from there. Scales per 16 inputs (sub16) take two multiplies of 16 inputs a block.
#include <immintrin.h>
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#include "qk_common.h"

namespace llmc_qk {

bool amx_enable() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tile = (edx >> 24) & 1, int8 = (edx >> 25) & 1;
  if (!tile || !int8) return false;
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kGetPerm = 0x1022, kReqPerm = 0x1023, kTileData = 18;  // ARCH_{GET,REQ}_XCOMP_PERM, XTILEDATA
  static const bool granted = [] {
    if (syscall(SYS_arch_prctl, kReqPerm, kTileData) != 0) return false;
    unsigned long long features = 0;
    return syscall(SYS_arch_prctl, kGetPerm, &features) == 0 && ((features >> kTileData) & 1) != 0;
  }();
  return granted;
#else
  return false;
#endif
}

}  // namespace llmc_qk

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx2,fma,f16c,amx-tile,amx-int8")

#include "qk_avx512_codes.h"

namespace llmc_qk {
namespace {

constexpr int kCols = 16;  // columns of one A tile

// Tile registers, two sets so that one block's multiplies overlap the previous block's float work:
// 32 inputs a multiply: set 0 is C (sums) 0, A (activations) 2, B (codes) 4, set 1 C 1, A 3, B 5. Sub16
// (inputs 0-15, then 16-31): C 0 and 1 (set 0) or 6 and 7 (set 1), both with A 2 and 3, B 4 and 5. The
// intrinsics take a register's number as a literal.
struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

static_assert(sizeof(TileConfig) == 64, "the LDTILECFG operand is 64 bytes");

TileConfig tile_config(bool sub16) {
  TileConfig c;
  const int k_bytes = sub16 ? 16 : 32;
  const int sums_tiles[] = {0, 1, 6, 7}, act_tiles[] = {2, 3}, code_tiles[] = {4, 5};
  for (int t : sums_tiles) {
    c.rows[t] = kCols;
    c.colsb[t] = kRows * 4;
  }
  for (int t : act_tiles) {
    c.rows[t] = kCols;
    c.colsb[t] = static_cast<uint16_t>(k_bytes);
  }
  for (int t : code_tiles) {
    c.rows[t] = static_cast<uint8_t>(k_bytes / 4);
    c.colsb[t] = kRows * 4;
  }
  return c;
}

// The tile multiply of signed (tdpbssd) or unsigned (tdpbsud) codes; register numbers are literals.
#define LLMC_AMX_DP(c, a, b) \
  if constexpr (SIGNED) _tile_dpbssd(c, a, b); else _tile_dpbsud(c, a, b)
// 32 inputs on set (c, a, b): sums[0].
#define LLMC_AMX_BLOCK32(c, a, b) \
  _tile_zero(c); _tile_loadd(a, q, kBlock); _tile_loadd(b, codes, 64); LLMC_AMX_DP(c, a, b); \
  _tile_stored(c, sums[0], kRows * 4)
// Inputs 0-15 and 16-31 into sums c0 and c1, from A 2 and 3 and B 4 and 5 (loaded before): sums[0], sums[1].
#define LLMC_AMX_BLOCK16(c0, c1) \
  _tile_zero(c0); _tile_zero(c1); LLMC_AMX_DP(c0, 2, 4); LLMC_AMX_DP(c1, 3, 5); \
  _tile_stored(c0, sums[0], kRows * 4); _tile_stored(c1, sums[1], kRows * 4)

// One block's integer sums of 16 columns (A: a column's int8 values a row, stride 32) by 16 rows (B: the
// block's 512 code bytes) into sums[0] (inputs 0-31, or 0-15 with sub16) and sums[1] (sub16: 16-31).
// Signed codes (symmetric weights, already u - zero) multiply as signed bytes, others as unsigned.
template <bool SUB16, bool SIGNED, int SET>
inline void multiply_block(const int8_t* q, const uint8_t* codes, int32_t (*sums)[kCols * kRows]) {
  if constexpr (!SUB16) {
    if constexpr (SET == 0) { LLMC_AMX_BLOCK32(0, 2, 4); } else { LLMC_AMX_BLOCK32(1, 3, 5); }
  } else {
    _tile_loadd(2, q, kBlock);
    _tile_loadd(3, q + 16, kBlock);
    _tile_loadd(4, codes, 64);
    _tile_loadd(5, codes + 256, 64);
    if constexpr (SET == 0) { LLMC_AMX_BLOCK16(0, 1); } else { LLMC_AMX_BLOCK16(6, 7); }
  }
}

#undef LLMC_AMX_BLOCK16
#undef LLMC_AMX_BLOCK32
#undef LLMC_AMX_DP

// Widens tile t's codes into `out` (blocks x 512 bytes, the 8-bit layout): symmetric weights as signed
// u - zero (exact: |u - zero| < 128 for every symmetric format), others as the unsigned codes. 8-bit
// asymmetric codes need none of it: they are read as stored.
template <int BITS, bool SYM>
void widen_tile(const QWeight& w, int64_t t, uint8_t* out) {
  constexpr int64_t cb = code_block_bytes(BITS);
  const uint8_t* codes = w.codes + t * w.blocks * cb;
  const __m512i zero = _mm512_set1_epi8(static_cast<char>(SYM ? w.zero : 0));
  for (int64_t b = 0; b < w.blocks; ++b) {
    __m512i wv[8];
    decode_block<BITS>(codes + b * cb, wv);
    for (int j = 0; j < 8; ++j) {
      if (SYM) wv[j] = _mm512_sub_epi8(wv[j], zero);  // wraps to the signed byte u - zero
      _mm512_storeu_si512(out + b * 512 + j * 64, wv[j]);
    }
  }
}

// Adds one part's sums (16 columns x 16 rows, int32, a column's rows together) into the accumulators:
// acc = fma(float(S), scale * d, acc), then (asymmetric) acc = fma(offset, sx, acc). Symmetric sums come
// with the zero point's correction in already (codes u - zero).
template <bool SYM>
inline void add_part(const int32_t* sums, __m512 scale, __m512 offset, const float* d, const float* sx, int nsub,
                     __m512* acc) {
#pragma GCC unroll 16
  for (int c = 0; c < kCols; ++c) {
    const __m512i s = _mm512_load_si512(sums + c * kRows);
    acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(scale, _mm512_set1_ps(d[c])), acc[c]);
    if (!SYM) acc[c] = _mm512_fmadd_ps(offset, _mm512_set1_ps(sx[c * nsub]), acc[c]);
  }
}

// Tile t against columns [c0, c0 + 16), its codes as bytes at `codes8` (blocks x 512, widen_tile's layout).
// Block b + 1's multiplies are issued before block b's sums are scaled, on the other set of tile registers.
template <bool SUB16, bool SYM>
void tile_group(const QWeight& w, const PackedAct& a, const uint8_t* codes8, int64_t t, int64_t c0, float* y,
                int64_t ldy) {
  const int64_t nb = w.blocks;
  const int nsub = SUB16 ? 2 : 1;
  const int64_t sbase = t * nb * nsub * kRows;
  const bool f16 = w.f16_scales != 0;
  alignas(64) int32_t sums[2][2][kCols * kRows];  // [set][part]
  __m512 acc[kCols];
#pragma GCC unroll 16
  for (int c = 0; c < kCols; ++c) acc[c] = _mm512_setzero_ps();
  // The first group asks for the next tile's codes, scales and offsets a block at a time, so that they come
  // from memory while this tile computes.
  const bool fetch = c0 == 0 && t + 1 < w.tiles;
  const int64_t cb = w.code_bytes_per_block(), esz = f16 ? 2 : 4, sblock = nsub * kRows * esz;
  const char* next_codes = reinterpret_cast<const char*>(w.codes) + (t + 1) * nb * cb;
  const char* next_scales = static_cast<const char*>(w.scales) + (sbase + nb * nsub * kRows) * esz;
  const char* next_offsets = SYM ? nullptr : static_cast<const char*>(w.offsets) + (sbase + nb * nsub * kRows) * esz;
  const auto issue = [&](int64_t b) {
    if (fetch) {
      for (int64_t l = 0; l < cb; l += 64) _mm_prefetch(next_codes + b * cb + l, _MM_HINT_T0);
      _mm_prefetch(next_scales + b * sblock, _MM_HINT_T0);
      if (!SYM) _mm_prefetch(next_offsets + b * sblock, _MM_HINT_T0);
    }
    const int8_t* q = a.q + (b * a.cols + c0) * kBlock;
    if (b & 1)
      multiply_block<SUB16, SYM, 1>(q, codes8 + b * 512, sums[1]);
    else
      multiply_block<SUB16, SYM, 0>(q, codes8 + b * 512, sums[0]);
  };
  issue(0);
  for (int64_t b = 0; b < nb; ++b) {
    if (b + 1 < nb) issue(b + 1);
    const int64_t i0 = b * a.cols + c0;  // column c0 of block b
    const int64_t si = sbase + b * nsub * kRows;
    const __m512 s0 = load_scales(w.scales, si, f16);
    const __m512 o0 = SYM ? _mm512_setzero_ps() : load_scales(w.offsets, si, f16);
    add_part<SYM>(sums[b & 1][0], s0, o0, a.d + i0, a.sx + i0 * nsub, nsub, acc);
    if (SUB16) {
      const __m512 s1 = load_scales(w.scales, si + kRows, f16);
      const __m512 o1 = SYM ? _mm512_setzero_ps() : load_scales(w.offsets, si + kRows, f16);
      add_part<SYM>(sums[b & 1][1], s1, o1, a.d + i0, a.sx + i0 * nsub + 1, nsub, acc);
    }
  }
  const __mmask16 mask = valid_rows(w, t);
#pragma GCC unroll 16
  for (int c = 0; c < kCols; ++c) _mm512_mask_storeu_ps(y + (c0 + c) * ldy + t * kRows, mask, acc[c]);
}

// Tiles in spans: the first column group widens each tile and multiplies it (fetching the next one
// meanwhile), then every other group passes over the span's tiles. Up to 2 groups a span is one tile, whose
// widened codes stay in L1 (spans of L2's size measured slower at 16 and 32 rows). With more, a span's codes
// fill L2, so each group's activations stay in L1 across the span and its outputs touch 16 rows of y at a
// time, not all the columns' (the 49152 x 576 head at 128 rows: 0.90x of AVX-512 tile by tile, 1.32x so).
template <int BITS, bool SUB16, bool SYM>
void gemm_tiles(const QWeight& w, const PackedAct& a, int64_t t0, int64_t t1, float* y, int64_t ldy) {
  const int64_t groups = a.cols / kCols, tile_codes = w.blocks * 512;
  const int64_t fit = (256 * 1024) / tile_codes, span = groups > 2 && fit > 1 ? fit : 1;
  constexpr bool widened = BITS != 8 || SYM;  // else the stored codes are read as they are
  uint8_t* buf = widened ? thread_scratch(span * tile_codes) : nullptr;
  const auto slot = [&](int64_t t, int64_t s0) { return buf + (t - s0) * tile_codes; };  // widened only
  const auto codes_of = [&](int64_t t, int64_t s0) -> const uint8_t* {
    return widened ? slot(t, s0) : w.codes + t * tile_codes;
  };
  for (int64_t s0 = t0; s0 < t1; s0 += span) {
    const int64_t s1 = s0 + span < t1 ? s0 + span : t1;
    for (int64_t t = s0; t < s1; ++t) {
      if (widened) widen_tile<BITS, SYM>(w, t, slot(t, s0));
      tile_group<SUB16, SYM>(w, a, codes_of(t, s0), t, 0, y, ldy);
    }
    for (int64_t g = 1; g < groups; ++g)
      for (int64_t t = s0; t < s1; ++t) tile_group<SUB16, SYM>(w, a, codes_of(t, s0), t, g * kCols, y, ldy);
  }
}

template <int BITS>
void gemm_bits(const QWeight& w, const PackedAct& a, int64_t t0, int64_t t1, float* y, int64_t ldy) {
  const bool s16 = w.sub16 != 0, sym = w.offsets == nullptr;
  if (s16) {
    sym ? gemm_tiles<BITS, true, true>(w, a, t0, t1, y, ldy) : gemm_tiles<BITS, true, false>(w, a, t0, t1, y, ldy);
  } else {
    sym ? gemm_tiles<BITS, false, true>(w, a, t0, t1, y, ldy) : gemm_tiles<BITS, false, false>(w, a, t0, t1, y, ldy);
  }
}

}  // namespace

void gemm_amx(const QWeight& w, const QAct& a, int64_t t0, int64_t t1, float* y, int64_t ldy) {
  const PackedAct pa = pack_act(a, w.nsub(), w.offsets == nullptr ? -w.zero : 0);
  const int64_t full = a.cols / kCols * kCols;
  if (full > 0) {
    // Loaded where this thread's tiles are configured otherwise (by another shape of weight, or by another
    // library such as oneDNN): reading the configuration costs ~7 ns, loading it and releasing the tiles
    // ~80 ns a call, and a step makes thousands of calls. The tiles stay configured after the call.
    alignas(64) static const TileConfig configs[2] = {tile_config(false), tile_config(true)};
    const TileConfig& config = configs[w.sub16 != 0];
    alignas(64) TileConfig current;
    _tile_storeconfig(&current);
    if (std::memcmp(&current, &config, sizeof(TileConfig)) != 0) _tile_loadconfig(&config);
    switch (w.code_bits) {
      case 4: gemm_bits<4>(w, pa, t0, t1, y, ldy); break;
      case 5: gemm_bits<5>(w, pa, t0, t1, y, ldy); break;
      case 6: gemm_bits<6>(w, pa, t0, t1, y, ldy); break;
      default: gemm_bits<8>(w, pa, t0, t1, y, ldy); break;
    }
  }
  if (full < a.cols) gemm_avx512_columns(w, pa, full, t0, t1, y, ldy);
}

}  // namespace llmc_qk
