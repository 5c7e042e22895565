// llmc's native step program (qk_program.h): each step's plan of regions and what their pieces do.
#include "qk_program.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

namespace llmc_qk {
namespace {

// What a region of the step does (Region::kind).
enum RegionKind : int32_t {
  kEmbedRows = 0,    // exclusive: rows of the embedding table
  kNormRows,         // rms_norm (and the residual sum)
  kQuantizeRows,     // a linear group's input quantized to int8 (a1: blocks)
  kGemmTiles,        // a linear group's tiles (a0: first instruction, a1: first GemmPiece, a2: act id)
  kRopeRows,         // Op::kRope: copied and rotated
  kRopeQKRows,       // attention's q and k rotated in place
  kStoreRows,        // attention's new keys and values into their cache slots
  kAttentionTasks,   // (sequence, kv head, up to 16 query rows) tasks
  kElementwiseRows,  // Op::kElementwise and Op::kSwiglu
  kGatherRows,       // exclusive: the rows that get logits
  kLogitsRows,       // exclusive: the logits view into the caller's tensor
};

constexpr int64_t kRowsPerPiece = 16;          // rows of a row region's piece, at least (one piece a thread)
constexpr int64_t kGemmUnitsPerPiece = 16384;  // tile x block x column units of a GEMM piece (~30-60 us), at least

void copy_rows(float* dst, int64_t ldd, const float* src, int64_t lds, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * ldd, src + r * lds, sizeof(float) * width);
}

// w's tiles from t0 on, as a weight of its own (every ISA's kernel indexes tiles from the codes, scales
// and offsets it is given).
QWeight tiles_from(const QWeight& w, int64_t t0) {
  QWeight v = w;
  const int64_t esz = w.f16_scales ? 2 : 4, scale_elems = t0 * w.blocks * w.nsub() * kRows;
  v.codes = w.codes + t0 * w.blocks * w.code_bytes_per_block();
  v.scales = static_cast<const char*>(w.scales) + scale_elems * esz;
  if (w.offsets != nullptr) v.offsets = static_cast<const char*>(w.offsets) + scale_elems * esz;
  v.out = w.out - t0 * kRows;
  v.tiles = w.tiles - t0;
  return v;
}

}  // namespace

int32_t Program::add_buffer(int64_t width, bool output_rows) {
  buffers_.push_back(Buffer{width, output_rows, {}, 0});
  act_cache_.emplace_back();
  return static_cast<int32_t>(buffers_.size() - 1);
}

int32_t Program::add_rope_table(std::vector<float> cos_t, std::vector<float> sin_t, int64_t half_rot,
                                int64_t positions) {
  ropes_.push_back(Rope{std::move(cos_t), std::move(sin_t), half_rot, positions});
  return static_cast<int32_t>(ropes_.size() - 1);
}

size_t Program::linear_group_end(size_t first) const {
  const Instr& head = code_[first];
  if (head.dst.buf == head.a.buf) return first + 1;
  size_t end = first + 1;
  for (; end < code_.size() && end < first + kMaxGroup; ++end) {
    const Instr& next = code_[end];
    if (next.op != Op::kLinear || !(next.a == head.a) || next.dst.buf == head.a.buf ||
        qweights_[next.weight]->blocks != qweights_[head.weight]->blocks)
      break;
    bool shared_dst = false;  // members run at once: each writes its own buffer
    for (size_t k = first; k < end; ++k) shared_dst = shared_dst || code_[k].dst.buf == next.dst.buf;
    if (shared_dst) break;
  }
  return end;
}


void Program::piece_rows(const Region& r, int64_t piece, int64_t& r0, int64_t& r1) {
  r0 = r.a0 * piece / r.pieces;
  r1 = r.a0 * (piece + 1) / r.pieces;
}

float* Program::staging(int thread, int64_t floats) {
  std::vector<float>& s = staging_[static_cast<size_t>(thread)];
  if (static_cast<int64_t>(s.size()) < floats) s.resize(static_cast<size_t>(floats));
  return s.data();
}

int64_t Program::stage_floats(const Region& r, int64_t piece) const {
  if (r.exclusive) return 0;
  const Instr& ins = code_[static_cast<size_t>(r.instr)];
  if (r.kind == kGemmTiles) {
    const GemmPiece& gp = gemm_pieces_[static_cast<size_t>(r.a1 + piece)];
    return rows_of(code_[static_cast<size_t>(r.a0)].a) * (gp.g1 - gp.g0) * kRows;
  }
  if (r.kind == kAttentionTasks) {
    const AttnPiece a = attention_piece(ins, piece);
    return (a.i1 - a.i0) * ins.heads * ins.head_dim / ins.kv_heads;
  }
  int64_t r0, r1;
  piece_rows(r, piece, r0, r1);
  const int64_t n = r1 - r0;
  switch (r.kind) {
    case kNormRows:
      return (ins.op == Op::kAddRmsNorm ? 2 : 1) * n * ins.a.width;
    case kQuantizeRows:  // the int8 values (rounded up to whole floats), then the blocks' ActMeta
      return (n * r.a1 * kBlock + 3) / 4 + n * r.a1 * static_cast<int64_t>(sizeof(ActMeta) / sizeof(float));
    case kRopeRows:
    case kElementwiseRows:
      return n * ins.dst.width;
    case kRopeQKRows:
      return n * (ins.heads + ins.kv_heads) * ins.head_dim;
    case kStoreRows:  // staged even when it runs alone (compute_store)
      return (n * ins.kv_heads * 2 * ins.head_dim * (step_.kv_f16 ? 2 : 4) + 3) / 4;
    default:
      return 0;
  }
}

void Program::take_input(const StepInput& in) {
  auto copy = [](std::vector<int64_t>& dst, const int64_t* src, int64_t n) {
    dst.assign(src, src + n);
    return dst.data();
  };
  step_ = in;
  step_.token_ids = copy(token_ids_, in.token_ids, in.tokens);
  step_.query_lens = copy(query_lens_, in.query_lens, in.seqs);
  step_.ctx_lens = copy(ctx_lens_, in.ctx_lens, in.seqs);
  step_.tables = copy(tables_, in.tables, in.seqs * in.table_stride);
  step_.logits_rows = copy(logits_rows_, in.logits_rows, in.outputs);
  int64_t total = 0;
  for (int64_t s = 0; s < in.seqs; ++s) total += in.query_lens[s];
  if (total != in.tokens) throw std::invalid_argument("query lengths do not add up to the token count");
  // positions, cache slots and each sequence's first row
  positions_.resize(static_cast<size_t>(in.tokens));
  slots_.resize(static_cast<size_t>(in.tokens));
  query_starts_.resize(static_cast<size_t>(in.seqs));
  for (int64_t s = 0, row = 0; s < in.seqs; ++s) {
    query_starts_[s] = row;
    const int64_t past = in.ctx_lens[s] - in.query_lens[s];
    const int64_t* table = in.tables + s * in.table_stride;
    for (int64_t i = 0; i < in.query_lens[s]; ++i, ++row) {
      const int64_t pos = past + i;
      positions_[row] = pos;
      slots_[row] = table[pos / in.block_size] * in.block_size + pos % in.block_size;
    }
  }
  if (!buffers_[logits_.buf].output_rows && in.outputs != in.tokens)  // the copy writes `tokens` rows
    throw std::invalid_argument("the logits view has a row per token: logits_rows must list every row");
  for (int64_t r = 0; r < in.outputs; ++r)
    if (in.logits_rows[r] < 0 || in.logits_rows[r] >= in.tokens) throw std::out_of_range("logits row out of range");
  // attention tasks: (sequence, chunk of up to 16 query rows), each for every kv head
  task_seq_.clear();
  task_q0_.clear();
  for (int64_t s = 0; s < in.seqs; ++s)
    for (int64_t i = 0; i < in.query_lens[s]; i += 16) {
      task_seq_.push_back(s);
      task_q0_.push_back(i);
    }
}

void Program::plan_rows(int32_t kind, size_t instr, int64_t rows, int64_t serial_below, int threads, bool exclusive) {
  if (rows <= 0) return;
  Region r;
  r.kind = kind;
  r.instr = static_cast<int32_t>(instr);
  r.exclusive = exclusive;
  r.a0 = rows;
  r.pieces = rows < serial_below || threads == 1 ? 1 : threads * std::max<int64_t>(1, rows / (threads * kRowsPerPiece));
  plan_.push_back(r);
}

void Program::plan_linear(size_t first, size_t end, int threads) {
  const Instr& ins = code_[first];
  const QWeight& w = *qweights_[ins.weight];
  const int64_t rows = rows_of(ins.a);
  if (rows <= 0) return;
  ActCache& cache = act_cache_[ins.a.buf];
  const Buffer& src = buffers_[ins.a.buf];
  if (cache.version != src.version || !(cache.src == ins.a)) {
    // sized here, while no thread runs: a region's pieces never reallocate what another may read
    if (cache.q.size() < static_cast<size_t>(rows * w.blocks * kBlock))
      cache.q.resize(static_cast<size_t>(rows * w.blocks * kBlock));
    if (cache.meta.size() < static_cast<size_t>(rows * w.blocks)) cache.meta.resize(static_cast<size_t>(rows * w.blocks));
    plan_rows(kQuantizeRows, first, rows, 8, threads);  // profiled as the group's first instruction
    plan_.back().a1 = w.blocks;
    cache.src = ins.a;
    cache.version = src.version;
    cache.id = new_act_id();
  }
  // the group's tiles, member after member, cut into pieces of about equal bytes (the weights streamed)
  const size_t n = end - first;
  int64_t tiles = 0, total = 0;
  for (size_t k = 0; k < n; ++k) {
    const QWeight& wk = *qweights_[code_[first + k].weight];
    tiles += wk.tiles;
    total += wk.tiles * wk.tile_bytes(wk.code_bytes_per_block());
  }
  const int64_t units = tiles * w.blocks * rows;
  int64_t want = threads == 1 || units < 4096 || tiles < 2
                     ? 1
                     : threads * std::max<int64_t>(1, units / (threads * kGemmUnitsPerPiece));
  want = std::min(want, tiles);
  Region r;
  r.kind = kGemmTiles;
  r.instr = static_cast<int32_t>(end - 1);  // profiled as the group's last instruction
  r.a0 = static_cast<int64_t>(first);
  r.a1 = static_cast<int64_t>(gemm_pieces_.size());
  r.a2 = static_cast<int64_t>(cache.id);
  // piece p ends at the first tile whose cumulative bytes reach (p + 1) / want of the total
  int64_t start = 0, acc = 0;
  size_t k = 0;
  int64_t k0 = 0;  // the group's first tile of member k
  for (int64_t p = 0; p < want; ++p) {
    int64_t stop = tiles;
    if (p + 1 < want) {
      const int64_t goal = total * (p + 1) / want;
      while (k < n) {
        const QWeight& wk = *qweights_[code_[first + k].weight];
        const int64_t cost = wk.tile_bytes(wk.code_bytes_per_block()), span = wk.tiles * cost;
        if (acc + span >= goal) {
          stop = k0 + (goal - acc + cost - 1) / cost;
          break;
        }
        acc += span;
        k0 += wk.tiles;
        ++k;
      }
    }
    if (stop > start) gemm_pieces_.push_back(GemmPiece{start, stop});
    start = std::max(start, stop);
  }
  r.pieces = static_cast<int64_t>(gemm_pieces_.size()) - r.a1;
  plan_.push_back(r);
}

void Program::build_plan(int threads) {
  plan_.clear();
  gemm_pieces_.clear();
  for (size_t index = 0; index < code_.size(); ++index) {
    const Instr& ins = code_[index];
    Buffer& out = buffers_[ins.dst.buf];
    const int64_t rows = rows_of(ins.dst);
    switch (ins.op) {
      case Op::kEmbed:
        plan_rows(kEmbedRows, index, rows, 16, threads, true);
        break;
      case Op::kRmsNorm:
      case Op::kAddRmsNorm:
        plan_rows(kNormRows, index, rows, 32, threads);
        if (ins.op == Op::kAddRmsNorm) buffers_[ins.dst1.buf].version++;
        break;
      case Op::kLinear: {
        // consecutive linears of one input run as one group (profiled as its last instruction)
        const size_t end = linear_group_end(index);
        plan_linear(index, end, threads);
        for (size_t k = index + 1; k < end; ++k) buffers_[code_[k].dst.buf].version++;
        index = end - 1;
        break;
      }
      case Op::kRope:
        plan_rows(kRopeRows, index, rows, 64, threads);
        break;
      case Op::kAttention: {
        if (ins.rope_table >= 0) plan_rows(kRopeQKRows, index, step_.tokens, 64, threads);
        plan_rows(kStoreRows, index, step_.tokens, 16, threads);
        const int64_t tasks = static_cast<int64_t>(task_seq_.size()) * ins.kv_heads;
        if (tasks > 0) {
          Region r;
          r.kind = kAttentionTasks;
          r.instr = static_cast<int32_t>(index);
          r.pieces = tasks;
          plan_.push_back(r);
        }
        if (ins.rope_table >= 0) {  // q and k were rotated in place
          buffers_[ins.a.buf].version++;
          buffers_[ins.b.buf].version++;
        }
        break;
      }
      case Op::kElementwise:
      case Op::kSwiglu:
        plan_rows(kElementwiseRows, index, rows, 32, threads);
        break;
      case Op::kGatherRows:
        plan_rows(kGatherRows, index, step_.outputs, 1 << 30, threads, true);
        break;
    }
    out.version++;
  }
  const size_t planned = plan_.size();
  plan_rows(kLogitsRows, 0, rows_of(logits_), 16, threads, true);
  if (plan_.size() > planned) plan_.back().instr = -1;  // not an instruction's time
}

void Program::run(const StepInput& in, int threads, const OpsTable& ops) {
  std::lock_guard<std::mutex> guard(mutex_);
  ThreadPool& pool = shared_pool(threads);
  const int nt = pool.size();
  take_input(in);
  ops_ = &ops;
  if (static_cast<int>(staging_.size()) < nt) staging_.resize(static_cast<size_t>(nt));
  if (static_cast<int>(scratch_.size()) < nt) scratch_.resize(static_cast<size_t>(nt));
  for (const Instr& ins : code_)
    if (ins.op == Op::kAttention) {
      const int64_t need = attention_scratch_floats(ins.head_dim, ins.heads / ins.kv_heads, 16);
      for (auto& s : scratch_)
        if (static_cast<int64_t>(s.size()) < need) s.resize(static_cast<size_t>(need));
    }
  for (auto& b : buffers_) {
    const int64_t need = (b.output_rows ? in.outputs : in.tokens) * b.width;
    if (static_cast<int64_t>(b.data.size()) < need) b.data.resize(static_cast<size_t>(need));
  }
  build_plan(nt);
  // every thread's staging sized for the largest piece now, while no thread runs: no piece allocates
  int64_t stage = 0;
  for (const Region& r : plan_)
    for (int64_t p = 0; p < r.pieces; ++p) stage = std::max(stage, stage_floats(r, p));
  for (auto& s : staging_)
    if (static_cast<int64_t>(s.size()) < stage) s.resize(static_cast<size_t>(stage));
  clock_ = std::chrono::steady_clock::now();
  pool.run(plan_, *this);
}

void Program::region_done(size_t index) {
  if (!profiling_) return;
  const auto now = std::chrono::steady_clock::now();
  const int32_t instr = plan_[index].instr;
  if (instr >= 0) profile_[static_cast<size_t>(instr)] += std::chrono::duration<double>(now - clock_).count();
  clock_ = now;
}

void Program::compute(const Region& r, int64_t piece, int64_t next, int thread, bool staged) {
  const OpsTable& ops = *ops_;
  switch (r.kind) {
    case kGemmTiles:
      compute_gemm(r, piece, thread, staged);
      return;
    case kAttentionTasks:
      compute_attention(r, piece, next, thread, staged);
      return;
    case kStoreRows:
      compute_store(r, piece, thread);
      if (!staged) commit_store(r, piece, thread);
      return;
    default:
      break;
  }
  int64_t r0, r1;
  piece_rows(r, piece, r0, r1);
  const int64_t n = r1 - r0;
  if (r.kind == kLogitsRows) {  // exclusive
    copy_rows(step_.logits + r0 * logits_.width, logits_.width, ptr(logits_) + r0 * ld(logits_), ld(logits_), n,
              logits_.width);
    return;
  }
  const Instr& ins = code_[static_cast<size_t>(r.instr)];
  switch (r.kind) {
    case kEmbedRows: {  // exclusive
      float* y = ptr(ins.dst) + r0 * ld(ins.dst);
      const int64_t ldy = ld(ins.dst), width = ins.dst.width;
      const int64_t* ids = step_.token_ids + r0;
      if (ins.kind == 1) {
        const float* table = vectors_[ins.weight].data();
        for (int64_t i = 0; i < n; ++i) std::memcpy(y + i * ldy, table + ids[i] * width, sizeof(float) * width);
      } else {
        const QWeight& w = *qweights_[ins.weight];
        for (int64_t i = 0; i < n; ++i) dequantize_row(w, ids[i], width, y + i * ldy);
      }
      return;
    }
    case kNormRows: {
      const bool add = ins.op == Op::kAddRmsNorm;
      const int64_t width = ins.a.width, lda = ld(ins.a), ldb = add ? ld(ins.b) : 0;
      const float* a = ptr(ins.a) + r0 * lda;
      const float* b = add ? ptr(ins.b) + r0 * ldb : nullptr;
      float *y, *sum = nullptr;
      int64_t ldy, lds = 0;
      if (staged) {
        y = staging(thread, stage_floats(r, piece));
        ldy = width;
        if (add) sum = y + n * width, lds = width;
      } else {
        y = ptr(ins.dst) + r0 * ld(ins.dst), ldy = ld(ins.dst);
        if (add) sum = ptr(ins.dst1) + r0 * ld(ins.dst1), lds = ld(ins.dst1);
      }
      ops.rms_norm(a, lda, b, ldb, vectors_[ins.weight].data(), width, ins.f, y, ldy, sum, lds, 0, n);
      return;
    }
    case kQuantizeRows: {
      const int64_t blocks = r.a1, ldx = ld(ins.a);
      const float* x = ptr(ins.a) + r0 * ldx;
      int8_t* q;
      ActMeta* meta;
      if (staged) {
        const int64_t qfloats = (n * blocks * kBlock + 3) / 4;
        float* s = staging(thread, stage_floats(r, piece));
        q = reinterpret_cast<int8_t*>(s);
        meta = reinterpret_cast<ActMeta*>(s + qfloats);
      } else {
        ActCache& cache = act_cache_[ins.a.buf];
        q = cache.q.data() + r0 * blocks * kBlock;
        meta = cache.meta.data() + r0 * blocks;
      }
      ops.quantize(x, ldx, ins.a.width, 0, n, blocks, q, meta);
      return;
    }
    case kRopeRows: {
      const int64_t width = ins.dst.width, lda = ld(ins.a);
      const Rope& rp = ropes_[ins.rope_table];
      float* y = staged ? staging(thread, stage_floats(r, piece)) : ptr(ins.dst) + r0 * ld(ins.dst);
      const int64_t ldy = staged ? width : ld(ins.dst);
      copy_rows(y, ldy, ptr(ins.a) + r0 * lda, lda, n, width);
      ops.rope(y, ldy, ins.heads, ins.head_dim, ins.rot, ins.half, rp.cos_t.data(), rp.sin_t.data(),
               positions_.data() + r0, 0, n);
      return;
    }
    case kRopeQKRows: {
      const Rope& rp = ropes_[ins.rope_table];
      const int64_t qw = static_cast<int64_t>(ins.heads) * ins.head_dim, kw = static_cast<int64_t>(ins.kv_heads) * ins.head_dim;
      float* q = ptr(ins.a) + r0 * ld(ins.a);
      float* k = ptr(ins.b) + r0 * ld(ins.b);
      int64_t ldq = ld(ins.a), ldk = ld(ins.b);
      if (staged) {
        float* s = staging(thread, stage_floats(r, piece));
        copy_rows(s, qw, q, ldq, n, qw);
        copy_rows(s + n * qw, kw, k, ldk, n, kw);
        q = s, k = s + n * qw, ldq = qw, ldk = kw;
      }
      ops.rope(q, ldq, ins.heads, ins.head_dim, ins.rot, ins.half, rp.cos_t.data(), rp.sin_t.data(),
               positions_.data() + r0, 0, n);
      ops.rope(k, ldk, ins.kv_heads, ins.head_dim, ins.rot, ins.half, rp.cos_t.data(), rp.sin_t.data(),
               positions_.data() + r0, 0, n);
      return;
    }
    case kElementwiseRows: {
      const bool swiglu = ins.op == Op::kSwiglu;
      const int64_t width = ins.dst.width, lda = ld(ins.a);
      const float* a = ptr(ins.a) + r0 * lda;
      const int64_t ldb = swiglu ? lda : (ins.kind == 0 ? 0 : ld(ins.b));
      const float* b = swiglu ? a + width : (ins.kind == 0 ? nullptr : ptr(ins.b) + r0 * ldb);
      float* y = staged ? staging(thread, stage_floats(r, piece)) : ptr(ins.dst) + r0 * ld(ins.dst);
      const int64_t ldy = staged ? width : ld(ins.dst);
      ops.elementwise(swiglu ? 1 : ins.kind, a, lda, b, ldb, y, ldy, width, 0, n);
      return;
    }
    case kGatherRows: {  // exclusive
      const float* a = ptr(ins.a);
      float* y = ptr(ins.dst);
      for (int64_t i = r0; i < r1; ++i)
        std::memcpy(y + i * ld(ins.dst), a + step_.logits_rows[i] * ld(ins.a), sizeof(float) * ins.dst.width);
      return;
    }
    default:
      throw std::logic_error("unknown region kind " + std::to_string(r.kind));
  }
}

void Program::commit(const Region& r, int64_t piece, int thread) {
  switch (r.kind) {
    case kGemmTiles:
      commit_gemm(r, piece, thread);
      return;
    case kAttentionTasks:
      commit_attention(r, piece, thread);
      return;
    case kStoreRows:
      commit_store(r, piece, thread);
      return;
    default:
      break;
  }
  const Instr& ins = code_[static_cast<size_t>(r.instr)];
  int64_t r0, r1;
  piece_rows(r, piece, r0, r1);
  const int64_t n = r1 - r0;
  const float* s = staging_[static_cast<size_t>(thread)].data();
  switch (r.kind) {
    case kNormRows: {
      const int64_t width = ins.a.width;
      copy_rows(ptr(ins.dst) + r0 * ld(ins.dst), ld(ins.dst), s, width, n, width);
      if (ins.op == Op::kAddRmsNorm) copy_rows(ptr(ins.dst1) + r0 * ld(ins.dst1), ld(ins.dst1), s + n * width, width, n, width);
      return;
    }
    case kQuantizeRows: {
      const int64_t blocks = r.a1, qfloats = (n * blocks * kBlock + 3) / 4;
      ActCache& cache = act_cache_[ins.a.buf];
      std::memcpy(cache.q.data() + r0 * blocks * kBlock, s, static_cast<size_t>(n * blocks * kBlock));
      std::memcpy(cache.meta.data() + r0 * blocks, s + qfloats, sizeof(ActMeta) * static_cast<size_t>(n * blocks));
      return;
    }
    case kRopeRows:
    case kElementwiseRows:
      copy_rows(ptr(ins.dst) + r0 * ld(ins.dst), ld(ins.dst), s, ins.dst.width, n, ins.dst.width);
      return;
    case kRopeQKRows: {
      const int64_t qw = static_cast<int64_t>(ins.heads) * ins.head_dim, kw = static_cast<int64_t>(ins.kv_heads) * ins.head_dim;
      copy_rows(ptr(ins.a) + r0 * ld(ins.a), ld(ins.a), s, qw, n, qw);
      copy_rows(ptr(ins.b) + r0 * ld(ins.b), ld(ins.b), s + n * qw, kw, n, kw);
      return;
    }
    default:
      throw std::logic_error("region kind " + std::to_string(r.kind) + " has no staged form");
  }
}

// Member k's tiles [t0, t1) of a linear group's piece, and where they sit in the staging: fn(k, t0, t1, offset).
template <typename Fn>
void Program::for_piece_members(const Region& r, int64_t piece, Fn&& fn) const {
  const size_t first = static_cast<size_t>(r.a0), end = static_cast<size_t>(r.instr) + 1;  // instr: the last member
  const GemmPiece& gp = gemm_pieces_[static_cast<size_t>(r.a1 + piece)];
  const int64_t rows = rows_of(code_[first].a);
  int64_t k0 = 0, offset = 0;
  for (size_t k = first; k < end; ++k) {
    const int64_t mt = qweights_[code_[k].weight]->tiles;
    const int64_t t0 = std::max(gp.g0, k0) - k0, t1 = std::min(gp.g1, k0 + mt) - k0;
    if (t0 < t1) {
      fn(k, t0, t1, offset);
      offset += rows * (t1 - t0) * kRows;
    }
    k0 += mt;
  }
}

void Program::compute_gemm(const Region& r, int64_t piece, int thread, bool staged) {
  const Instr& head = code_[static_cast<size_t>(r.a0)];
  const ActCache& cache = act_cache_[head.a.buf];
  const int64_t rows = rows_of(head.a);
  const QAct act{cache.q.data(), cache.meta.data(), rows, qweights_[head.weight]->blocks, static_cast<uint64_t>(r.a2)};
  const GemmPiece& gp = gemm_pieces_[static_cast<size_t>(r.a1 + piece)];
  float* stage = staged ? staging(thread, stage_floats(r, piece)) : nullptr;
  for_piece_members(r, piece, [&](size_t k, int64_t t0, int64_t t1, int64_t offset) {
    const Instr& ik = code_[k];
    const QWeight& w = *qweights_[ik.weight];
    if (staged)
      ops_->gemm(tiles_from(w, t0), act, 0, t1 - t0, stage + offset, (t1 - t0) * kRows);
    else
      ops_->gemm(w, act, t0, t1, ptr(ik.dst), ld(ik.dst));
  });
}

void Program::commit_gemm(const Region& r, int64_t piece, int thread) {
  const int64_t rows = rows_of(code_[static_cast<size_t>(r.a0)].a);
  const float* stage = staging_[static_cast<size_t>(thread)].data();
  for_piece_members(r, piece, [&](size_t k, int64_t t0, int64_t t1, int64_t offset) {
    const Instr& ik = code_[k];
    const int64_t valid = std::min(qweights_[ik.weight]->out, t1 * kRows) - t0 * kRows;
    copy_rows(ptr(ik.dst) + t0 * kRows, ld(ik.dst), stage + offset, (t1 - t0) * kRows, rows, valid);
  });
}

Program::AttnPiece Program::attention_piece(const Instr& ins, int64_t piece) const {
  const int64_t t = piece / ins.kv_heads, s = task_seq_[t], i0 = task_q0_[t];
  return AttnPiece{s, piece % ins.kv_heads, i0, std::min<int64_t>(i0 + 16, step_.query_lens[s])};
}

void Program::compute_attention(const Region& r, int64_t piece, int64_t next, int thread, bool staged) {
  const Instr& ins = code_[static_cast<size_t>(r.instr)];
  const int64_t kvh = ins.kv_heads, hd = ins.head_dim, group = ins.heads / ins.kv_heads;
  const AttnPiece task = attention_piece(ins, piece);
  const int64_t s = task.seq, h = task.kvh, i0 = task.i0, i1 = task.i1;
  const int64_t elem = step_.kv_f16 ? 2 : 4;
  const int64_t layer_bytes = static_cast<int64_t>(ins.layer) * step_.cache_slots * kvh * hd * elem;
  float* out;
  int64_t ldo;
  if (staged) {
    out = staging(thread, stage_floats(r, piece));
    ldo = group * hd;
  } else {
    out = ptr(ins.dst) + (query_starts_[s] + i0) * ld(ins.dst) + h * group * hd;
    ldo = ld(ins.dst);
  }
  const AttnArgs args{ptr(ins.a), ld(ins.a), out, ldo,
                      static_cast<char*>(step_.k_cache) + layer_bytes, static_cast<char*>(step_.v_cache) + layer_bytes,
                      ins.heads, ins.kv_heads, ins.head_dim, ins.f, query_starts_.data(), step_.query_lens,
                      step_.ctx_lens, step_.tables, step_.table_stride, step_.block_size, step_.block_major,
                      step_.kv_f16};
  AttnTask after;  // its first keys and values start on their way from memory while this task ends
  if (next < r.pieces) {
    const AttnPiece n = attention_piece(ins, next);
    after = AttnTask{static_cast<int>(n.seq), static_cast<int>(n.kvh), static_cast<int>(n.i0)};
  }
  ops_->attention(args, static_cast<int>(s), static_cast<int>(h), static_cast<int>(i0), static_cast<int>(i1), after,
                  scratch_[static_cast<size_t>(thread)].data());
}

void Program::commit_attention(const Region& r, int64_t piece, int thread) {
  const Instr& ins = code_[static_cast<size_t>(r.instr)];
  const int64_t width = static_cast<int64_t>(ins.heads / ins.kv_heads) * ins.head_dim;  // a kv head's queries
  const AttnPiece task = attention_piece(ins, piece);
  copy_rows(ptr(ins.dst) + (query_starts_[task.seq] + task.i0) * ld(ins.dst) + task.kvh * width, ld(ins.dst),
            staging_[static_cast<size_t>(thread)].data(), width, task.i1 - task.i0, width);
}

// Staging per row and kv head: its value, then its key, head_dim cache elements each.
void Program::compute_store(const Region& r, int64_t piece, int thread) {
  const Instr& ins = code_[static_cast<size_t>(r.instr)];
  int64_t r0, r1;
  piece_rows(r, piece, r0, r1);
  const int64_t kvh = ins.kv_heads, hd = ins.head_dim, elem = step_.kv_f16 ? 2 : 4;
  char* s = reinterpret_cast<char*>(staging(thread, stage_floats(r, piece)));
  const float* k = ptr(ins.b);
  const float* v = ptr(ins.c);
  for (int64_t row = r0; row < r1; ++row)
    for (int64_t h = 0; h < kvh; ++h, s += 2 * hd * elem) {
      const float* ksrc = k + row * ld(ins.b) + h * hd;
      const float* vsrc = v + row * ld(ins.c) + h * hd;
      if (step_.kv_f16) {
        ops_->to_half(vsrc, reinterpret_cast<uint16_t*>(s), hd);
        ops_->to_half(ksrc, reinterpret_cast<uint16_t*>(s + hd * elem), hd);
      } else {
        std::memcpy(s, vsrc, sizeof(float) * hd);
        std::memcpy(s + hd * elem, ksrc, sizeof(float) * hd);
      }
    }
}

void Program::commit_store(const Region& r, int64_t piece, int thread) {
  const Instr& ins = code_[static_cast<size_t>(r.instr)];
  int64_t r0, r1;
  piece_rows(r, piece, r0, r1);
  const int64_t kvh = ins.kv_heads, hd = ins.head_dim, elem = step_.kv_f16 ? 2 : 4, bs = step_.block_size;
  const int64_t slot_elems = kvh * hd, layer_elems = static_cast<int64_t>(ins.layer) * step_.cache_slots * slot_elems;
  char* kc = static_cast<char*>(step_.k_cache) + layer_elems * elem;
  char* vc = static_cast<char*>(step_.v_cache) + layer_elems * elem;
  const char* s = reinterpret_cast<const char*>(staging_[static_cast<size_t>(thread)].data());
  for (int64_t row = r0; row < r1; ++row)
    for (int64_t h = 0; h < kvh; ++h, s += 2 * hd * elem) {
      const int64_t slot = slots_[row], block = slot / bs, off = slot % bs;
      // values: [slot][kv head][d], or block-major [block][kv head][offset][d]: hd contiguous elements
      char* vdst = vc + (step_.block_major ? ((block * kvh + h) * bs + off) * hd : slot * slot_elems + h * hd) * elem;
      std::memcpy(vdst, s, static_cast<size_t>(hd * elem));
      const char* key = s + hd * elem;
      if (!step_.block_major) {
        std::memcpy(kc + (slot * slot_elems + h * hd) * elem, key, static_cast<size_t>(hd * elem));
        continue;
      }
      // keys transposed within the block: [kv head][d][offset], one element every bs (typed stores: a
      // memcpy of a run-time size per element was a library call each)
      char* kbase = kc + ((block * kvh + h) * hd * bs + off) * elem;
      if (step_.kv_f16) {
        const uint16_t* src = reinterpret_cast<const uint16_t*>(key);
        uint16_t* kdst = reinterpret_cast<uint16_t*>(kbase);
        for (int64_t d = 0; d < hd; ++d) kdst[d * bs] = src[d];
      } else {
        const float* src = reinterpret_cast<const float*>(key);
        float* kdst = reinterpret_cast<float*>(kbase);
        for (int64_t d = 0; d < hd; ++d) kdst[d * bs] = src[d];
      }
    }
}

}  // namespace llmc_qk
