// Portable reference path of the int8-activation kernels (qk_common.h): plain C++, no SIMD.
// It runs on any x86-64 CPU and defines the exact arithmetic the SIMD paths reproduce bit for bit.
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "qk_common.h"

namespace llmc_qk {

ActMeta act_meta(float d, int32_t h0, int32_t h1) {
  ActMeta m;
  m.d = d;
  m.s = h0 + h1;
  m.s_half[0] = static_cast<int16_t>(h0);
  m.s_half[1] = static_cast<int16_t>(h1);
  m.sx = d * static_cast<float>(m.s);
  m.sx_half[0] = d * static_cast<float>(h0);
  m.sx_half[1] = d * static_cast<float>(h1);
  return m;
}

uint64_t new_act_id() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

PackedAct pack_act(const QAct& a, int nsub, int32_t shift) {
  struct Packed {
    std::vector<int8_t> q;
    std::vector<float> d, sx;
    std::vector<int32_t> corr;
    uint64_t id = 0;  // the quantization q holds (0: none)
    int nsub = 0;     // ... and the one d, sx and corr were made for, with these
    int32_t shift = 0;
    uint64_t meta_id = 0;
  };
  thread_local Packed p;
  const int64_t n = a.cols * a.blocks;
  const bool copy = a.cols > 1;  // one column's values are block-major already
  if (copy && (a.id == 0 || a.id != p.id)) {
    p.q.resize(static_cast<size_t>(n * kBlock));
    for (int64_t b = 0; b < a.blocks; ++b)
      for (int64_t c = 0; c < a.cols; ++c)
        std::memcpy(&p.q[static_cast<size_t>((b * a.cols + c) * kBlock)], a.q + (c * a.blocks + b) * kBlock,
                    kBlock);
    p.id = a.id;
  }
  if (a.id == 0 || a.id != p.meta_id || nsub != p.nsub || shift != p.shift) {
    p.d.resize(static_cast<size_t>(n));
    p.sx.resize(static_cast<size_t>(n * nsub));
    p.corr.resize(static_cast<size_t>(n * nsub));
    for (int64_t b = 0; b < a.blocks; ++b)
      for (int64_t c = 0; c < a.cols; ++c) {
        const int64_t i = b * a.cols + c;
        const ActMeta& m = a.meta[c * a.blocks + b];
        p.d[static_cast<size_t>(i)] = m.d;
        for (int part = 0; part < nsub; ++part) {
          p.corr[static_cast<size_t>(i * nsub + part)] = shift * (nsub == 2 ? m.s_half[part] : m.s);
          p.sx[static_cast<size_t>(i * nsub + part)] = nsub == 2 ? m.sx_half[part] : m.sx;
        }
      }
    p.meta_id = a.id;
    p.nsub = nsub;
    p.shift = shift;
  }
  return PackedAct{copy ? p.q.data() : a.q, p.d.data(), p.corr.data(), p.sx.data(), a.cols};
}

uint8_t* thread_scratch(int64_t bytes) {
  thread_local std::vector<uint8_t> scratch;
  if (static_cast<int64_t>(scratch.size()) < bytes) scratch.resize(static_cast<size_t>(bytes));
  return scratch.data();
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exp = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t sign = (bits >> 16) & 0x8000u, mag = bits & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((mag >> 13) & 0x3FFu));  // NaN, quiet
  if (mag >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (mag >= 0x38800000u) {  // a normal half: rebias the exponent, round the 13 dropped bits to nearest even
    const uint32_t m = mag - 0x38000000u;
    return static_cast<uint16_t>(sign | ((m + 0xFFFu + ((m >> 13) & 1u)) >> 13));
  }
  // below 2^-14: 0.5 + |f| rounds |f| to a multiple of 2^-24 (the half subnormal step) in the FPU's
  // round-to-nearest-even; the low bits are then the half's code (0x400 = the smallest normal)
  float a, t;
  std::memcpy(&a, &mag, sizeof a);
  volatile float half_one = 0.5f;  // not folded: the addition must round at run time
  t = half_one + a;
  uint32_t tb;
  std::memcpy(&tb, &t, sizeof tb);
  return static_cast<uint16_t>(sign | (tb - 0x3F000000u));
}

namespace {

inline int code_at(const QWeight& w, int64_t t, int64_t b, int r, int k) {
  const uint8_t* p = w.codes + (t * w.blocks + b) * w.code_bytes_per_block();
  if (w.code_bits == 8) return p[(k >> 2) * 64 + r * 4 + (k & 3)];
  const int kk = k & 15;
  const uint8_t byte = p[(kk >> 2) * 64 + r * 4 + (kk & 3)];
  int u = k < 16 ? (byte & 0x0F) : (byte >> 4);
  const int bit = r * 4 + (kk & 3);
  for (int plane = 0; plane < w.code_bits - 4; ++plane)
    u |= ((p[256 + plane * 64 + (k >> 2) * 8 + bit / 8] >> (bit % 8)) & 1) << (4 + plane);
  return u;
}

inline float scale_at(const QWeight& w, const void* base, int64_t t, int64_t b, int h, int r) {
  const int64_t i = ((t * w.blocks + b) * w.nsub() + h) * kRows + r;
  if (w.f16_scales) return half_to_float(static_cast<const uint16_t*>(base)[i]);
  return static_cast<const float*>(base)[i];
}

}  // namespace

float weight_value(const QWeight& w, int64_t row, int64_t k) {
  const int64_t t = row / kRows, b = k / kBlock;
  const int r = static_cast<int>(row % kRows), kk = static_cast<int>(k % kBlock);
  const int h = w.sub16 ? kk / 16 : 0;
  const int u = code_at(w, t, b, r, kk);
  const float s = scale_at(w, w.scales, t, b, h, r);
  if (w.offsets == nullptr) return s * static_cast<float>(u - w.zero);
  return s * static_cast<float>(u) + scale_at(w, w.offsets, t, b, h, r);
}

void dequantize_row(const QWeight& w, int64_t row, int64_t n, float* out) {
  const int64_t t = row / kRows;
  const int r = static_cast<int>(row % kRows);
  for (int64_t b = 0; b < w.blocks; ++b) {
    for (int h = 0; h < w.nsub(); ++h) {
      const float s = scale_at(w, w.scales, t, b, h, r);
      const float o = w.offsets ? scale_at(w, w.offsets, t, b, h, r) : 0.0f;
      const int k0 = w.sub16 ? h * 16 : 0, k1 = w.sub16 ? k0 + 16 : kBlock;
      for (int k = k0; k < k1; ++k) {
        const int64_t i = b * kBlock + k;
        if (i >= n) return;
        const int u = code_at(w, t, b, r, k);
        out[i] = w.offsets ? s * static_cast<float>(u) + o : s * static_cast<float>(u - w.zero);
      }
    }
  }
}

void quantize_scalar(const float* x, int64_t ldx, int64_t in, int64_t c0, int64_t c1, int64_t blocks, int8_t* q,
                     ActMeta* meta) {
  for (int64_t c = c0; c < c1; ++c) {
    const float* xc = x + c * ldx;
    for (int64_t b = 0; b < blocks; ++b) {
      float v[kBlock];
      float amax = 0.0f;
      for (int i = 0; i < kBlock; ++i) {
        const int64_t k = b * kBlock + i;
        v[i] = k < in ? xc[k] : 0.0f;
        const float a = std::fabs(v[i]);
        amax = a > amax ? a : amax;
      }
      const float d = amax / 127.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      int8_t* qb = q + c * blocks * kBlock + b * kBlock;
      int32_t half[2] = {0, 0};
      for (int i = 0; i < kBlock; ++i) {
        const float r = std::nearbyint(v[i] * id);
        const int iv = !(r >= -127.0f) ? -127 : (r > 127.0f ? 127 : static_cast<int>(r));
        qb[i] = static_cast<int8_t>(iv);
        half[i / 16] += iv;
      }
      meta[c * blocks + b] = act_meta(d, half[0], half[1]);
    }
  }
}

void gemm_scalar(const QWeight& w, const QAct& a, int64_t t0, int64_t t1, float* y, int64_t ldy) {
  const bool sym = w.offsets == nullptr;
  for (int64_t t = t0; t < t1; ++t) {
    const int valid = static_cast<int>(w.out - t * kRows < kRows ? w.out - t * kRows : kRows);
    for (int64_t c = 0; c < a.cols; ++c) {
      const int8_t* qc = a.q + c * a.blocks * kBlock;
      const ActMeta* mc = a.meta + c * a.blocks;
      for (int r = 0; r < valid; ++r) {
        float acc = 0.0f;
        for (int64_t b = 0; b < w.blocks; ++b) {
          const int8_t* qb = qc + b * kBlock;
          const ActMeta& m = mc[b];
          int32_t dot[2] = {0, 0};
          for (int k = 0; k < kBlock; ++k) dot[k / 16] += code_at(w, t, b, r, k) * qb[k];
          if (!w.sub16) {
            const float sd = scale_at(w, w.scales, t, b, 0, r) * m.d;
            if (sym) {
              acc = std::fma(static_cast<float>(dot[0] + dot[1] - w.zero * m.s), sd, acc);
            } else {
              acc = std::fma(static_cast<float>(dot[0] + dot[1]), sd, acc);
              acc = std::fma(scale_at(w, w.offsets, t, b, 0, r), m.sx, acc);
            }
          } else {
            for (int h = 0; h < 2; ++h) {
              const float sd = scale_at(w, w.scales, t, b, h, r) * m.d;
              if (sym) {
                acc = std::fma(static_cast<float>(dot[h] - w.zero * m.s_half[h]), sd, acc);
              } else {
                acc = std::fma(static_cast<float>(dot[h]), sd, acc);
                acc = std::fma(scale_at(w, w.offsets, t, b, h, r), m.sx_half[h], acc);
              }
            }
          }
        }
        y[c * ldy + t * kRows + r] = acc;
      }
    }
  }
}

}  // namespace llmc_qk

#define LLMC_QK_ISA scalar
#define LLMC_QK_SIMD 0
#define LLMC_QK_MADD(a, b, c) ((a) * (b) + (c))
#include "qk_ops.h"

namespace llmc_qk {
const OpsTable ops_scalar = {"scalar", gemm_scalar, quantize_scalar, scalar::rms_norm, scalar::elementwise, scalar::rope,
                             scalar::attention, scalar::to_half};
}  // namespace llmc_qk
