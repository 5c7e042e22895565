// llmc's native thread pool (qk_pool.h).
#include "qk_pool.h"

#include <immintrin.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <mutex>

namespace llmc_qk {
namespace {

constexpr int kSpin = 1 << 14;               // pause loops before an idle worker sleeps (~0.1-0.5 ms)
constexpr int64_t kPatienceMeans = 4;  // a piece is run again after this many times the region's mean piece
std::atomic<int64_t> patience_floor{kDefaultPatienceNs};  // ... and at least this long
std::atomic<int64_t> pieces_run{0}, pieces_repeated{0};

void futex_wait(std::atomic<uint32_t>* word, uint32_t value) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, value, nullptr, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
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
    while ((g = generation_.load()) == seen) {
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
    // Counted in before it looks: run() clears active_ before it waits for inside_ to reach 0 (both
    // sequentially consistent), so a worker either sees the plan still active or is waited for.
    inside_.fetch_add(1);
    if (active_.load()) take_part(tid);
    inside_.fetch_sub(1);
  }
}

void ThreadPool::run(const std::vector<Region>& plan, RegionRunner& runner) {
  if (plan.empty()) return;
  std::lock_guard<std::mutex> guard(running_);
  if (n_ == 1) {
    for (size_t k = 0; k < plan.size(); ++k) {
      const Region& r = plan[k];
      for (int64_t p = 0; p < r.pieces; ++p) runner.compute(r, p, p + 1, 0, false);
      runner.region_done(k);
    }
    return;
  }
  // No worker is inside a plan here (the previous run waited for them), so the storage can change.
  int64_t pieces = 0;
  for (const Region& r : plan) pieces += r.pieces;
  if (slot_capacity_ < plan.size()) {
    slot_capacity_ = std::max(plan.size(), 2 * slot_capacity_);
    slots_.reset(new Slot[slot_capacity_]);
    runs_.reset(new Run[slot_capacity_ * static_cast<size_t>(n_)]);
  }
  if (piece_capacity_ < pieces) {
    piece_capacity_ = std::max(pieces, 2 * piece_capacity_);
    state_.reset(new std::atomic<uint8_t>[piece_capacity_]);
    stamp_.reset(new std::atomic<int64_t>[piece_capacity_]);
  }
  int64_t first = 0;
  for (size_t k = 0; k < plan.size(); ++k) {
    Slot& s = slots_[k];
    s.done.store(0, std::memory_order_relaxed);
    for (int t = 0; t < n_; ++t) {
      const uint64_t front = static_cast<uint64_t>(plan[k].pieces * t / n_);
      const uint64_t back = static_cast<uint64_t>(plan[k].pieces * (t + 1) / n_);
      runs_[k * static_cast<size_t>(n_) + static_cast<size_t>(t)].span.store(front | back << 32,
                                                                            std::memory_order_relaxed);
    }
    s.mean_ns.store(0, std::memory_order_relaxed);
    s.first = first;
    for (int64_t p = 0; p < plan[k].pieces; ++p) {
      state_[first + p].store(0, std::memory_order_relaxed);
      stamp_[first + p].store(0, std::memory_order_relaxed);
    }
    first += plan[k].pieces;
  }
  pieces_run.fetch_add(pieces, std::memory_order_relaxed);
  plan_ = &plan;
  runner_ = &runner;
  current_.store(0);
  active_.store(true);
  generation_.fetch_add(1);
  if (sleepers_.load() > 0) futex_wake_all(&generation_);
  take_part(0);
  active_.store(false);
  // A worker preempted in a region that others finished may still be computing its discarded copy.
  for (int spins = 0; inside_.load() > 0; ++spins) {
    if (spins < kSpin)
      _mm_pause();
    else
      sched_yield();
  }
}

void ThreadPool::take_part(int tid) {
  const size_t regions = plan_->size();
  size_t k = current_.load(std::memory_order_acquire);
  while (k < regions) {
    if (!(*plan_)[k].serial())
      run_region(k, tid);
    else if (tid == 0)
      start_from(k, tid);
    size_t c;
    while ((c = current_.load(std::memory_order_acquire)) == k) _mm_pause();
    k = c;
  }
}

bool ThreadPool::try_commit(size_t index, int64_t piece, int tid) {
  const Region& r = (*plan_)[index];
  Slot& s = slots_[index];
  std::atomic<uint8_t>& state = state_[s.first + piece];
  if (!r.exclusive) {
    uint8_t open = 0;
    if (!state.compare_exchange_strong(open, 1, std::memory_order_acq_rel)) return false;  // done by another
    runner_->commit(r, piece, tid);
  }
  state.store(2, std::memory_order_release);
  if (s.done.fetch_add(1, std::memory_order_acq_rel) + 1 == r.pieces) {
    runner_->region_done(index);
    start_from(index + 1, tid);
  }
  return true;
}

void ThreadPool::start_from(size_t index, int tid) {
  const std::vector<Region>& plan = *plan_;
  size_t k = index;
  for (; tid == 0 && k < plan.size() && plan[k].serial(); ++k) {
    runner_->compute(plan[k], 0, 1, tid, false);
    runner_->region_done(k);
  }
  current_.store(k, std::memory_order_release);
}

int64_t ThreadPool::stealable(size_t index, int64_t now, int64_t patience) const {
  const Region& r = (*plan_)[index];
  const int64_t first = slots_[index].first;
  for (int64_t p = 0; p < r.pieces; ++p) {
    if (state_[first + p].load(std::memory_order_acquire) != 0) continue;
    int64_t started = stamp_[first + p].load(std::memory_order_relaxed);
    if (started == 0) {  // claimed, not yet stamped by its claimer: it starts aging now
      stamp_[first + p].compare_exchange_strong(started, now, std::memory_order_relaxed);
      continue;
    }
    if (now - started > patience) return p;
  }
  return -1;
}

int64_t ThreadPool::take(size_t index, int tid) {
  Run* runs = &runs_[index * static_cast<size_t>(n_)];
  for (int k = 0; k < n_; ++k) {
    const int t = (tid + k) % n_;
    std::atomic<uint64_t>& span = runs[t].span;
    uint64_t v = span.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t front = v & 0xFFFFFFFFu, back = v >> 32;
      if (front >= back) break;
      const uint64_t taken = k == 0 ? (front + 1) | back << 32 : front | (back - 1) << 32;
      if (span.compare_exchange_weak(v, taken, std::memory_order_acq_rel))
        return static_cast<int64_t>(k == 0 ? front : back - 1);
    }
  }
  return -1;
}

void ThreadPool::run_region(size_t index, int tid) {
  const Region& r = (*plan_)[index];
  Slot& s = slots_[index];
  const bool staged = !r.exclusive;
  const std::atomic<uint64_t>& own = runs_[index * static_cast<size_t>(n_) + static_cast<size_t>(tid)].span;
  for (int64_t i; current_.load(std::memory_order_acquire) == index && (i = take(index, tid)) >= 0;) {
    const uint64_t v = own.load(std::memory_order_relaxed);
    const int64_t next = (v & 0xFFFFFFFFu) < (v >> 32) ? static_cast<int64_t>(v & 0xFFFFFFFFu) : r.pieces;
    const int64_t t0 = now_ns();
    stamp_[s.first + i].store(t0, std::memory_order_relaxed);
    runner_->compute(r, i, next, tid, staged);
    const int64_t took = now_ns() - t0, mean = s.mean_ns.load(std::memory_order_relaxed);
    s.mean_ns.store(mean == 0 ? took : (3 * mean + took) / 4, std::memory_order_relaxed);
    try_commit(index, i, tid);
  }
  if (r.exclusive) return;
  // Nothing left to take: run again a piece whose thread has held it too long (preempted, most likely).
  int spins = 0;
  while (s.done.load(std::memory_order_acquire) < r.pieces && current_.load(std::memory_order_acquire) == index) {
    if (++spins < 16) {
      _mm_pause();
      continue;
    }
    spins = 0;
    const int64_t now = now_ns();
    const int64_t floor = patience_floor.load(std::memory_order_relaxed);
    const int64_t patience = floor == 0 ? 0 : std::max(floor, kPatienceMeans * s.mean_ns.load(std::memory_order_relaxed));
    const int64_t p = stealable(index, now, patience);
    if (p < 0) continue;
    stamp_[s.first + p].store(now, std::memory_order_relaxed);
    pieces_repeated.fetch_add(1, std::memory_order_relaxed);
    runner_->compute(r, p, r.pieces, tid, true);
    try_commit(index, p, tid);
  }
}

void set_patience_floor_ns(int64_t ns) { patience_floor.store(ns < 0 ? kDefaultPatienceNs : ns); }

PoolCounts pool_counts() { return PoolCounts{pieces_run.load(), pieces_repeated.load()}; }

ThreadPool& shared_pool(int threads) {
  // One pool per thread count, kept for the process: a program stepping on one while another asks for a
  // different count must not see its pool destroyed under it.
  static std::mutex lock;
  static std::map<int, std::unique_ptr<ThreadPool>> pools;
  std::lock_guard<std::mutex> guard(lock);
  std::unique_ptr<ThreadPool>& pool = pools[std::max(1, threads)];
  if (!pool) pool = std::make_unique<ThreadPool>(threads);
  return *pool;
}

}  // namespace llmc_qk
