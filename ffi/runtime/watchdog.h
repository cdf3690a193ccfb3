// Host side of the kernels' timeout records (ffi/kernels/common/timeout_record.h),
// shared by the intranode runtime (intranode_runtime.cc) and the NVSHMEM runtime
// (low_latency_runtime.cc): allocating a record, reading a completed one and
// keeping the first message (TimeoutReports), and the watchdog thread that
// polls the records while kernels may be spinning (and once more at exit).
//
// A runtime owns one TimeoutReports and one Watchdog inside its never-
// destroyed registry, guarded by the registry's mutex. The two runtimes live
// in separate Python extension modules, each with its own copy of this code.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>

#include "ffi/kernels/common/timeout_record.h"

namespace jax_ep {

// Allocates a zeroed host-mapped record for kernels on `device` and sets
// *host (before asking for the device pointer: on a throw the caller frees
// what *host holds) and *device_ptr. Throws std::runtime_error.
void AllocTimeoutRecord(int device, TimeoutRecord** host, TimeoutRecord** device_ptr);

// Copies the record at `host` into *out when the device completed it
// (state 2) and *reported is still false; then sets *reported. No CUDA calls.
bool TakeTimeoutRecord(const TimeoutRecord* host, bool* reported, TimeoutRecord* out);

// The timeout messages of one runtime. Every member is called with the
// runtime's mutex held (any() also reads without it).
class TimeoutReports {
 public:
  // Reads a record (TakeTimeoutRecord); when it is newly complete, prints
  // format(record) to stderr and keeps it if it is the first message.
  template <typename Format>
  void Poll(const TimeoutRecord* host, bool* reported, const Format& format) {
    TimeoutRecord rec{};
    if (TakeTimeoutRecord(host, reported, &rec)) Report(format(rec));
  }
  void Report(const std::string& message);
  bool any() const { return any_.load(); }
  // The first message ("" if none).
  const std::string& first() const { return first_; }

 private:
  std::string first_;
  std::atomic<bool> any_{false};
};

// A thread that calls poll() every 50 ms while started. poll takes the
// runtime's mutex and makes no CUDA calls. Never destroy a Watchdog (the
// thread may outlive static destruction): keep it in a leaked registry.
class Watchdog {
 public:
  explicit Watchdog(void (*poll)()) : poll_(poll) {}
  // The first call registers an exit handler (poll once more, then Stop:
  // the thread reads host-mapped memory the CUDA runtime is about to
  // release; call Start after the first CUDA call, so that the handler runs
  // before the runtime's own). Starts the thread unless it runs.
  void Start();
  // Stops and joins the thread; safe when it does not run.
  void Stop();
  // poll() once, then Stop() (the exit handler).
  void PollAndStop();

 private:
  void Loop();

  void (*const poll_)();
  std::once_flag at_exit_once_;
  std::mutex mu_;  // thread_, stop_
  std::condition_variable cv_;
  std::thread* thread_ = nullptr;
  bool stop_ = false;
};

}  // namespace jax_ep
