// llmc's native thread pool: runs a step's plan of parallel regions so that no thread the OS preempts
// holds the others up.
//
// A region is `pieces` pieces of work, cut into one contiguous run of pieces per thread. A thread runs
// its own run in order (the weights it streams stay one sequence), then takes the last pieces of the
// others' runs; once none is left to take, a thread whose partner's piece has run for longer than it
// should (patience: a few times the pieces' mean) computes that piece too. Each piece computes into the
// running thread's own staging and is then committed, copied to its destination, by the first thread
// that finishes it; a later finisher discards its copy. So a region ends as soon as every piece is
// committed once, whichever threads did them, and a thread that resumes late in a region that has ended
// writes nothing. Whoever commits a region's last piece starts the next: the plan advances without
// waiting for the calling thread, but for its serial regions (below).
// An "exclusive" region's pieces write their destination directly and only their claimer runs them
// (pure copies, where staging would double the bytes moved). A "serial" region is one such piece that
// the calling thread runs, as it would without a pool (its core keeps the small activations, and the
// logits Python reads next, in cache): the thread that ends the region before it hands over to it.
//
// What a piece reads must stay valid and unchanged until its region ends, and what a late thread may
// still read until the step ends: run() returns only once no thread is inside the step.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace llmc_qk {

struct Region {
  int32_t kind = 0;   // the runner's
  int32_t instr = 0;  // the runner's (profiled instruction)
  int64_t pieces = 1;
  bool exclusive = false;
  // A region of one piece is serial: too small to share, run directly by the calling thread (thread 0).
  bool serial() const { return pieces == 1; }
  int64_t a0 = 0, a1 = 0, a2 = 0;  // the runner's parameters
};

// What a plan's regions do, defined by the plan's owner.
class RegionRunner {
 public:
  virtual ~RegionRunner() = default;
  // Piece `piece` of region r on `thread`, into that thread's staging (staged) or its destination
  // (exclusive regions, or a pool of one thread). `next`: the piece this thread runs next (r.pieces: none).
  virtual void compute(const Region& r, int64_t piece, int64_t next, int thread, bool staged) = 0;
  // (`next` is a hint for prefetching: another thread may take it.)
  // Copies `thread`'s staging of `piece` (its last compute) to the piece's destination.
  virtual void commit(const Region& r, int64_t piece, int thread) = 0;
  // Called by the thread that committed region `index`'s last piece, before the next region starts.
  virtual void region_done(size_t index) { (void)index; }
};

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  int size() const { return n_; }
  // Runs the regions in order on every thread of the pool (the caller is thread 0) and returns when the
  // last is committed and no thread is inside any of them. One plan at a time.
  void run(const std::vector<Region>& plan, RegionRunner& runner);

 private:
  struct alignas(64) Run {  // a thread's pieces of a region not yet taken: [front, back), packed in 32 bits each
    std::atomic<uint64_t> span{0};
  };
  struct alignas(64) Slot {  // per region of the running plan
    std::atomic<int64_t> done{0};
    std::atomic<int64_t> mean_ns{0};  // running estimate of a piece's duration
    int64_t first = 0;                // its pieces' state and stamps
  };
  void work(int tid);
  void take_part(int tid);
  void run_region(size_t index, int tid);
  bool try_commit(size_t index, int64_t piece, int tid);
  // The plan goes on at region `index`: thread 0 runs the serial regions from there; the first region
  // that is not serial (or, for another thread, `index` itself) becomes the current one.
  void start_from(size_t index, int tid);
  // A piece of region `index` for thread tid to run: the front of its own run, else the back of another's;
  // -1: none left.
  int64_t take(size_t index, int tid);
  int64_t stealable(size_t index, int64_t now, int64_t patience) const;

  int n_;
  std::mutex running_;  // one plan at a time (programs share the process's pool)
  std::vector<std::thread> threads_;
  std::atomic<uint32_t> generation_{0};  // bumped per plan: wakes the workers
  std::atomic<bool> active_{false};      // a plan is running
  std::atomic<int> inside_{0};           // workers inside the running plan
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::atomic<size_t> current_{0};  // the region being worked
  const std::vector<Region>* plan_ = nullptr;
  RegionRunner* runner_ = nullptr;
  // per-plan storage, resized only while no worker is inside a plan
  std::unique_ptr<Slot[]> slots_;
  std::unique_ptr<Run[]> runs_;  // [region][thread]
  size_t slot_capacity_ = 0;
  std::unique_ptr<std::atomic<uint8_t>[]> state_;  // per piece: 0 open, 1 committing, 2 committed
  std::unique_ptr<std::atomic<int64_t>[]> stamp_;  // per piece: when its latest runner started it (ns)
  int64_t piece_capacity_ = 0;
};

// The least time a piece runs before an idle thread computes it too (the default, kDefaultPatienceNs,
// is far below a scheduler's time slice and above a piece's usual skew between threads). 0 makes every
// idle thread duplicate every open piece at once: tests use it to run the commit races; < 0: the default.
constexpr int64_t kDefaultPatienceNs = 40000;
void set_patience_floor_ns(int64_t ns);

// In this process so far: pieces of pools of more than one thread, and pieces an idle thread computed again
// (their first thread held them past the patience).
struct PoolCounts {
  int64_t pieces, repeated;
};
PoolCounts pool_counts();

// The process's pool of `threads` threads (made on first use, kept for the process; programs share it,
// one plan at a time).
ThreadPool& shared_pool(int threads);

}  // namespace llmc_qk
