// parallel_for for the project's CPU kernels: MindSpore runs an ops.Custom kernel on one thread, so a kernel that
// wants the other cores splits its range over this small pool of persistent threads (one per core this process
// may use, at most kMaxThreads). A caller that finds the pool busy (MindSpore may launch two kernels at once), a
// forked child, or a range below `grain` per thread runs on the calling thread alone.
#pragma once

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace conformer {

constexpr int kMaxThreads = 8;

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
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &fn;
      n_ = n;
      chunks_ = chunks;
      pending_ = static_cast<int>(chunks - 1);
      ++generation_;
    }
    wake_.notify_all();
    fn(0, n / chunks);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    task_ = nullptr;
  }

 private:
  Pool() : owner_(getpid()) {
    cpu_set_t set;
    int cores = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    cores = std::max(1, std::min(cores, kMaxThreads));
    for (int index = 1; index < cores; ++index) workers_.emplace_back([this, index] { work(index); });
    for (auto &worker : workers_) worker.detach();
  }

  void work(int index) {
    uint64_t seen = 0;
    for (;;) {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (index >= chunks_) continue;
      const auto *task = task_;
      const int64_t begin = n_ * index / chunks_, end = n_ * (index + 1) / chunks_;
      lock.unlock();
      (*task)(begin, end);
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  const pid_t owner_;
  std::vector<std::thread> workers_;
  std::mutex busy_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t, int64_t)> *task_ = nullptr;
  int64_t n_ = 0, chunks_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
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
