// How close llmc's AVX2 GEMM is to what AVX2's integer instructions allow (benchmarks/kernel_paths.py times
// the real kernels). The inner loop of qk_avx2.cpp's half_cols_small (8 rows a ymm, 4 columns a pass, byte
// codes as after expand_tiles) on synthetic codes and activations, and variants of it:
//
//   g++ -O3 -std=c++17 -mavx2 -mfma [-mavxvnni] benchmarks/avx2_inner_loop.cpp -o /tmp/avx2_inner_loop && /tmp/avx2_inner_loop
//
// peak:    vpmaddubsw alone (10 independent chains, assembly): the multiply ports' ceiling
// llmc:    the kernel's loop: per block and column 8 vpmaddubsw, pairs summed in int16, 4 vpmaddwd, the
//          int32 sums, the zero-point correction, cvt, the scale product and the fma (23 vector operations
//          for 8 rows x 32 inputs)
// intonly: llmc without the float work (the int32 block sums added into an int32 accumulator)
// llmc_cols_outer: llmc with the column groups outside the tiles (each pass reads the codes from L2, as the
//          kernel's loops do) instead of inside (the tile stays in L1 while all columns pass)
// int16:   8 vpmaddubsw results summed in int16 before one vpmaddwd (codes <= 15: 8 * 2 * 15 * 127 < 2^15)
// avxvnni: llmc's loop on vpdpbusd (qk_avxvnni.cpp; built only with -mavxvnni)
// full4, full8: half_cols_full's sign trick for 8-bit codes (|u - 128| x (q with the sign of u - 128), each
//          code vector alone), 4 or 8 columns a pass
// Each runs over `tiles` tiles of 16 rows x 18 blocks (576 inputs) x 32 columns: 4 tiles keep the codes in
// L1, 96 (1536 rows, 864 KiB) in L2 as the kernel's groups do. Best of 15 runs; products per second, one
// thread.
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

constexpr int NB = 18, COLS = 32, NC = 4;

struct Data {
  int tiles;
  std::vector<uint8_t> codes;  // [tiles][NB][512]: byte (r*4 + i) of chunk j = u(r, 4j + i)
  std::vector<int8_t> act;     // [NB][COLS][32]
  std::vector<float> d, sc;    // [NB][COLS], [tiles][NB][16]
  std::vector<int32_t> corr;   // [NB][COLS]
  std::vector<float> y;        // [COLS][tiles * 16]
  explicit Data(int t)
      : tiles(t), codes(size_t(t) * NB * 512), act(NB * COLS * 32), d(NB * COLS), sc(size_t(t) * NB * 16),
        corr(NB * COLS), y(size_t(COLS) * t * 16) {
    uint32_t s = 12345;
    auto next = [&] { s = s * 1664525u + 1013904223u; return s >> 8; };
    for (auto& c : codes) c = next() % 16;
    for (auto& a : act) a = int8_t(int(next() % 255) - 127);
    for (auto& v : d) v = 1e-3f * (1 + next() % 7);
    for (auto& v : sc) v = 1e-2f * (1 + next() % 5);
    for (auto& v : corr) v = -int32_t(next() % 1000);
  }
};

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
inline __m256i madd1(__m256i v) { return _mm256_madd_epi16(v, _mm256_set1_epi16(1)); }

enum Mode { kLlmc, kIntOnly, kInt16, kVnni };

template <int MODE, bool COLS_OUTER = false>
void run(Data& D) {
  for (int o = 0; o < D.tiles * (COLS / NC); ++o) {
    const int t = COLS_OUTER ? o % D.tiles : o / (COLS / NC);
    const int c0 = NC * (COLS_OUTER ? o / D.tiles : o % (COLS / NC));
    for (int half = 0; half < 2; ++half) {
        __m256 acc[NC];
        __m256i iacc[NC];
        for (int c = 0; c < NC; ++c) acc[c] = _mm256_setzero_ps(), iacc[c] = _mm256_setzero_si256();
        for (int b = 0; b < NB; ++b) {
          const uint8_t* block = &D.codes[(size_t(t) * NB + b) * 512 + half * 32];
          __m256i wv[8];
          for (int j = 0; j < 8; ++j) wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + j * 64));
          const __m256 s0 = _mm256_loadu_ps(&D.sc[(size_t(t) * NB + b) * 16 + half * 8]);
          for (int c = 0; c < NC; ++c) {
            const int8_t* q = &D.act[(b * COLS + c0 + c) * 32];
            __m256i isum;
            if (MODE == kInt16) {
              __m256i p[8];
              for (int j = 0; j < 8; ++j) p[j] = _mm256_maddubs_epi16(wv[j], bcast4(q + 4 * j));
              const __m256i s01 = _mm256_add_epi16(p[0], p[1]), s23 = _mm256_add_epi16(p[2], p[3]);
              const __m256i s45 = _mm256_add_epi16(p[4], p[5]), s67 = _mm256_add_epi16(p[6], p[7]);
              isum = madd1(_mm256_add_epi16(_mm256_add_epi16(s01, s23), _mm256_add_epi16(s45, s67)));
            } else if (MODE == kVnni) {
#ifdef __AVXVNNI__
              __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
              for (int j = 0; j < 4; ++j) {
                lo = _mm256_dpbusd_avx_epi32(lo, wv[j], bcast4(q + 4 * j));
                hi = _mm256_dpbusd_avx_epi32(hi, wv[4 + j], bcast4(q + 16 + 4 * j));
              }
              isum = _mm256_add_epi32(lo, hi);
#endif
            } else {
              __m256i s[4];
              for (int j = 0; j < 4; ++j)
                s[j] = madd1(_mm256_add_epi16(_mm256_maddubs_epi16(wv[2 * j], bcast4(q + 8 * j)),
                                              _mm256_maddubs_epi16(wv[2 * j + 1], bcast4(q + 8 * j + 4))));
              isum = _mm256_add_epi32(_mm256_add_epi32(s[0], s[1]), _mm256_add_epi32(s[2], s[3]));
            }
            isum = _mm256_add_epi32(isum, _mm256_set1_epi32(D.corr[b * COLS + c0 + c]));
            if (MODE == kIntOnly) {
              iacc[c] = _mm256_add_epi32(iacc[c], isum);
            } else {
              acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(s0, _mm256_set1_ps(D.d[b * COLS + c0 + c])),
                                       acc[c]);
            }
          }
        }
        for (int c = 0; c < NC; ++c) {
          const __m256 out = MODE == kIntOnly ? _mm256_cvtepi32_ps(iacc[c]) : acc[c];
          _mm256_storeu_ps(&D.y[size_t(c0 + c) * D.tiles * 16 + t * 16 + half * 8], out);
        }
      }
  }
}

// half_cols_full's loop (8-bit codes up to 255): the codes' sign and magnitude once per block, then
// vpsignb + vpmaddubsw + vpmaddwd + vpaddd per code vector and column.
template <int N>
void run_full(Data& D) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int t = 0; t < D.tiles; ++t)
    for (int c0 = 0; c0 < COLS; c0 += N)
      for (int half = 0; half < 2; ++half) {
        __m256 acc[N];
        for (int c = 0; c < N; ++c) acc[c] = _mm256_setzero_ps();
        for (int b = 0; b < NB; ++b) {
          const uint8_t* block = &D.codes[(size_t(t) * NB + b) * 512 + half * 32];
          __m256i isum[N];
          for (int c = 0; c < N; ++c) isum[c] = _mm256_setzero_si256();
          for (int j = 0; j < 8; ++j) {
            const __m256i ws =
                _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + j * 64)), flip);
            const __m256i wa = _mm256_abs_epi8(ws);
            for (int c = 0; c < N; ++c) {
              const int8_t* q = &D.act[(b * COLS + c0 + c) * 32 + 4 * j];
              isum[c] = _mm256_add_epi32(isum[c], madd1(_mm256_maddubs_epi16(wa, _mm256_sign_epi8(bcast4(q), ws))));
            }
          }
          const __m256 s0 = _mm256_loadu_ps(&D.sc[(size_t(t) * NB + b) * 16 + half * 8]);
          for (int c = 0; c < N; ++c) {
            const __m256i v = _mm256_add_epi32(isum[c], _mm256_set1_epi32(D.corr[b * COLS + c0 + c]));
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(s0, _mm256_set1_ps(D.d[b * COLS + c0 + c])),
                                     acc[c]);
          }
        }
        for (int c = 0; c < N; ++c) _mm256_storeu_ps(&D.y[size_t(c0 + c) * D.tiles * 16 + t * 16 + half * 8], acc[c]);
      }
}

// vpmaddubsw alone, as many as `llmc` does for the same products: 10 independent chains in registers (latency
// 5, so 2 a cycle can issue), written in assembly so that the compiler adds no moves or spills.
#define LLMC_MUB(k) "vpmaddubsw %%ymm15, %%ymm" #k ", %%ymm" #k "\n\t"
void run_peak(Data& D) {
  const long n = long(D.tiles) * (COLS / NC) * 2 * NB * NC * 8 / 10;  // llmc's vpmaddubsw count / 10
  asm volatile("vpxor %%ymm15, %%ymm15, %%ymm15" ::: "xmm15");
  for (long i = 0; i < n; ++i)
    asm volatile(LLMC_MUB(0) LLMC_MUB(1) LLMC_MUB(2) LLMC_MUB(3) LLMC_MUB(4) LLMC_MUB(5) LLMC_MUB(6) LLMC_MUB(7)
                     LLMC_MUB(8) LLMC_MUB(9)
                 ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9");
  asm volatile("vzeroupper" ::: "memory");
  D.y[0] = float(n);
}

template <typename F>
double best_seconds(F&& f) {
  double best = 1e9;
  for (int r = 0; r < 15; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int k = 0; k < 10; ++k) f();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 10;
    best = s < best ? s : best;
  }
  return best;
}

int main() {
  for (int tiles : {4, 96}) {
    Data D(tiles);
    const double macs = double(tiles) * 16 * NB * 32 * COLS;
    const struct { const char* name; double s; } rows[] = {
        {"llmc", best_seconds([&] { run<kLlmc>(D); })},
        {"intonly", best_seconds([&] { run<kIntOnly>(D); })},
        {"int16", best_seconds([&] { run<kInt16>(D); })},
        {"llmc_cols_outer", best_seconds([&] { run<kLlmc, true>(D); })},
#ifdef __AVXVNNI__
        {"avxvnni", best_seconds([&] { run<kVnni>(D); })},
#endif
        {"full4", best_seconds([&] { run_full<4>(D); })},
        {"full8", best_seconds([&] { run_full<8>(D); })},
        {"peak", best_seconds([&] { run_peak(D); })},
    };
    for (const auto& r : rows)
      std::printf("{\"tiles\": %d, \"mode\": \"%s\", \"ms\": %.4f, \"gmac_s\": %.1f}\n", tiles, r.name, r.s * 1e3,
                  macs / r.s * 1e-9);
  }
  return 0;
}
