// The CPU kernels' one parallel loop: rlk::cpu::parallel_for(begin, end, grain, f).
//
// Why not at::parallel_for: in OpenMP builds of torch, the worker threads of a parallel
// region spin after it ends (libgomp's default wait policy).  On a machine whose cores
// are busy with other processes (a data loader, another job), the next region then
// waits for workers the OS has not scheduled while the spinners burn the time slices:
// measured on the 2-core development machine with one spinning process per core, GAE
// on [256, 1024] took 32 ms on 2 threads against 0.9 ms on 1 (and torch.softmax on the
// same tensor 36 ms against 0.1 ms); with OMP_WAIT_POLICY=PASSIVE, 0.2 ms.  A library
// cannot set that policy (libgomp reads it once, when torch loads), so the kernels run
// their chunks on torch's inter-op thread pool (at::launch), whose threads sleep on a
// condition variable, and the calling thread waits the same way.
//
// Work split: at most at::get_num_threads() chunks (torch.set_num_threads is
// respected), each at least `grain` iterations, so small work never wakes a thread;
// the calling thread takes chunks too.  Nested calls (inside a chunk, or inside an
// OpenMP region) run serially.  An exception in any chunk is rethrown in the caller
// after every chunk has finished.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>

namespace rlk {
namespace cpu {

inline bool& in_chunk() {
  static thread_local bool flag = false;
  return flag;
}

struct ChunkScope {
  bool saved;
  ChunkScope() : saved(in_chunk()) { in_chunk() = true; }
  ~ChunkScope() { in_chunk() = saved; }
};

// How many chunks a loop of n iterations gets: enough threads for the work, never more.
inline int64_t chunk_count(int64_t n, int64_t grain) {
  if (n <= 1 || in_chunk() || at::in_parallel_region()) return 1;
  const int64_t by_work = n / std::max<int64_t>(grain, 1);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_work));
}

template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  const int64_t n = end - begin;
  const int64_t chunks = chunk_count(n, grain);
  if (chunks == 1) {
    ChunkScope scope;
    f(begin, end);
    return;
  }
  // Chunks are claimed from a counter by the caller and by the pool tasks alike: the
  // caller never waits for a chunk that no thread has started (a pool whose threads
  // are busy, or not scheduled, only means the caller does more chunks itself).  The
  // state is shared with the tasks, which may start after the loop has returned and
  // then find nothing left to claim.
  struct Shared {
    std::atomic<int64_t> next{0};
    std::mutex m;
    std::condition_variable done;
    int64_t finished = 0;
    std::exception_ptr error;
  };
  auto shared = std::make_shared<Shared>();
  const int64_t step = (n + chunks - 1) / chunks;
  const F* fn = &f;
  auto work = [shared, fn, begin, end, step, chunks] {
    for (int64_t c = shared->next.fetch_add(1); c < chunks; c = shared->next.fetch_add(1)) {
      try {
        ChunkScope scope;
        const int64_t lo = begin + c * step, hi = std::min(end, lo + step);
        if (lo < hi) (*fn)(lo, hi);
      } catch (...) {
        std::lock_guard<std::mutex> lock(shared->m);
        if (!shared->error) shared->error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(shared->m);
      if (++shared->finished == chunks) shared->done.notify_all();
    }
  };
  for (int64_t c = 1; c < chunks; ++c) at::launch(work);
  work();
  std::unique_lock<std::mutex> lock(shared->m);
  shared->done.wait(lock, [&shared, chunks] { return shared->finished == chunks; });
  if (shared->error) std::rethrow_exception(shared->error);
}

}  // namespace cpu
}  // namespace rlk
