// Float32 ops of llmc's native step program (qk_program.cpp): RMSNorm, RoPE, SiLU/SwiGLU and
// causal attention over the paged KV cache. Written as plain loops that the compiler vectorizes;
// this file is included by each ISA translation unit after its `#pragma GCC target`, inside a
// namespace of that ISA (LLMC_QK_ISA), so every ISA gets its own copies and nothing is shared at
// link time. LLMC_QK_MADD(a, b, c) is fma where the ISA has it, else a * b + c. LLMC_QK_SIMD names the
// vector instructions the ISA's translation unit may use here through <immintrin.h> (the pragma does not
// define __AVX512F__ and the like): 2 AVX-512 (with F16C), 1 AVX2 + FMA + F16C, 0 none.
#ifndef LLMC_QK_ISA
#error "define LLMC_QK_ISA (the namespace) before including qk_ops.h"
#endif
#ifndef LLMC_QK_SIMD
#error "define LLMC_QK_SIMD (2 avx512, 1 avx2, 0 scalar) before including qk_ops.h"
#endif

namespace llmc_qk {
namespace LLMC_QK_ISA {
namespace {

constexpr int kLanes = 16;

// 16 floats as one value: the compiler maps these element-wise ops onto the ISA's registers
// (one zmm, two ymm or four xmm), so every ISA computes the same lanes the same way.
typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));

__attribute__((always_inline)) inline f16v load16(const float* p) {
  f16v v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}


// The widest float vector the ISA keeps in registers, for the loops that are not the attention's
// 16-key groups (softmax, SiLU, norms): one ymm (8 lanes) on AVX2, where GCC keeps 16-lane values in
// memory, else f16v (one zmm, or four xmm on the scalar path).
#if LLMC_QK_SIMD == 1
typedef float fvec __attribute__((vector_size(32)));
typedef int32_t ivec __attribute__((vector_size(32)));
#else
typedef f16v fvec;
typedef i16v ivec;
#endif
constexpr int kW = static_cast<int>(sizeof(fvec) / sizeof(float));

__attribute__((always_inline)) inline fvec loadw(const float* p) {
  fvec v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

__attribute__((always_inline)) inline void storew(float* p, fvec v) { __builtin_memcpy(p, &v, sizeof v); }

// Tree reductions of one fvec's lanes (depth log2(kW), not a chain).
__attribute__((always_inline)) inline float hmax(fvec v) {
  float a[kW];
  storew(a, v);
  for (int w = kW / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) a[i] = a[i] > a[i + w] ? a[i] : a[i + w];
  return a[0];
}

__attribute__((always_inline)) inline float hsum(fvec v) {
  float a[kW];
  storew(a, v);
  for (int w = kW / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) a[i] = a[i] + a[i + w];
  return a[0];
}

#if LLMC_QK_SIMD != 1
// The 16-lane helpers of the attention's loops where fvec is f16v (AVX2's run on 8-lane fvecs: GCC keeps
// 16-lane values that are built from or split into __m256 halves in memory, ~20x slower).
// 16 float16 values (IEEE binary16 bits) as floats: exact.
__attribute__((always_inline)) inline f16v load16(const uint16_t* p) {
#if LLMC_QK_SIMD == 2
  return reinterpret_cast<f16v>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#else
  float t[kLanes];
  for (int i = 0; i < kLanes; ++i) t[i] = half_to_float(p[i]);
  return load16(t);
#endif
}

// a * b + c on 16 lanes (a broadcast), fused on AVX-512 (like LLMC_QK_MADD there).
__attribute__((always_inline)) inline f16v madd16(float a, f16v b, f16v c) {
#if LLMC_QK_SIMD == 2
  return reinterpret_cast<f16v>(
      _mm512_fmadd_ps(_mm512_set1_ps(a), reinterpret_cast<__m512>(b), reinterpret_cast<__m512>(c)));
#else
  return a * b + c;
#endif
}
#endif

// exp_f32 on every lane of V (float lanes; I: int32 lanes of the same count): fvec, the width whose
// registers hold it (AVX-512, scalar), 8-lane on AVX2, where GCC keeps 16-lane values in memory.
template <typename V, typename I>
__attribute__((always_inline)) inline V exp_lanes(V x) {
  const V lo = V{} - 87.0f, hi = V{} + 88.0f;
  x = x < lo ? lo : (x > hi ? hi : x);
  const V t = x * 1.44269504088896341f;
  const V fn = (t + 12582912.0f) - 12582912.0f;
  V r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  const I n = __builtin_convertvector(fn, I);
  const I bits = (n + 127) << 23;
  V scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float exp_f32(float x) {
  // Cephes-style expf: 2^n * e^r with |r| <= ln2/2, relative error ~1e-7; vectorizable.
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = x * 1.44269504088896341f;
  const float fn = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = LLMC_QK_MADD(p, r, 1.3981999507e-3f);
  p = LLMC_QK_MADD(p, r, 8.3334519073e-3f);
  p = LLMC_QK_MADD(p, r, 4.1665795894e-2f);
  p = LLMC_QK_MADD(p, r, 1.6666665459e-1f);
  p = LLMC_QK_MADD(p, r, 5.0000001201e-1f);
  p = LLMC_QK_MADD(p * r, r, r) + 1.0f;
  const int32_t n = static_cast<int32_t>(fn);
  const int32_t bits = (n + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, 4);
  return p * scale;
}

}  // namespace

// y[r] = rms_norm(x[r] (+ res[r])) * w for rows [r0, r1); with res, sum[r] = x[r] + res[r].
void rms_norm(const float* x, int64_t ldx, const float* res, int64_t ldr, const float* w, int64_t n, float eps,
              float* y, int64_t ldy, float* sum, int64_t lds, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * ldx;
    const float* src = xr;
    if (res != nullptr) {
      float* sr = sum + r * lds;
      const float* rr = res + r * ldr;
      for (int64_t i = 0; i < n; ++i) sr[i] = xr[i] + rr[i];
      src = sr;
    }
    fvec acc = fvec{};
    int64_t i = 0;
    for (; i + kW <= n; i += kW) {
      const fvec v = loadw(src + i);
      acc += v * v;
    }
    float total = hsum(acc);
    for (; i < n; ++i) total = LLMC_QK_MADD(src[i], src[i], total);
    const float inv = 1.0f / __builtin_sqrtf(total / static_cast<float>(n) + eps);
    float* yr = y + r * ldy;
    for (int64_t k = 0; k < n; ++k) yr[k] = src[k] * inv * w[k];
  }
}

// kind 0: y = silu(a); 1: y = silu(a) * b; 2: y = a * b; 3: y = a + b.
void elementwise(int kind, const float* a, int64_t lda, const float* b, int64_t ldb, float* y, int64_t ldy, int64_t n,
                 int64_t r0, int64_t r1) {
  // one loop per kind, no loop reading a pointer it may not have: each vectorizes
  for (int64_t r = r0; r < r1; ++r) {
    const float* __restrict ar = a + r * lda;
    float* __restrict yr = y + r * ldy;
    int64_t i = 0;
    if (kind == 0) {  // explicit vectors: GCC does not vectorize exp_f32's loop for AVX2
      for (; i + kW <= n; i += kW) {
        const fvec v = loadw(ar + i);
        storew(yr + i, v / (1.0f + exp_lanes<fvec, ivec>(-v)));
      }
      for (; i < n; ++i) yr[i] = ar[i] / (1.0f + exp_f32(-ar[i]));
      continue;
    }
    const float* __restrict br = b + r * ldb;
    if (kind == 1) {
      for (; i + kW <= n; i += kW) {
        const fvec v = loadw(ar + i);
        storew(yr + i, v / (1.0f + exp_lanes<fvec, ivec>(-v)) * loadw(br + i));
      }
      for (; i < n; ++i) yr[i] = ar[i] / (1.0f + exp_f32(-ar[i])) * br[i];
    } else if (kind == 2) {
      for (int64_t i = 0; i < n; ++i) yr[i] = ar[i] * br[i];
    } else {
      for (int64_t i = 0; i < n; ++i) yr[i] = ar[i] + br[i];
    }
  }
}

// In place on rows [r0, r1) of x (heads of hd values each): rotate the first `rot` dims of each
// head by the angle table row of the token's position. half: pairs (i, i + rot/2), else (2i, 2i+1).
void rope(float* x, int64_t ldx, int heads, int hd, int rot, int half, const float* cos_t, const float* sin_t,
          const int64_t* positions, int64_t r0, int64_t r1) {
  const int h2 = rot / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const float* c = cos_t + positions[r] * h2;
    const float* s = sin_t + positions[r] * h2;
    for (int h = 0; h < heads; ++h) {
      float* v = x + r * ldx + static_cast<int64_t>(h) * hd;
      if (half) {
        for (int i = 0; i < h2; ++i) {
          const float a = v[i], b = v[i + h2];
          v[i] = a * c[i] - b * s[i];
          v[i + h2] = b * c[i] + a * s[i];
        }
      } else {
        for (int i = 0; i < h2; ++i) {
          const float a = v[2 * i], b = v[2 * i + 1];
          v[2 * i] = a * c[i] - b * s[i];
          v[2 * i + 1] = b * c[i] + a * s[i];
        }
      }
    }
  }
}

// y[i] = float16(x[i]) rounded to nearest even, i < n (float_to_half's bits on every path).
void to_half(const float* x, uint16_t* y, int64_t n) {
  int64_t i = 0;
#if LLMC_QK_SIMD == 2
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif LLMC_QK_SIMD == 1
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) y[i] = float_to_half(x[i]);
}

namespace {

constexpr int kChunk = 64, kVec = kChunk / kLanes;
// Query vectors of one kv head scored and summed together, so each key and value vector is loaded once
// for all of them: its query heads, and in a prompt several rows' (accumulators: up to kHeads x kVec
// scores and kHeads x 4 value vectors of 16 lanes on AVX-512, 24 of the 32 zmm; AVX2's loops run on
// 8-lane fvecs, as GCC keeps 16-lane values in memory there, and 16 ymm hold 4 heads' sums).
constexpr int kHeads = LLMC_QK_SIMD == 2 ? 6 : 4;

__attribute__((always_inline)) inline float value_at(const float* p) { return *p; }
__attribute__((always_inline)) inline float value_at(const uint16_t* p) { return half_to_float(*p); }

#if LLMC_QK_SIMD == 1
// The attention's AVX2 loops run on fvec (one ymm): 8 float16 values as floats, and a fused a * b + c.
__attribute__((always_inline)) inline fvec loadw(const uint16_t* p) {
  return reinterpret_cast<fvec>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
__attribute__((always_inline)) inline fvec maddw(float a, fvec b, fvec c) {
  return reinterpret_cast<fvec>(
      _mm256_fmadd_ps(_mm256_set1_ps(a), reinterpret_cast<__m256>(b), reinterpret_cast<__m256>(c)));
}
#else
// fvec is f16v here: the 16-lane helpers.
__attribute__((always_inline)) inline fvec loadw(const uint16_t* p) { return load16(p); }
__attribute__((always_inline)) inline fvec maddw(float a, fvec b, fvec c) { return madd16(a, b, c); }
#endif
// A 16-key group (or 16 values) is kPer fvecs: 2 ymm on AVX2, one f16v elsewhere.
constexpr int kPer = kLanes / kW;

// Where a chunk's 16-key groups lie in the cache, so that the chunk before it (in its task, or the last
// chunk of the thread's previous task) can ask for them a group at a time while it computes: keys while it
// scores, values before it sums them. One burst per chunk at its start took 7.4 ms for 30 layers at 32 x 96
// positions on AVX2 against 4.8 paced (AVX-512: within noise). Group c's keys are `key_pieces` runs of
// `key_bytes` (stride key_stride) from key[c], its values one run of val_bytes[c] from val[c].
struct ChunkPrefetch {
  int groups = 0;
  const char* key[kVec];
  const char* val[kVec];
  int64_t val_bytes[kVec];
  int64_t key_bytes = 0, key_stride = 0;
  int key_pieces = 0;
};

// Asks for the cache lines of [p, p + bytes) ahead of their use (into L2: a chunk's keys and values
// would crowd L1): attention would otherwise wait on DRAM for each block it reaches.
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 2);
  __builtin_prefetch(c + bytes - 1, 0, 2);
}

__attribute__((always_inline)) inline void prefetch_group_keys(const ChunkPrefetch* pf, int c) {
  if (pf == nullptr || c >= pf->groups) return;
  for (int i = 0; i < pf->key_pieces; ++i) prefetch_bytes(pf->key[c] + i * pf->key_stride, pf->key_bytes);
}

__attribute__((always_inline)) inline void prefetch_group_values(const ChunkPrefetch* pf, int c) {
  if (pf != nullptr && c < pf->groups) prefetch_bytes(pf->val[c], pf->val_bytes[c]);
}

// acc[g][v] += query g . the keys in fvec v of groups [0, NG) (kPer fvecs a group): each key vector
// loaded once for all G heads, the G x NG x kPer sums independent FMA chains. Groups [0, live) only,
// live <= NG: the template for `live` groups runs.
template <int G, int NG, int ROW, typename TK>
__attribute__((always_inline)) inline void score_groups(int live, const float* q, const TK* const* kg,
                                                        const int64_t* ks, int hd, fvec (*acc)[ROW]) {
  if constexpr (NG > 1) {
    if (live < NG) {
      score_groups<G, NG - 1, ROW>(live, q, kg, ks, hd, acc);
      return;
    }
  }
  if (live < 1) return;
  for (int d = 0; d < hd; ++d)
    for (int v = 0; v < NG * kPer; ++v) {
      const fvec k = loadw(kg[v / kPer] + d * ks[v / kPer] + kW * (v % kPer));
      for (int g = 0; g < G; ++g) acc[g][v] = maddw(q[g * hd + d], k, acc[g][v]);
    }
}

// s[g][j] = query g . key j (query g at q + g * hd) for the chunk's 16-key groups [0, groups): group c's
// keys are `kg[c]`, [hd][ks[c]] (key j of the group at column j).
template <int G, typename TK>
inline void score_chunk(const float* q, const TK* const* kg, const int64_t* ks, int groups, int hd,
                        float (*s)[kChunk], const ChunkPrefetch* pf) {
  // NG groups a pass: enough independent sums to keep both FMA pipes busy in the registers there are
  // (AVX2: 12 ymm at G = 3 with 2, 8 at G = 4 with 1; else all 4, G x 4 zmm); each pass's keys are asked
  // for from memory as it starts
  constexpr int NG = LLMC_QK_SIMD == 1 ? (G <= 3 ? 2 : 1) : kVec;
  static_assert(kVec % NG == 0, "passes cover the chunk");
  for (int c = 0; c < kVec; c += NG) {
    for (int n = 0; n < NG; ++n) prefetch_group_keys(pf, c + n);
    fvec acc[G][NG * kPer];
    for (int g = 0; g < G; ++g)
      for (int v = 0; v < NG * kPer; ++v) acc[g][v] = fvec{};
    score_groups<G, NG, NG * kPer>(groups - c, q, kg + c, ks + c, hd, acc);
    for (int g = 0; g < G; ++g)
      for (int v = 0; v < NG * kPer; ++v) storew(s[g] + c * kLanes + kW * v, acc[g][v]);
  }
}

// ac[g hd + d0, g hd + d0 + 16 NV) = that * alpha[g] + sum over keys j0 <= j < valid of p[g][j] * value j.
template <int G, int NV, typename TV>
inline void values_part(float* ac, int hd, const float* alpha, const float (*p)[kChunk], const TV* const* vrows,
                        int j0, int valid, int d0) {
  fvec t[G][NV * kPer];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV * kPer; ++v) t[g][v] = loadw(ac + g * hd + d0 + kW * v) * alpha[g];
  for (int j = j0; j < valid; ++j) {
    const TV* vr = vrows[j] + d0;
    for (int v = 0; v < NV * kPer; ++v) {  // one value vector live at a time, the G weights p[g][j] held
      const fvec x = loadw(vr + kW * v);
      for (int g = 0; g < G; ++g) t[g][v] = maddw(p[g][j], x, t[g][v]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < NV * kPer; ++v) storew(ac + g * hd + d0 + kW * v, t[g][v]);
}

// ac[g] = ac[g] * alpha[g] + sum over keys j0 <= j < valid of p[g][j] * value j, in order of j.
template <int G, typename TV>
inline void accumulate_values(float* ac, const float* alpha, const float (*p)[kChunk], const TV* const* vrows,
                              int j0, int valid, int hd) {
  // 16-lane value vectors per pass: AVX2 2 (4 ymm each for G <= 3 heads: 12 sums, both FMA pipes busy), else 4
  constexpr int kWide = LLMC_QK_SIMD == 1 ? (G <= 3 ? 2 : 1) : 4;
  int d0 = 0;
  for (; d0 + 16 * kWide <= hd; d0 += 16 * kWide) values_part<G, kWide>(ac, hd, alpha, p, vrows, j0, valid, d0);
  for (; d0 + 16 <= hd; d0 += 16) values_part<G, 1>(ac, hd, alpha, p, vrows, j0, valid, d0);
  if (d0 == hd) return;
  for (int g = 0; g < G; ++g)
    for (int d = d0; d < hd; ++d) ac[g * hd + d] *= alpha[g];
  for (int j = j0; j < valid; ++j)
    for (int g = 0; g < G; ++g)
      for (int d = d0; d < hd; ++d) ac[g * hd + d] = LLMC_QK_MADD(p[g][j], value_at(vrows[j] + d), ac[g * hd + d]);
}

// The online softmax update of G query vectors over one chunk's scores s (vector g sees keys [0, vlen[g])):
// each one's running max `mx` and sum `sm`, its weights p (0 from vlen[g] to the span) and the factor
// `alpha` its value sums are rescaled by. The span (the fvecs that hold keys) is N where N > 0: a full
// chunk's loops unrolled at compile time.
template <int G, int N>
__attribute__((always_inline)) inline void softmax_update(float (*s)[kChunk], float (*p)[kChunk], float* alpha,
                                                          float* mx, float* sm, const int* vlen, int span_) {
  const int span = N > 0 ? N : span_;
  for (int g = 0; g < G; ++g) {
    for (int j = vlen[g]; j < span; ++j) s[g][j] = -__builtin_inff();
    fvec vmax = loadw(s[g]);
    for (int c = kW; c < span; c += kW) {
      const fvec o = loadw(s[g] + c);
      vmax = vmax > o ? vmax : o;
    }
    const float cmax = hmax(vmax);
    const float m_new = mx[g] > cmax ? mx[g] : cmax;
    alpha[g] = mx[g] == -__builtin_inff() ? 0.0f : exp_f32(mx[g] - m_new);
    for (int c = 0; c < span; c += kW) storew(p[g] + c, exp_lanes<fvec, ivec>(loadw(s[g] + c) - m_new));
    for (int j = vlen[g]; j < span; ++j) p[g][j] = 0.0f;  // exp clamps -inf to exp(-87), not 0
    fvec vsum = fvec{};
    for (int c = 0; c < span; c += kW) vsum += loadw(p[g] + c);
    sm[g] = sm[g] * alpha[g] + hsum(vsum);
    mx[g] = m_new;
  }
}

// One chunk of keys for G query vectors (queries q, sums ac: [G][hd]; one row's heads, or consecutive
// rows' heads in a prompt): scores, the softmax update and the weighted values into `ac`. Vector g sees
// the chunk's keys [0, vlen[g]), vlen[g] >= 1: the keys are scored up to the largest (the others' scores
// there masked), the values summed together up to the smallest, then each longer vector's own last ones
// (a later row's value, even an infinite one, never reaches an earlier row); each vector's sums are the
// operations it would run alone, in the same order.
template <int G, typename TK, typename TV>
inline void attend_chunk(const float* q, float* ac, float* mx, float* sm, const TK* const* kg,
                         const int64_t* ks, const TV* const* vrows, const int* vlen, int hd,
                         const ChunkPrefetch* pf) {
  alignas(64) float s[G][kChunk];
  alignas(64) float p[G][kChunk];
  float alpha[G];
  int valid = vlen[0], shortest = vlen[0];  // the longest and the shortest vector's keys
  for (int g = 1; g < G; ++g) {
    valid = vlen[g] > valid ? vlen[g] : valid;
    shortest = vlen[g] < shortest ? vlen[g] : shortest;
  }
  score_chunk<G>(q, kg, ks, (valid + kLanes - 1) / kLanes, hd, s, pf);
  const int span = (valid + kW - 1) / kW * kW;  // the fvecs that hold keys
  if (span == kChunk)
    softmax_update<G, kChunk>(s, p, alpha, mx, sm, vlen, span);
  else
    softmax_update<G, 0>(s, p, alpha, mx, sm, vlen, span);
  for (int c = 0; c < kVec; ++c) prefetch_group_values(pf, c);
  accumulate_values<G>(ac, alpha, p, vrows, 0, shortest, hd);
  static const float kOne = 1.0f;  // ac * 1 is ac: the rest continues the same sums
  for (int g = 0; g < G; ++g)
    if (vlen[g] > shortest) accumulate_values<1>(ac + g * hd, &kOne, p + g, vrows, shortest, vlen[g], hd);
}

// attend_chunk for the n = rows x g_n query vectors of consecutive rows, kHeads at a time; the row of
// vector x sees the chunk's keys [0, row_vlen[x / g_n]).
template <typename TK, typename TV>
inline void attend_heads(int n, int g_n, const float* q, float* ac, float* mx, float* sm, const TK* const* kg,
                         const int64_t* ks, const TV* const* vrows, const int* row_vlen, int hd,
                         const ChunkPrefetch* pf) {
  for (int g0 = 0; g0 < n; g0 += kHeads) {
    const int m = n - g0 < kHeads ? n - g0 : kHeads;
    int vlen[kHeads];
    for (int x = 0; x < m; ++x) vlen[x] = row_vlen[(g0 + x) / g_n];
    const ChunkPrefetch* f = g0 == 0 ? pf : nullptr;
    const float* qg = q + g0 * hd;
    float* ag = ac + g0 * hd;
    switch (m) {
      case 1: attend_chunk<1>(qg, ag, mx + g0, sm + g0, kg, ks, vrows, vlen, hd, f); break;
      case 2: attend_chunk<2>(qg, ag, mx + g0, sm + g0, kg, ks, vrows, vlen, hd, f); break;
      case 3: attend_chunk<3>(qg, ag, mx + g0, sm + g0, kg, ks, vrows, vlen, hd, f); break;
      case 4: attend_chunk<4>(qg, ag, mx + g0, sm + g0, kg, ks, vrows, vlen, hd, f); break;
#if LLMC_QK_SIMD == 2
      case 5: attend_chunk<5>(qg, ag, mx + g0, sm + g0, kg, ks, vrows, vlen, hd, f); break;
      case 6: attend_chunk<6>(qg, ag, mx + g0, sm + g0, kg, ks, vrows, vlen, hd, f); break;
#endif
      default: break;
    }
  }
}

// Where the keys and values of block-major chunk [p0, min(p0 + kChunk, end)) of one kv head lie.
template <typename T>
inline ChunkPrefetch chunk_ranges(const T* kc, const T* vc, const int64_t* table, int64_t bs, int kv_heads, int kvh,
                                  int hd, int64_t p0, int64_t end) {
  ChunkPrefetch r;
  r.key_pieces = bs == kLanes ? 1 : hd;  // a 16-slot block's [hd][16] keys are one run, else hd runs of 16
  r.key_bytes = static_cast<int64_t>(sizeof(T)) * (bs == kLanes ? hd * bs : kLanes);
  r.key_stride = static_cast<int64_t>(sizeof(T)) * bs;
  for (int64_t pos = p0; pos < end && pos < p0 + kChunk; pos += kLanes, ++r.groups) {
    const int64_t head = table[pos / bs] * kv_heads + kvh, off = pos % bs;
    const int64_t n = end - pos < kLanes ? end - pos : kLanes;
    r.key[r.groups] = reinterpret_cast<const char*>(kc + head * hd * bs + off);
    r.val[r.groups] = reinterpret_cast<const char*>(vc + (head * bs + off) * hd);
    r.val_bytes[r.groups] = static_cast<int64_t>(sizeof(T)) * n * hd;
  }
  return r;
}

// One attention task over a cache of element type T (float or float16 bits); see attention().
template <typename T>
void attention_task(const AttnArgs& a, int seq, int kvh, int i0, int i1, const AttnTask& after, float* scratch) {
  const int hd = a.head_dim, g_n = a.heads / a.kv_heads;
  const int rows = i1 - i0;
  // a prompt's rows attended together: as many as kHeads holds whole rows' heads of (at least one)
  const int together = kHeads / g_n > 1 ? kHeads / g_n : 1;
  const int64_t ctx = a.ctx_lens[seq], qlen = a.query_lens[seq], past = ctx - qlen;
  const int64_t qs = a.query_starts[seq];
  const int64_t* table = a.tables + static_cast<int64_t>(seq) * a.table_stride;
  const T* kc = static_cast<const T*>(a.k);
  const T* vc = static_cast<const T*>(a.v);
  const int64_t kv_stride = static_cast<int64_t>(a.kv_heads) * hd;  // elements per cache slot
  float* kt = scratch;                                               // [hd][kChunk] gathered keys, transposed
  const T** vrows = reinterpret_cast<const T**>(kt + hd * kChunk);   // kChunk value row pointers
  float* qv = kt + hd * kChunk + 2 * kChunk;                         // [rows][g][hd] scaled queries
  float* acc = qv + rows * g_n * hd;                                 // [rows][g][hd]
  float* mx = acc + rows * g_n * hd;                                 // [rows][g]
  float* sm = mx + rows * g_n;                                       // [rows][g]
  for (int i = 0; i < rows; ++i)
    for (int g = 0; g < g_n; ++g) {
      const float* src = a.q + (qs + i0 + i) * a.ldq + static_cast<int64_t>(kvh * g_n + g) * hd;
      float* dst = qv + (i * g_n + g) * hd;
      for (int d = 0; d < hd; ++d) dst[d] = src[d] * a.scale;
      float* ac = acc + (i * g_n + g) * hd;
      for (int d = 0; d < hd; ++d) ac[d] = 0.0f;
      mx[i * g_n + g] = -__builtin_inff();
      sm[i * g_n + g] = 0.0f;
    }
  const int64_t last = past + i1;  // keys needed by the last row
  const int64_t bs = a.block_size;
  const T* kgroup[kVec];  // block-major: per 16 keys their [hd][bs] transposed keys in the cache
  const float* tgroup[kVec];  // slot-major: ... gathered into kt
  int64_t kstride[kVec];
  for (int64_t p0 = 0; p0 < last; p0 += kChunk) {
    ChunkPrefetch next;  // the next chunk's groups (the next task's first), asked for while this one computes
    if (a.block_major && p0 + kChunk < last) {
      next = chunk_ranges(kc, vc, table, bs, a.kv_heads, kvh, hd, p0 + kChunk, last);
    } else if (a.block_major && after.seq >= 0) {
      const int64_t end = a.ctx_lens[after.seq] - a.query_lens[after.seq] + after.i0 + 1;  // its first row's keys
      next = chunk_ranges(kc, vc, a.tables + static_cast<int64_t>(after.seq) * a.table_stride, bs, a.kv_heads,
                          after.kvh, hd, 0, end);
    }
    const int valid_all = static_cast<int>(last - p0 < kChunk ? last - p0 : kChunk);
    for (int c = 0; c < kVec; ++c) {
      const int n = valid_all - c * kLanes < kLanes ? valid_all - c * kLanes : kLanes;
      const int64_t pos = p0 + c * kLanes;
      if (a.block_major) {  // bs % 16 == 0: the group's keys and values are in one block
        kgroup[c] = nullptr;
        kstride[c] = bs;
        if (n > 0) {
          const int64_t head = table[pos / bs] * a.kv_heads + kvh, off = pos % bs;
          kgroup[c] = kc + head * hd * bs + off;
          for (int j = 0; j < n; ++j) vrows[c * kLanes + j] = vc + (head * bs + off + j) * hd;
        }
        continue;
      }
      tgroup[c] = kt + c * kLanes;
      kstride[c] = kChunk;
      for (int j = 0; j < (n > 0 ? n : 0); ++j) {
        const int64_t slot = table[(pos + j) / bs] * bs + (pos + j) % bs;
        vrows[c * kLanes + j] = vc + slot * kv_stride + static_cast<int64_t>(kvh) * hd;
        const T* krow = kc + slot * kv_stride + static_cast<int64_t>(kvh) * hd;
        for (int d = 0; d < hd; ++d) kt[d * kChunk + c * kLanes + j] = value_at(krow + d);
      }
      for (int j = n > 0 ? n : 0; j < kLanes; ++j)
        for (int d = 0; d < hd; ++d) kt[d * kChunk + c * kLanes + j] = 0.0f;
    }
    bool asked = false;
    for (int i = 0; i < rows;) {
      if (p0 >= past + i0 + i + 1) {  // row i's keys end before this chunk
        ++i;
        continue;
      }
      // rows [i, i + r) together (their query vectors are consecutive), each seeing its own keys
      const int r = rows - i < together ? rows - i : together;
      int vlen[kHeads];
      for (int j = 0; j < r; ++j) {
        const int64_t nk = past + i0 + i + j + 1;
        vlen[j] = static_cast<int>(nk - p0 < kChunk ? nk - p0 : kChunk);
      }
      const int k = i * g_n;
      const ChunkPrefetch* pf = !asked && next.groups > 0 ? &next : nullptr;  // by the first row attending
      asked = true;
      if (a.block_major)
        attend_heads(r * g_n, g_n, qv + k * hd, acc + k * hd, mx + k, sm + k, kgroup, kstride, vrows, vlen, hd, pf);
      else
        attend_heads(r * g_n, g_n, qv + k * hd, acc + k * hd, mx + k, sm + k, tgroup, kstride, vrows, vlen, hd, pf);
      i += r;
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int g = 0; g < g_n; ++g) {
      float* dst = a.out + i * a.ldo + static_cast<int64_t>(g) * hd;
      const float* ac = acc + (i * g_n + g) * hd;
      const float inv = 1.0f / sm[i * g_n + g];
      for (int d = 0; d < hd; ++d) dst[d] = ac[d] * inv;
    }
}

}  // namespace

// One attention task: sequence `seq`, kv head `kvh`, its query rows [i0, i1) (at most 16).
// Keys/values of the sequence's first `ctx` positions are read from the paged cache through its
// block table; query i (position past + i) sees positions 0..past + i. Keys go in chunks of
// kChunk, in groups of 16 ([hd][16] each: in place in a block-major cache, else gathered and
// transposed into `scratch`), scored against the kv head's query heads together (each key and value
// vector loaded once for all of them), with an online softmax per row and head. While its last chunk
// computes it asks for the first keys and values of `next` (the thread's next task; seq < 0: none).
// `scratch` holds at least attention_scratch_floats(hd, group, 16) floats.
void attention(const AttnArgs& a, int seq, int kvh, int i0, int i1, const AttnTask& next, float* scratch) {
  if (a.kv_f16)
    attention_task<uint16_t>(a, seq, kvh, i0, i1, next, scratch);
  else
    attention_task<float>(a, seq, kvh, i0, i1, next, scratch);
}

}  // namespace LLMC_QK_ISA
}  // namespace llmc_qk
