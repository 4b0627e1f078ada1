// parallel_for for the project's CPU kernels: MindSpore runs an ops.Custom kernel on one thread, so a kernel that
// wants the other cores splits its range over this small pool of persistent threads (one per core this process
// may use, or CONFORMER_KERNEL_THREADS, at most kMaxThreads), which spin a moment before they sleep. A caller that
// finds the pool busy (MindSpore may launch two kernels at once), a forked child, or a range below `grain` per
// thread runs on the calling thread alone.
#pragma once

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace conformer {

constexpr int kMaxThreads = 8;
// How long a thread of the pool waits for work (a worker) or for the workers (the caller) before it sleeps. A kernel
// step runs hundreds of short parallel regions back to back; a futex wake-up per region cost 10-13% of nano's train
// step. The spin yields, so a thread of MindSpore's that has work gets the core.
constexpr auto kSpin = std::chrono::microseconds(200);

class Pool {
 public:
  static Pool &instance() {
    static Pool *pool = new Pool();  // never destroyed: its threads may outlive static destruction at exit
    return *pool;
  }

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(begin, end) over [0, n) in up to threads() contiguous chunks of at least `grain` items.
  void run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)> &fn) {
    const int64_t chunks = std::min<int64_t>(threads(), std::max<int64_t>(1, n / std::max<int64_t>(grain, 1)));
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (chunks < 2 || !busy.owns_lock() || getpid() != owner_) {
      fn(0, n);
      return;
    }
    task_ = &fn;
    n_ = n;
    pending_.store(static_cast<int>(chunks - 1), std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      region_.store(((region_.load(std::memory_order_relaxed) >> 8) + 1) << 8 | static_cast<uint64_t>(chunks),
                    std::memory_order_release);
    }
    wake_.notify_all();
    fn(0, n / chunks);
    if (!spin_until([this] { return pending_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [this] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    task_ = nullptr;
  }

 private:
  Pool() : owner_(getpid()) {
    const int threads = std::max(1, std::min(configured_threads(), kMaxThreads));
    for (int index = 1; index < threads; ++index) workers_.emplace_back([this, index] { work(index); });
    for (auto &worker : workers_) worker.detach();
  }

  // CONFORMER_KERNEL_THREADS when set (a positive integer), else the cores this process may use.
  static int configured_threads() {
    if (const char *value = std::getenv("CONFORMER_KERNEL_THREADS")) {
      const int threads = std::atoi(value);
      if (threads > 0) return threads;
    }
    cpu_set_t set;
    return sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
  }

  // Polls `ready` for up to kSpin; false if it is still not ready (the caller then sleeps on a condition variable).
  template <typename Ready>
  static bool spin_until(Ready ready) {
    const auto deadline = std::chrono::steady_clock::now() + kSpin;
    while (!ready()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      sched_yield();
    }
    return true;
  }

  void work(int index) {
    uint64_t seen = 0;
    for (;;) {
      if (!spin_until([&] { return region_.load(std::memory_order_acquire) != seen; })) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return region_.load(std::memory_order_acquire) != seen; });
      }
      seen = region_.load(std::memory_order_acquire);
      // task_ and n_ are read only by a worker the region needs: the caller changes them after that worker is done.
      const int64_t chunks = static_cast<int64_t>(seen & 0xff);
      if (index >= chunks) continue;
      const auto *task = task_;
      const int64_t begin = n_ * index / chunks, end = n_ * (index + 1) / chunks;
      (*task)(begin, end);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mutex_);
        done_.notify_one();
      }
    }
  }

  const pid_t owner_;
  std::vector<std::thread> workers_;
  std::mutex busy_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t, int64_t)> *task_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int> pending_{0};
  std::atomic<uint64_t> region_{0};  // a count of regions run (high bits) and the last one's chunks (low 8 bits)
};

// The number of elements of a tensor of this shape.
inline int64_t elements(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

inline void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)> &fn) {
  Pool::instance().run(n, grain, fn);
}

// Splits [0, n) into chunks(n, grain) fixed chunks and runs fn(chunk, begin, end) for each, in parallel. A kernel that
// reduces keeps one partial result per chunk and adds them in chunk order: the same sum on every run, whichever
// thread finishes first.
inline int64_t chunks(int64_t n, int64_t grain) {
  return std::min<int64_t>(Pool::instance().threads(), std::max<int64_t>(1, n / std::max<int64_t>(grain, 1)));
}

template <typename Fn>
void parallel_chunks(int64_t n, int64_t count, Fn fn) {
  Pool::instance().run(count, 1, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) fn(chunk, n * chunk / count, n * (chunk + 1) / count);
  });
}

}  // namespace conformer
