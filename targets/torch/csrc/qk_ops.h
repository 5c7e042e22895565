// Float32 ops of llmc's native step program (qk_program.cpp): RMSNorm, RoPE, SiLU/SwiGLU and
// causal attention over the paged KV cache. Written as plain loops that the compiler vectorizes;
// this file is included by each ISA translation unit after its `#pragma GCC target`, inside a
// namespace of that ISA (LLMC_QK_ISA), so every ISA gets its own copies and nothing is shared at
// link time. LLMC_QK_MADD(a, b, c) is fma where the ISA has it, else a * b + c.
#ifndef LLMC_QK_ISA
#error "define LLMC_QK_ISA (the namespace) before including qk_ops.h"
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

__attribute__((always_inline)) inline void store16(float* p, f16v v) { __builtin_memcpy(p, &v, sizeof v); }

__attribute__((always_inline)) inline f16v splat(float x) { return f16v{} + x; }

__attribute__((always_inline)) inline f16v exp16(f16v x) {  // exp_f32 on 16 lanes
  const f16v lo = splat(-87.0f), hi = splat(88.0f);
  x = x < lo ? lo : (x > hi ? hi : x);
  const f16v t = x * 1.44269504088896341f;
  const f16v fn = (t + 12582912.0f) - 12582912.0f;
  f16v r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  f16v p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  const i16v n = __builtin_convertvector(fn, i16v);
  const i16v bits = (n + 127) << 23;
  f16v scale;
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

// Tree reductions of 16 values (depth 4 instead of a chain of 15).
inline float max16(const float* v) {
  float a[8];
  for (int i = 0; i < 8; ++i) a[i] = v[i] > v[i + 8] ? v[i] : v[i + 8];
  for (int i = 0; i < 4; ++i) a[i] = a[i] > a[i + 4] ? a[i] : a[i + 4];
  for (int i = 0; i < 2; ++i) a[i] = a[i] > a[i + 2] ? a[i] : a[i + 2];
  return a[0] > a[1] ? a[0] : a[1];
}

inline float sum16(const float* v) {
  float a[8];
  for (int i = 0; i < 8; ++i) a[i] = v[i] + v[i + 8];
  for (int i = 0; i < 4; ++i) a[i] = a[i] + a[i + 4];
  for (int i = 0; i < 2; ++i) a[i] = a[i] + a[i + 2];
  return a[0] + a[1];
}

// ac = ac * alpha + sum_j p[j] * v_j for the chunk's valid keys; NV = hd / 16 (0: any hd).
template <int NV>
inline void accumulate_pv(float* __restrict ac, float alpha, const float* p, const float* const* vrows, int valid,
                          int hd) {
  if (NV > 0) {
    f16v t[NV > 0 ? NV : 1];
    for (int v = 0; v < NV; ++v) t[v] = load16(ac + 16 * v) * alpha;
    for (int j = 0; j < valid; ++j) {
      const float pj = p[j];
      const float* vr = vrows[j];
      for (int v = 0; v < NV; ++v) t[v] += pj * load16(vr + 16 * v);
    }
    for (int v = 0; v < NV; ++v) store16(ac + 16 * v, t[v]);
    return;
  }
  for (int d = 0; d < hd; ++d) ac[d] *= alpha;
  for (int j = 0; j < valid; ++j) {
    const float* __restrict vr = vrows[j];
    const float pj = p[j];
    for (int d = 0; d < hd; ++d) ac[d] = LLMC_QK_MADD(pj, vr[d], ac[d]);
  }
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
    f16v acc = f16v{};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      const f16v v = load16(src + i);
      acc += v * v;
    }
    float part[kLanes];
    store16(part, acc);
    float total = 0.0f;
    for (int j = 0; j < kLanes; ++j) total += part[j];
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
    if (kind == 0) {
      for (int64_t i = 0; i < n; ++i) yr[i] = ar[i] / (1.0f + exp_f32(-ar[i]));
      continue;
    }
    const float* __restrict br = b + r * ldb;
    if (kind == 1) {
      for (int64_t i = 0; i < n; ++i) yr[i] = ar[i] / (1.0f + exp_f32(-ar[i])) * br[i];
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

// One attention task: sequence `seq`, kv head `kvh`, its query rows [i0, i1) (at most 16).
// Keys/values of the sequence's first `ctx` positions are read from the paged cache through its
// block table; query i (position past + i) sees positions 0..past + i. Keys go in chunks of
// kChunk: transposed once into `scratch` ([hd][kChunk]) and scored against every query row and
// head of the task, with an online softmax per row and head. `scratch` holds at least
// attention_scratch_floats(hd, group, 16) floats.
void attention(const AttnArgs& a, int seq, int kvh, int i0, int i1, float* scratch) {
  constexpr int kChunk = 64, kVec = kChunk / kLanes;
  const int hd = a.head_dim, g_n = a.heads / a.kv_heads;
  const int rows = i1 - i0;
  const int64_t ctx = a.ctx_lens[seq], qlen = a.query_lens[seq], past = ctx - qlen;
  const int64_t qs = a.query_starts[seq];
  const int64_t* table = a.tables + static_cast<int64_t>(seq) * a.table_stride;
  const int64_t kv_stride = static_cast<int64_t>(a.kv_heads) * hd;  // floats per cache slot
  float* kt = scratch;                                               // [hd][kChunk] keys, transposed
  const float** vrows = reinterpret_cast<const float**>(kt + hd * kChunk);  // kChunk row pointers
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
  const float* kgroup[kVec];  // per 16 keys: their [hd][stride] transposed keys
  int64_t kstride[kVec];
  for (int64_t p0 = 0; p0 < last; p0 += kChunk) {
    const int valid_all = static_cast<int>(last - p0 < kChunk ? last - p0 : kChunk);
    const bool aligned = bs % kLanes == 0;  // then 16 positions from a multiple of 16 share one block
    for (int c = 0; c < kVec; ++c) {
      const int n = valid_all - c * kLanes < kLanes ? valid_all - c * kLanes : kLanes;
      if (aligned && n > 0) {
        const int64_t pos = p0 + c * kLanes;
        const int64_t slot0 = table[pos / bs] * bs + pos % bs;
        for (int j = 0; j < n; ++j) vrows[c * kLanes + j] = a.v + (slot0 + j) * kv_stride + static_cast<int64_t>(kvh) * hd;
        if (!a.k_block_major)
          for (int j = 0; j < n; ++j) {
            const float* krow = a.k + (slot0 + j) * kv_stride + static_cast<int64_t>(kvh) * hd;
            for (int d = 0; d < hd; ++d) kt[d * kChunk + c * kLanes + j] = krow[d];
          }
      } else {
        for (int j = 0; j < (n > 0 ? n : 0); ++j) {
          const int64_t pos = p0 + c * kLanes + j;
          const int64_t slot = table[pos / bs] * bs + pos % bs;
          vrows[c * kLanes + j] = a.v + slot * kv_stride + static_cast<int64_t>(kvh) * hd;
          if (!a.k_block_major) {
            const float* krow = a.k + slot * kv_stride + static_cast<int64_t>(kvh) * hd;
            for (int d = 0; d < hd; ++d) kt[d * kChunk + c * kLanes + j] = krow[d];
          }
        }
      }
      for (int j = n > 0 ? n : 0; j < kLanes; ++j) {
        vrows[c * kLanes + j] = nullptr;
        if (!a.k_block_major)
          for (int d = 0; d < hd; ++d) kt[d * kChunk + c * kLanes + j] = 0.0f;
      }
    }
    for (int c = 0; c < kVec; ++c) {
      const int64_t pos = p0 + c * kLanes;
      if (!a.k_block_major) {
        kgroup[c] = kt + c * kLanes;
        kstride[c] = kChunk;
      } else if (c * kLanes < valid_all) {  // 16 keys of one block, already [hd][block]
        kgroup[c] = a.k + (table[pos / bs] * kv_stride + static_cast<int64_t>(kvh) * hd) * bs + pos % bs;
        kstride[c] = bs;
      } else {
        kgroup[c] = nullptr;
        kstride[c] = 0;
      }
    }
    for (int i = 0; i < rows; ++i) {
      const int64_t nk = past + i0 + i + 1;
      if (p0 >= nk) continue;
      const int valid = static_cast<int>(nk - p0 < kChunk ? nk - p0 : kChunk);
      for (int g = 0; g < g_n; ++g) {
        const float* q = qv + (i * g_n + g) * hd;
        f16v sv[kVec];
        for (int c = 0; c < kVec; ++c) sv[c] = f16v{};
        const int groups = (valid + kLanes - 1) / kLanes;
        if (groups == kVec) {
          for (int d = 0; d < hd; ++d) {
            const float qd = q[d];
            for (int c = 0; c < kVec; ++c) sv[c] += qd * load16(kgroup[c] + d * kstride[c]);
          }
        } else {
          for (int c = 0; c < groups; ++c)
            for (int d = 0; d < hd; ++d) sv[c] += q[d] * load16(kgroup[c] + d * kstride[c]);
        }
        float sc[kChunk];
        for (int c = 0; c < kVec; ++c) store16(sc + c * kLanes, sv[c]);
        for (int j = valid; j < kChunk; ++j) sc[j] = -__builtin_inff();
        f16v vmax = load16(sc);
        for (int c = 1; c < kVec; ++c) {
          const f16v o = load16(sc + c * kLanes);
          vmax = vmax > o ? vmax : o;
        }
        float lanes[kLanes];
        store16(lanes, vmax);
        const float cmax = max16(lanes);
        const float m = mx[i * g_n + g];
        const float m_new = m > cmax ? m : cmax;
        const float alpha = m == -__builtin_inff() ? 0.0f : exp_f32(m - m_new);
        float p[kChunk];
        f16v vsum = f16v{};
        for (int c = 0; c < kVec; ++c) {
          const f16v e = exp16(load16(sc + c * kLanes) - m_new);
          store16(p + c * kLanes, e);
        }
        for (int j = valid; j < kChunk; ++j) p[j] = 0.0f;
        for (int c = 0; c < kVec; ++c) vsum += load16(p + c * kLanes);
        store16(lanes, vsum);
        sm[i * g_n + g] = sm[i * g_n + g] * alpha + sum16(lanes);
        mx[i * g_n + g] = m_new;
        float* __restrict ac = acc + (i * g_n + g) * hd;
        switch (hd) {
          case 64: accumulate_pv<4>(ac, alpha, p, vrows, valid, hd); break;
          case 128: accumulate_pv<8>(ac, alpha, p, vrows, valid, hd); break;
          default: accumulate_pv<0>(ac, alpha, p, vrows, valid, hd); break;
        }
      }
    }
  }
  for (int i = 0; i < rows; ++i)
    for (int g = 0; g < g_n; ++g) {
      float* dst = a.out + (qs + i0 + i) * a.ldo + static_cast<int64_t>(kvh * g_n + g) * hd;
      const float* ac = acc + (i * g_n + g) * hd;
      const float inv = 1.0f / sm[i * g_n + g];
      for (int d = 0; d < hd; ++d) dst[d] = ac[d] * inv;
    }
}

}  // namespace LLMC_QK_ISA
}  // namespace llmc_qk
