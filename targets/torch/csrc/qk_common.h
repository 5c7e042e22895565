// llmc's CPU kernels for quantized weights x int8-quantized activations: shared declarations.
//
// Weights ("kernel layout"): any group-quantized [out, in] matrix whose values are
//   sym:  scale * (u - zero)        asym: scale * u + offset
// with unsigned codes u (up to 8 bits) and one scale (and offset) per 32 inputs ("sub32") or per
// 16 inputs ("sub16"). Every GGUF block type llmc runs and llmc's own int4/int8 groups decode to
// this form exactly (compiler/ggml_blocks.py). Rows are stored in tiles of 16 interleaved rows so
// that one 512-bit integer dot product (vpdpbusd) computes 4 inputs of 16 rows at once and the
// float accumulators hold 16 rows' outputs: no horizontal sums.
//   codes  : [tiles][blocks][CB]   blocks = in_pad / 32; CB = 256 (4-bit codes), 320 (5-bit), 384 (6-bit)
//            or 512 (8-bit)
//            8-bit: chunk j (0..7) of 64 bytes holds byte (r*4 + i) = u(r, 4j + i)
//            4-bit: chunk j (0..3) of 64 bytes holds byte (r*4 + i) = u(r, 4j + i) | u(r, 16 + 4j + i) << 4
//            5/6-bit: the 4-bit chunks of the low nibbles, then one (5-bit) or two (6-bit) planes of
//            64 bytes: in plane p, bit (r*4 + i) of 64-bit word j (0..7) is bit 4 + p of
//            u(r, k(j, i)), k(j, i) = 4j + i for j < 4, 16 + 4(j - 4) + i after: the bit above the
//            nibble of byte (r*4 + i) of the 8-bit chunk j
//   scales : [tiles][blocks][nsub][16]  (float16 or float32), nsub = 1 (sub32) or 2 (sub16, k 0-15 / 16-31)
//   offsets: like scales (asym only)
// Activations: each input row (a "column" of the product) is quantized per 32 values to int8
// q = round(x / d), d = max|x| / 127, with the sums of q per 16 and per 32 (ActMeta).
// Per block the kernels compute the exact integer sum S = sum u*q and then
//   sym:  acc = fma(float(S - zero * s), scale * d, acc)
//   asym: acc = fma(float(S), scale * d, acc); acc = fma(offset, d * s, acc)
// in this order for every ISA, so the scalar, AVX2 and AVX-512 paths give identical bits.
//
// This header is included by translation units compiled for different ISAs: it declares plain
// structs and functions only (no inline code that the linker could merge across ISAs), but for a few
// integer helpers, which every unit includes before its `#pragma GCC target`.
#pragma once

#include <cstdint>

namespace llmc_qk {

constexpr int kRows = 16;   // rows per tile
constexpr int kBlock = 32;  // inputs per block

struct ActMeta {
  float d;            // scale of the block's int8 values
  float sx;           // d * s
  float sx_half[2];   // d * s_half[h]
  int32_t s;          // sum of the block's 32 values
  int16_t s_half[2];  // sums of values 0-15 and 16-31
};

// The block's meta from its scale and the sums of its values 0-15 (h0) and 16-31 (h1), the same on
// every path (defined in the scalar translation unit: no ISA-specific copy to merge at link time).
ActMeta act_meta(float d, int32_t h0, int32_t h1);

// Bytes of one block of a tile's codes in the layout of `bits`-bit codes (see above).
constexpr int64_t code_block_bytes(int bits) { return bits == 8 ? 512 : 256 + 64 * (bits - 4); }

struct QWeight {
  const uint8_t* codes;
  const void* scales;
  const void* offsets;  // nullptr: symmetric (use zero)
  int64_t out;          // valid rows
  int64_t tiles;        // ceil(out / 16)
  int64_t blocks;       // in_pad / 32
  int code_bits;        // 4, 5, 6 or 8: storage width of a code
  int max_code;         // largest code value (selects the AVX2 dot product)
  int sub16;            // 1: a scale per 16 inputs
  int f16_scales;       // 1: scales/offsets are float16, else float32
  int zero;             // symmetric zero point

  int64_t code_bytes_per_block() const { return code_block_bytes(code_bits); }
  int nsub() const { return sub16 ? 2 : 1; }
  // Bytes of one block's scales and offsets in a tile.
  int64_t scale_bytes_per_block() const { return nsub() * kRows * (f16_scales ? 2 : 4) * (offsets ? 2 : 1); }
  // Bytes of one tile (codes, scales, offsets), its codes `code_bytes` a block.
  int64_t tile_bytes(int64_t code_bytes) const { return blocks * (code_bytes + scale_bytes_per_block()); }
};

struct QAct {
  const int8_t* q;       // [cols][blocks * 32]
  const ActMeta* meta;   // [cols][blocks]
  int64_t cols;
  int64_t blocks;
  uint64_t id;           // new_act_id() of this quantization (the linears of one input share it), 0: none
};

// A process-wide unique id for a fresh quantization of activations (never 0).
uint64_t new_act_id();

// One GEMM call's activations laid out block-major for the ISA kernels: a block's columns sit at fixed
// offsets from one pointer (an unrolled column loop has no address arithmetic left), and each part's
// zero-point correction is an int32 read as it is added.
struct PackedAct {
  const int8_t* q;      // [blocks][cols][32]
  const float* d;       // [blocks][cols]: the block's scale
  const int32_t* corr;  // [blocks][cols][nsub]: shift * the part's sum of q
  const float* sx;      // [blocks][cols][nsub]: d * the part's sum of q (asymmetric weights)
  int64_t cols;
};

// a as PackedAct in the calling thread's buffers (valid until that thread's next call); nsub 2: parts
// are inputs 0-15 and 16-31 (sub16 scales), else the whole block. The linears of one input (same
// a.id) reuse the thread's copy of the values, and its corrections while nsub and shift stay the same.
// Defined, like the buffers' std::vector code, in the scalar translation unit: nothing ISA-specific to
// merge at link time.
PackedAct pack_act(const QAct& a, int nsub, int32_t shift);

// The calling thread's scratch of at least `bytes` (valid until that thread's next call).
uint8_t* thread_scratch(int64_t bytes);

// Computes y[c * ldy + r] for all columns c and the rows of tiles [t0, t1).
using GemmFn = void (*)(const QWeight& w, const QAct& a, int64_t t0, int64_t t1, float* y, int64_t ldy);
// Quantizes columns [c0, c1) of x (row stride ldx, `in` valid values, zero padded to blocks * 32).
using QuantizeFn = void (*)(const float* x, int64_t ldx, int64_t in, int64_t c0, int64_t c1, int64_t blocks,
                            int8_t* q, ActMeta* meta);

void gemm_scalar(const QWeight& w, const QAct& a, int64_t t0, int64_t t1, float* y, int64_t ldy);
void quantize_scalar(const float* x, int64_t ldx, int64_t in, int64_t c0, int64_t c1, int64_t blocks, int8_t* q,
                     ActMeta* meta);
void gemm_avx2(const QWeight& w, const QAct& a, int64_t t0, int64_t t1, float* y, int64_t ldy);
void quantize_avx2(const float* x, int64_t ldx, int64_t in, int64_t c0, int64_t c1, int64_t blocks, int8_t* q,
                   ActMeta* meta);
// qk_avx2.cpp's GEMM with vpdpbusd (AVX-VNNI, 256-bit): the same integer block sums, so the same bits.
void gemm_avxvnni(const QWeight& w, const QAct& a, int64_t t0, int64_t t1, float* y, int64_t ldy);
void gemm_avx512(const QWeight& w, const QAct& a, int64_t t0, int64_t t1, float* y, int64_t ldy);
void quantize_avx512(const float* x, int64_t ldx, int64_t in, int64_t c0, int64_t c1, int64_t blocks, int8_t* q,
                     ActMeta* meta);
// The AVX-512 kernel over columns [c0, a.cols) of activations already packed for w (pack_act(a, w.nsub(),
// symmetric ? -w.zero : 0)): the AMX path's columns past its last full group of 16.
void gemm_avx512_columns(const QWeight& w, const PackedAct& a, int64_t c0, int64_t t0, int64_t t1, float* y,
                         int64_t ldy);
// AMX-INT8 tile multiplies for each full group of 16 columns, the AVX-512 kernel for the rest: the same
// integer block sums, so the same bits. Only called once amx_enable() returned true.
void gemm_amx(const QWeight& w, const QAct& a, int64_t t0, int64_t t1, float* y, int64_t ldy);
// Whether this CPU and its OS run AMX-INT8 tiles, asking the kernel (Linux) for the tile state's permission
// on first use; false on other systems.
bool amx_enable();

// Attention over the paged KV cache (one layer): see attention() in qk_ops.h.
struct AttnArgs {
  const float* q;  // [tokens][heads * head_dim] (after RoPE)
  int64_t ldq;
  float* out;  // the task's output: its row i, query head g of its kv head at out + i * ldo + g * head_dim
  int64_t ldo;
  // This layer's keys and values, float32 or (kv_f16) IEEE float16 elements. Slot-major:
  // [slots][kv_heads][head_dim] both; block-major: keys [blocks][kv_heads][head_dim][block] (each
  // block's keys transposed) and values [blocks][kv_heads][block][head_dim].
  const void* k;
  const void* v;
  int heads, kv_heads, head_dim;
  float scale;
  const int64_t* query_starts;  // per sequence: first row in q / out
  const int64_t* query_lens;
  const int64_t* ctx_lens;  // cached + new positions
  const int64_t* tables;    // [sequences][table_stride] block ids
  int64_t table_stride;
  int64_t block_size;
  int block_major;  // the block-major layout above (block_size a multiple of 16)
  int kv_f16;       // cache elements are float16
};

// One attention task: sequence `seq`, kv head `kvh`, query rows [i0, ...) of the step's rows of `seq`.
struct AttnTask {
  int seq = -1;
  int kvh = 0;
  int i0 = 0;
};

inline int64_t attention_scratch_floats(int head_dim, int group, int rows) {
  return static_cast<int64_t>(head_dim) * 64 + 128 + 2 * static_cast<int64_t>(rows) * group * head_dim +
         2 * static_cast<int64_t>(rows) * group + 16;
}

// The float ops of one ISA (qk_ops.h) and its matmul kernels.
struct OpsTable {
  const char* name;
  GemmFn gemm;
  QuantizeFn quantize;
  void (*rms_norm)(const float* x, int64_t ldx, const float* res, int64_t ldr, const float* w, int64_t n, float eps,
                   float* y, int64_t ldy, float* sum, int64_t lds, int64_t r0, int64_t r1);
  void (*elementwise)(int kind, const float* a, int64_t lda, const float* b, int64_t ldb, float* y, int64_t ldy,
                      int64_t n, int64_t r0, int64_t r1);
  void (*rope)(float* x, int64_t ldx, int heads, int hd, int rot, int half, const float* cos_t, const float* sin_t,
               const int64_t* positions, int64_t r0, int64_t r1);
  // `next`: the task the same thread runs after this one (seq < 0: none), whose first keys and values
  // this one asks for while it computes its last chunk.
  void (*attention)(const AttnArgs& a, int seq, int kvh, int i0, int i1, const AttnTask& next, float* scratch);
  // y[i] = x[i] rounded to float16 (round to nearest even, as vcvtps2ph), i < n: the same bits on every ISA.
  void (*to_half)(const float* x, uint16_t* y, int64_t n);
};

extern const OpsTable ops_scalar;
extern const OpsTable ops_avx2;
extern const OpsTable ops_avxvnni;
extern const OpsTable ops_avx512;
extern const OpsTable ops_amx;

// float16 <-> float32 without F16C (scalar path and layout building).
float half_to_float(uint16_t h);
// float32 -> float16 rounded to nearest even (overflow to inf, NaN kept quiet with its top payload bits):
// the bits F16C's vcvtps2ph gives.
uint16_t float_to_half(float f);

// Value of row r, input k of the layout (for tests and the reference).
float weight_value(const QWeight& w, int64_t r, int64_t k);
// Values of row r, inputs [0, n) (embedding lookups).
void dequantize_row(const QWeight& w, int64_t r, int64_t n, float* out);

}  // namespace llmc_qk
