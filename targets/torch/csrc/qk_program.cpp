// llmc's native step program and its thread pool (qk_program.h).
#include "qk_program.h"

#include <immintrin.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

namespace llmc_qk {
namespace {

constexpr int kSpin = 1 << 14;  // pause loops before a worker sleeps (~0.1-0.5 ms)

void futex_wait(std::atomic<uint32_t>* word, uint32_t value) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, value, nullptr, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}

}  // namespace

ThreadPool::ThreadPool(int threads) : n_(std::max(1, threads)) {
  for (int t = 1; t < n_; ++t) threads_.emplace_back([this, t] { work(t); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  generation_.fetch_add(1);
  futex_wake_all(&generation_);
  for (auto& t : threads_) t.join();
}

void ThreadPool::work(int tid) {
  uint32_t seen = 0;
  for (;;) {
    uint32_t g;
    int spins = 0;
    while ((g = generation_.load(std::memory_order_acquire)) == seen) {
      if (++spins < kSpin) {
        _mm_pause();
        continue;
      }
      sleepers_.fetch_add(1);
      if (generation_.load() == seen) futex_wait(&generation_, seen);
      sleepers_.fetch_sub(1);
      spins = 0;
    }
    seen = g;
    if (stop_.load()) return;
    (*job_)(tid, n_);
    done_.fetch_add(1, std::memory_order_release);
  }
}

void ThreadPool::run(const std::function<void(int, int)>& fn) {
  if (n_ == 1) {
    fn(0, 1);
    return;
  }
  job_ = &fn;
  done_.store(0, std::memory_order_relaxed);
  generation_.fetch_add(1);
  if (sleepers_.load() > 0) futex_wake_all(&generation_);
  fn(0, n_);
  while (done_.load(std::memory_order_acquire) < n_ - 1) _mm_pause();
}

void ThreadPool::parallel_for(int64_t n, int64_t serial_below, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (n_ == 1 || n < serial_below || n == 1) {
    fn(0, n);
    return;
  }
  run([&](int t, int nt) {
    const int64_t b = n * t / nt, e = n * (t + 1) / nt;
    if (b < e) fn(b, e);
  });
}

void ThreadPool::dynamic_for(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn) {
  if (n <= 0) return;
  if (n_ == 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, i + 1, 0);
    return;
  }
  std::atomic<int64_t> counter{0};
  run([&](int t, int) {
    int64_t i = counter.fetch_add(1);
    while (i < n) {  // the thread's next task is claimed before this one runs
      const int64_t next = std::min<int64_t>(counter.fetch_add(1), n);
      fn(i, next, t);
      i = next;
    }
  });
}

ThreadPool& shared_pool(int threads) {
  static std::mutex lock;
  static std::unique_ptr<ThreadPool> pool;
  std::lock_guard<std::mutex> guard(lock);
  if (!pool || pool->size() != std::max(1, threads)) {
    pool.reset();
    pool = std::make_unique<ThreadPool>(threads);
  }
  return *pool;
}

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

void Program::linear(size_t first, size_t end, const StepInput& in, ThreadPool& pool, const OpsTable& ops) {
  const Instr& ins = code_[first];
  const QWeight& w = *qweights_[ins.weight];
  const int64_t rows = rows_of(ins.a, in);
  ActCache& cache = act_cache_[ins.a.buf];
  const Buffer& src = buffers_[ins.a.buf];
  if (cache.version != src.version || !(cache.src == ins.a)) {
    cache.q.resize(static_cast<size_t>(rows * w.blocks * kBlock));
    cache.meta.resize(static_cast<size_t>(rows * w.blocks));
    const float* x = ptr(ins.a);
    const int64_t ldx = ld(ins.a), width = ins.a.width, blocks = w.blocks;
    int8_t* q = cache.q.data();
    ActMeta* meta = cache.meta.data();
    pool.parallel_for(rows, 8, [&](int64_t c0, int64_t c1) { ops.quantize(x, ldx, width, c0, c1, blocks, q, meta); });
    cache.src = ins.a;
    cache.version = src.version;
    cache.id = new_act_id();
  }
  const QAct act{cache.q.data(), cache.meta.data(), rows, w.blocks, cache.id};
  // The group's tiles in one parallel region (one barrier, not one per weight), split by their bytes:
  // weight k's tiles are [start[k], start[k + 1]) of the group's, each costing cost[k].
  const size_t n = end - first;
  int64_t start[kMaxGroup + 1], cost[kMaxGroup];
  start[0] = 0;
  int64_t total = 0;
  for (size_t k = 0; k < n; ++k) {
    const QWeight& wk = *qweights_[code_[first + k].weight];
    cost[k] = wk.tile_bytes(wk.code_bytes_per_block());
    start[k + 1] = start[k] + wk.tiles;
    total += wk.tiles * cost[k];
  }
  // tiles [g0, g1) of the group, in order
  auto run_tiles = [&](int64_t g0, int64_t g1) {
    for (size_t k = 0; k < n; ++k) {
      const int64_t t0 = std::max(g0, start[k]) - start[k], t1 = std::min(g1, start[k + 1]) - start[k];
      if (t0 >= t1) continue;
      const Instr& ik = code_[first + k];
      ops.gemm(*qweights_[ik.weight], act, t0, t1, ptr(ik.dst), ld(ik.dst));
    }
  };
  if (pool.size() == 1 || start[n] * w.blocks * rows < 4096 || start[n] < 2) {  // too small to share
    run_tiles(0, start[n]);
    return;
  }
  pool.run([&](int t, int nt) {
    // the first tile whose cumulative cost reaches t / nt of the total, for t and t + 1
    auto boundary = [&](int part) {
      const int64_t goal = total * part / nt;
      int64_t acc = 0;
      for (size_t k = 0; k < n; ++k) {
        const int64_t span = (start[k + 1] - start[k]) * cost[k];
        if (acc + span >= goal) return start[k] + (goal - acc + cost[k] - 1) / cost[k];
        acc += span;
      }
      return start[n];
    };
    const int64_t g0 = boundary(t), g1 = t + 1 == nt ? start[n] : boundary(t + 1);
    if (g0 < g1) run_tiles(g0, g1);
  });
}

void Program::attention(const Instr& ins, const StepInput& in, ThreadPool& pool, const OpsTable& ops) {
  const int64_t tokens = in.tokens, hd = ins.head_dim, kvh = ins.kv_heads;
  float* q = ptr(ins.a);
  float* k = ptr(ins.b);
  const float* v = ptr(ins.c);
  const int64_t ldq = ld(ins.a), ldk = ld(ins.b), ldv = ld(ins.c);
  if (ins.rope_table >= 0) {
    const Rope& rp = ropes_[ins.rope_table];
    pool.parallel_for(tokens, 64, [&](int64_t r0, int64_t r1) {
      ops.rope(q, ldq, ins.heads, ins.head_dim, ins.rot, ins.half, rp.cos_t.data(), rp.sin_t.data(),
               positions_.data(), r0, r1);
      ops.rope(k, ldk, ins.kv_heads, ins.head_dim, ins.rot, ins.half, rp.cos_t.data(), rp.sin_t.data(),
               positions_.data(), r0, r1);
    });
  }
  const int64_t slot_elems = kvh * hd, layer_elems = static_cast<int64_t>(ins.layer) * in.cache_slots * slot_elems;
  const int64_t elem = in.kv_f16 ? 2 : 4;
  char* kc = static_cast<char*>(in.k_cache) + layer_elems * elem;
  char* vc = static_cast<char*>(in.v_cache) + layer_elems * elem;
  const int64_t bs = in.block_size;
  for (auto& t : key_halves_)
    if (static_cast<int64_t>(t.size()) < hd) t.resize(static_cast<size_t>(hd));
  // Row r's key and value of kv head h into its cache slot (rounded to float16 for a float16 cache).
  auto store = [&](int64_t r, int64_t h, int thread) {
    const int64_t slot = slots_[r], block = slot / bs, off = slot % bs;
    const float* ksrc = k + r * ldk + h * hd;
    const float* vsrc = v + r * ldv + h * hd;
    // values: [slot][kv head][d], or block-major [block][kv head][offset][d]: hd contiguous elements
    char* vdst = vc + (in.block_major ? ((block * kvh + h) * bs + off) * hd : slot * slot_elems + h * hd) * elem;
    if (in.kv_f16)
      ops.to_half(vsrc, reinterpret_cast<uint16_t*>(vdst), hd);
    else
      std::memcpy(vdst, vsrc, sizeof(float) * hd);
    if (!in.block_major) {
      char* kdst = kc + (slot * slot_elems + h * hd) * elem;
      if (in.kv_f16)
        ops.to_half(ksrc, reinterpret_cast<uint16_t*>(kdst), hd);
      else
        std::memcpy(kdst, ksrc, sizeof(float) * hd);
      return;
    }
    // keys transposed within the block: [kv head][d][offset], one element every bs (typed stores: a
    // memcpy of a run-time size per element was a library call each)
    char* kbase = kc + ((block * kvh + h) * hd * bs + off) * elem;
    if (in.kv_f16) {
      uint16_t* halves = key_halves_[thread].data();
      ops.to_half(ksrc, halves, hd);
      uint16_t* kdst = reinterpret_cast<uint16_t*>(kbase);
      for (int64_t d = 0; d < hd; ++d) kdst[d * bs] = halves[d];
    } else {
      float* kdst = reinterpret_cast<float*>(kbase);
      for (int64_t d = 0; d < hd; ++d) kdst[d * bs] = ksrc[d];
    }
  };
  // A sequence of more than 16 new rows has several tasks per kv head, each reading the keys of the
  // rows before its own: its rows are stored first, by every thread. Shorter ones (decode) are
  // stored by their one task, just before it reads them.
  long_rows_.clear();
  for (int64_t s = 0, r = 0; s < in.seqs; r += in.query_lens[s], ++s)
    if (in.query_lens[s] > 16)
      for (int64_t i = 0; i < in.query_lens[s]; ++i) long_rows_.push_back(r + i);
  pool.dynamic_for(static_cast<int64_t>(long_rows_.size()), [&](int64_t i, int64_t, int thread) {
    for (int64_t h = 0; h < kvh; ++h) store(long_rows_[i], h, thread);
  });
  AttnArgs args{q, ldq, ptr(ins.dst), ld(ins.dst), kc, vc, ins.heads, ins.kv_heads, ins.head_dim, ins.f,
                query_starts_.data(), in.query_lens, in.ctx_lens, in.tables, in.table_stride, in.block_size,
                in.block_major, in.kv_f16};
  // tasks: (sequence, kv head, chunk of up to 16 query rows)
  std::vector<int64_t> task_seq, task_q0;
  for (int64_t s = 0; s < in.seqs; ++s)
    for (int64_t i = 0; i < in.query_lens[s]; i += 16) {
      task_seq.push_back(s);
      task_q0.push_back(i);
    }
  const int64_t n_tasks = static_cast<int64_t>(task_seq.size()) * kvh;
  const int group = ins.heads / ins.kv_heads;
  const int64_t need = attention_scratch_floats(ins.head_dim, group, 16);
  for (auto& s : scratch_)
    if (static_cast<int64_t>(s.size()) < need) s.resize(static_cast<size_t>(need));
  pool.dynamic_for(n_tasks, [&](int64_t task, int64_t next, int thread) {
    AttnTask after;  // its first keys and values start on their way from memory while this task ends
    if (next < n_tasks)
      after = AttnTask{static_cast<int>(task_seq[next / kvh]), static_cast<int>(next % kvh),
                       static_cast<int>(task_q0[next / kvh])};
    const int64_t t = task / kvh, h = task % kvh;
    const int64_t s = task_seq[t], i0 = task_q0[t];
    const int64_t i1 = std::min<int64_t>(i0 + 16, in.query_lens[s]);
    if (in.query_lens[s] <= 16)
      for (int64_t i = i0; i < i1; ++i) store(query_starts_[s] + i, h, thread);
    ops.attention(args, static_cast<int>(s), static_cast<int>(h), static_cast<int>(i0), static_cast<int>(i1), after,
                  scratch_[thread].data());
  });
}

void Program::run(const StepInput& in, int threads, const OpsTable& ops) {
  std::lock_guard<std::mutex> guard(mutex_);
  ThreadPool& pool = shared_pool(threads);
  if (static_cast<int>(scratch_.size()) < pool.size()) scratch_.resize(static_cast<size_t>(pool.size()));
  if (static_cast<int>(key_halves_.size()) < pool.size()) key_halves_.resize(static_cast<size_t>(pool.size()));
  // positions, cache slots and each sequence's first row
  positions_.resize(static_cast<size_t>(in.tokens));
  slots_.resize(static_cast<size_t>(in.tokens));
  query_starts_.resize(static_cast<size_t>(in.seqs));
  int64_t row = 0;
  for (int64_t s = 0; s < in.seqs; ++s) {
    query_starts_[s] = row;
    const int64_t past = in.ctx_lens[s] - in.query_lens[s];
    const int64_t* table = in.tables + s * in.table_stride;
    for (int64_t i = 0; i < in.query_lens[s]; ++i, ++row) {
      const int64_t pos = past + i;
      positions_[row] = pos;
      slots_[row] = table[pos / in.block_size] * in.block_size + pos % in.block_size;
    }
  }
  if (row != in.tokens) throw std::invalid_argument("query lengths do not add up to the token count");
  if (!buffers_[logits_.buf].output_rows && in.outputs != in.tokens)  // the copy below writes `tokens` rows
    throw std::invalid_argument("the logits view has a row per token: logits_rows must list every row");
  for (auto& b : buffers_) {
    const int64_t need = (b.output_rows ? in.outputs : in.tokens) * b.width;
    if (static_cast<int64_t>(b.data.size()) < need) b.data.resize(static_cast<size_t>(need));
  }
  auto clock = std::chrono::steady_clock::now();
  for (size_t index = 0; index < code_.size(); ++index) {
    const Instr& ins = code_[index];
    Buffer& out = buffers_[ins.dst.buf];
    const int64_t rows = rows_of(ins.dst, in);
    switch (ins.op) {
      case Op::kEmbed: {
        float* y = ptr(ins.dst);
        const int64_t ldy = ld(ins.dst), width = ins.dst.width;
        if (ins.kind == 1) {
          const float* table = vectors_[ins.weight].data();
          for (int64_t r = 0; r < rows; ++r)
            std::memcpy(y + r * ldy, table + in.token_ids[r] * width, sizeof(float) * width);
        } else {
          const QWeight& w = *qweights_[ins.weight];
          pool.parallel_for(rows, 16, [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) dequantize_row(w, in.token_ids[r], width, y + r * ldy);
          });
        }
        break;
      }
      case Op::kRmsNorm:
      case Op::kAddRmsNorm: {
        const bool add = ins.op == Op::kAddRmsNorm;
        const float* a = ptr(ins.a);
        const float* b = add ? ptr(ins.b) : nullptr;
        float* y = ptr(ins.dst);
        float* sum = add ? ptr(ins.dst1) : nullptr;
        const int64_t lda = ld(ins.a), ldb = add ? ld(ins.b) : 0, ldy = ld(ins.dst), lds = add ? ld(ins.dst1) : 0;
        const float* w = vectors_[ins.weight].data();
        pool.parallel_for(rows, 32, [&](int64_t r0, int64_t r1) {
          ops.rms_norm(a, lda, b, ldb, w, ins.a.width, ins.f, y, ldy, sum, lds, r0, r1);
        });
        if (add) buffers_[ins.dst1.buf].version++;
        break;
      }
      case Op::kLinear: {
        // consecutive linears of one input run as one group (profiled as its last instruction)
        const size_t end = linear_group_end(index);
        linear(index, end, in, pool, ops);
        for (size_t k = index + 1; k < end; ++k) buffers_[code_[k].dst.buf].version++;
        index = end - 1;
        break;
      }
      case Op::kRope: {
        const float* a = ptr(ins.a);
        float* y = ptr(ins.dst);
        const int64_t lda = ld(ins.a), ldy = ld(ins.dst), width = ins.dst.width;
        const Rope& rp = ropes_[ins.rope_table];
        pool.parallel_for(rows, 64, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) std::memcpy(y + r * ldy, a + r * lda, sizeof(float) * width);
          ops.rope(y, ldy, ins.heads, ins.head_dim, ins.rot, ins.half, rp.cos_t.data(), rp.sin_t.data(),
                   positions_.data(), r0, r1);
        });
        break;
      }
      case Op::kAttention:
        attention(ins, in, pool, ops);
        if (ins.rope_table >= 0) {  // q and k were rotated in place
          buffers_[ins.a.buf].version++;
          buffers_[ins.b.buf].version++;
        }
        break;
      case Op::kElementwise:
      case Op::kSwiglu: {
        const bool swiglu = ins.op == Op::kSwiglu;
        const float* a = ptr(ins.a);
        const float* b = swiglu ? a + ins.dst.width : (ins.kind == 0 ? nullptr : ptr(ins.b));
        const int64_t lda = ld(ins.a), ldb = swiglu ? lda : (ins.kind == 0 ? 0 : ld(ins.b));
        float* y = ptr(ins.dst);
        const int64_t ldy = ld(ins.dst);
        const int kind = swiglu ? 1 : ins.kind;
        pool.parallel_for(rows, 32, [&](int64_t r0, int64_t r1) {
          ops.elementwise(kind, a, lda, b, ldb, y, ldy, ins.dst.width, r0, r1);
        });
        break;
      }
      case Op::kGatherRows: {
        const float* a = ptr(ins.a);
        float* y = ptr(ins.dst);
        for (int64_t r = 0; r < in.outputs; ++r) {
          const int64_t src = in.logits_rows[r];
          if (src < 0 || src >= in.tokens) throw std::out_of_range("logits row out of range");
          std::memcpy(y + r * ld(ins.dst), a + src * ld(ins.a), sizeof(float) * ins.dst.width);
        }
        break;
      }
    }
    out.version++;
    if (profiling_) {
      const auto now = std::chrono::steady_clock::now();
      profile_[index] += std::chrono::duration<double>(now - clock).count();
      clock = now;
    }
  }
  const int64_t rows = rows_of(logits_, in);
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(in.logits + r * logits_.width, ptr(logits_) + r * ld(logits_), sizeof(float) * logits_.width);
}

}  // namespace llmc_qk
