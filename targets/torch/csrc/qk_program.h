// llmc's native step program: an IR function lowered (targets/torch/native.py) to a list of
// instructions over float32 row buffers, run in one call per step on a persistent thread pool: each
// step's instructions become a plan of parallel regions (qk_pool.h) whose pieces any thread may finish.
// Plain C++ (no torch): the binding (qk_binding.cpp) converts tensors to pointers.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <vector>

#include "qk_common.h"
#include "qk_pool.h"

namespace llmc_qk {

enum class Op : int32_t {
  kEmbed = 0,        // dst = table rows of token ids (quantized table: qweight; float: ftable)
  kRmsNorm = 1,      // dst = rms_norm(a) * vec
  kAddRmsNorm = 2,   // dst1 = a + b; dst = rms_norm(dst1) * vec
  kLinear = 3,       // dst = a @ W.T (int8 activations)
  kRope = 4,         // dst = rope(a) (copied, then rotated)
  kAttention = 5,    // dst = attention(a=q, b=k, c=v); rope applied to q, k first when rope_table >= 0
  kElementwise = 6,  // kind: 0 silu(a), 1 silu(a) * b, 2 a * b, 3 a + b
  kSwiglu = 7,       // dst = silu(a[:, :w]) * a[:, w:]
  kGatherRows = 8,   // dst (output rows) = a[logits_rows]
};

struct View {
  int32_t buf = -1;
  int64_t col = 0;
  int64_t width = 0;
  bool operator==(const View& o) const { return buf == o.buf && col == o.col && width == o.width; }
};

struct Instr {
  Op op = Op::kEmbed;
  View dst, dst1, a, b, c;
  int32_t weight = -1;  // qweight index (kLinear, quantized kEmbed), ftable (float kEmbed) or vec (norms)
  int32_t layer = 0;
  int32_t kind = 0;     // elementwise kind; kEmbed: 1 if float table
  int32_t heads = 0, kv_heads = 0, head_dim = 0, rot = 0, half = 1, rope_table = -1;
  float f = 0.0f;       // eps (norms) or scale (attention)
};

struct StepInput {
  const int64_t* token_ids = nullptr;
  int64_t tokens = 0;
  const int64_t* query_lens = nullptr;
  const int64_t* ctx_lens = nullptr;
  int64_t seqs = 0;
  const int64_t* tables = nullptr;
  int64_t table_stride = 0;
  int64_t block_size = 16;
  const int64_t* logits_rows = nullptr;
  int64_t outputs = 0;
  // Per layer, float32 or (kv_f16) float16 elements: [slots][kv_heads][head_dim] each, or with block_major
  // keys [blocks][kv][hd][block] and values [blocks][kv][block][hd] (AttnArgs).
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  int block_major = 0;
  int kv_f16 = 0;
  int64_t cache_slots = 0;
  float* logits = nullptr;   // [outputs][logits width]
};

class Program : public RegionRunner {
 public:
  int32_t add_buffer(int64_t width, bool output_rows);
  int32_t add_qweight(const QWeight* w) {
    qweights_.push_back(w);
    return static_cast<int32_t>(qweights_.size() - 1);
  }
  int32_t add_vector(std::vector<float> v) {
    vectors_.push_back(std::move(v));
    return static_cast<int32_t>(vectors_.size() - 1);
  }
  int32_t add_rope_table(std::vector<float> cos_t, std::vector<float> sin_t, int64_t half_rot, int64_t positions);
  void add(const Instr& instr) { code_.push_back(instr); }
  void set_logits(View v) { logits_ = v; }
  void set_cache_shape(int layers, int kv_heads, int head_dim) {
    layers_ = layers;
    kv_heads_ = kv_heads;
    head_dim_ = head_dim;
  }
  int64_t logits_width() const { return logits_.width; }
  // Seconds spent in each instruction over the steps run with profiling on.
  void set_profiling(bool on) {
    profiling_ = on;
    profile_.assign(code_.size(), 0.0);
  }
  const std::vector<double>& profile() const { return profile_; }
  int op_of(size_t i) const { return static_cast<int>(code_[i].op); }
  // One step; `threads` sizes the shared pool.
  void run(const StepInput& in, int threads, const OpsTable& ops);

  // RegionRunner: what the step's regions do.
  void compute(const Region& r, int64_t piece, int64_t next, int thread, bool staged) override;
  void commit(const Region& r, int64_t piece, int thread) override;
  void region_done(size_t index) override;

 private:
  struct Buffer {
    int64_t width;
    bool output_rows;
    std::vector<float> data;
    uint64_t version = 0;
  };
  struct ActCache {
    View src;
    uint64_t version = ~0ull;
    uint64_t id = 0;  // new_act_id() of the quantization held
    std::vector<int8_t> q;
    std::vector<ActMeta> meta;
  };
  // A linear group's piece: tiles [g0, g1) of the group's, its members' tiles one after another.
  struct GemmPiece {
    int64_t g0, g1;
  };
  float* ptr(const View& v) { return buffers_[v.buf].data.data() + v.col; }
  int64_t ld(const View& v) const { return buffers_[v.buf].width; }
  int64_t rows_of(const View& v) const { return buffers_[v.buf].output_rows ? step_.outputs : step_.tokens; }
  // The step's input copied into the program (a thread that resumes late may still read it), and
  // positions, cache slots, first rows and attention tasks derived from it.
  void take_input(const StepInput& in);
  // The step's regions, in order, with the buffers' versions and activation caches they imply.
  void build_plan(int threads);
  void plan_rows(int32_t kind, size_t instr, int64_t rows, int64_t serial_below, int threads, bool exclusive = false);
  // Instructions [first, end) are linears of one input (linear_group_end): quantized once, their tiles
  // in one region of pieces of about equal work.
  void plan_linear(size_t first, size_t end, int threads);
  // The end of the run of linears from `first` (at most kMaxGroup) that read the same view, write none
  // of it and each write a buffer of its own.
  size_t linear_group_end(size_t first) const;
  static constexpr size_t kMaxGroup = 8;
  // Rows [r0, r1) of a region of `rows` rows in `pieces` pieces.
  static void piece_rows(const Region& r, int64_t piece, int64_t& r0, int64_t& r1);
  // `thread`'s staging of at least `floats` floats (sized before the step for its largest piece).
  float* staging(int thread, int64_t floats);
  // The staging a piece of region r computes into, in floats (0: it writes its destination directly).
  int64_t stage_floats(const Region& r, int64_t piece) const;
  template <typename Fn>
  void for_piece_members(const Region& r, int64_t piece, Fn&& fn) const;
  void compute_gemm(const Region& r, int64_t piece, int thread, bool staged);
  void commit_gemm(const Region& r, int64_t piece, int thread);
  // An attention region's piece: sequence, kv head and its query rows [i0, i1) (attention tasks).
  struct AttnPiece {
    int64_t seq, kvh, i0, i1;
  };
  AttnPiece attention_piece(const Instr& ins, int64_t piece) const;
  void compute_attention(const Region& r, int64_t piece, int64_t next, int thread, bool staged);
  void commit_attention(const Region& r, int64_t piece, int thread);
  void compute_store(const Region& r, int64_t piece, int thread);
  void commit_store(const Region& r, int64_t piece, int thread);

  std::vector<Buffer> buffers_;
  std::vector<const QWeight*> qweights_;
  std::vector<std::vector<float>> vectors_;
  struct Rope {
    std::vector<float> cos_t, sin_t;
    int64_t half_rot, positions;
  };
  std::vector<Rope> ropes_;
  std::vector<Instr> code_;
  View logits_;
  int layers_ = 0, kv_heads_ = 0, head_dim_ = 0;
  std::vector<ActCache> act_cache_;
  // per step
  StepInput step_;
  const OpsTable* ops_ = nullptr;
  std::vector<int64_t> token_ids_, query_lens_, ctx_lens_, tables_, logits_rows_;
  std::vector<int64_t> positions_, slots_, query_starts_;
  std::vector<int64_t> task_seq_, task_q0_;  // attention tasks: (sequence, first row) per kv head
  std::vector<Region> plan_;
  std::vector<GemmPiece> gemm_pieces_;
  // per thread
  std::vector<std::vector<float>> scratch_;  // attention
  std::vector<std::vector<float>> staging_;
  std::mutex mutex_;  // one step at a time per program
  bool profiling_ = false;
  std::vector<double> profile_;
  std::chrono::steady_clock::time_point clock_;
};

}  // namespace llmc_qk
