// Timeout records and the watchdog thread (see watchdog.h).
#include "ffi/runtime/watchdog.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <cuda_runtime.h>

#include "ffi/runtime/cuda_check.h"

namespace jax_ep {
namespace {

constexpr auto kWatchdogPeriod = std::chrono::milliseconds(50);

// Watchdogs whose exit handler is registered (one per runtime). Never
// destroyed: read by the exit handler.
struct AtExitList {
  std::mutex mu;
  std::vector<Watchdog*> watchdogs;
};

AtExitList& ExitList() {
  static AtExitList* list = new AtExitList();
  return *list;
}

// At process exit (before the CUDA runtime's own teardown, which was
// registered earlier): report a last timeout and stop every watchdog. No
// CUDA calls.
void RunAtExit() {
  std::vector<Watchdog*> watchdogs;
  {
    std::lock_guard<std::mutex> lock(ExitList().mu);
    watchdogs = ExitList().watchdogs;
  }
  for (auto it = watchdogs.rbegin(); it != watchdogs.rend(); ++it) (*it)->PollAndStop();
}

void RegisterAtExit(Watchdog* watchdog) {
  static std::once_flag once;
  {
    std::lock_guard<std::mutex> lock(ExitList().mu);
    ExitList().watchdogs.push_back(watchdog);
  }
  std::call_once(once, [] { std::atexit(RunAtExit); });
}

}  // namespace

void AllocTimeoutRecord(int device, TimeoutRecord** host, TimeoutRecord** device_ptr) {
  void* record = nullptr;
  CudaCheck(cudaHostAlloc(&record, sizeof(TimeoutRecord),
                          cudaHostAllocMapped | cudaHostAllocPortable),
            device, "cudaHostAlloc(mapped) of the timeout record");
  std::memset(record, 0, sizeof(TimeoutRecord));
  *host = static_cast<TimeoutRecord*>(record);
  void* record_device = nullptr;
  CudaCheck(cudaHostGetDevicePointer(&record_device, record, 0), device,
            "cudaHostGetDevicePointer");
  *device_ptr = static_cast<TimeoutRecord*>(record_device);
}

bool TakeTimeoutRecord(const TimeoutRecord* host, bool* reported, TimeoutRecord* out) {
  if (*reported || host == nullptr) return false;
  const volatile TimeoutRecord* v = host;
  if (v->state != 2) return false;
  std::atomic_thread_fence(std::memory_order_acquire);
  TimeoutRecord rec{};
  rec.state = v->state;
  rec.rank = v->rank;
  rec.op = v->op;
  rec.what = v->what;
  rec.peer = v->peer;
  rec.timeout_ns = v->timeout_ns;
  rec.epoch = v->epoch;
  rec.seen = v->seen;
  for (int i = 0; i < kSignatureWords; ++i) {
    rec.mine[i] = v->mine[i];
    rec.theirs[i] = v->theirs[i];
  }
  *reported = true;
  *out = rec;
  return true;
}

void TimeoutReports::Report(const std::string& message) {
  std::fprintf(stderr, "%s\n", message.c_str());
  std::fflush(stderr);
  if (first_.empty()) {
    first_ = message;
    any_.store(true);
  }
}

void Watchdog::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, kWatchdogPeriod, [&] { return stop_; });
    if (stop_) break;
    lock.unlock();
    poll_();
    lock.lock();
  }
}

void Watchdog::Start() {
  std::call_once(at_exit_once_, [this] { RegisterAtExit(this); });
  std::lock_guard<std::mutex> lock(mu_);
  if (thread_ != nullptr) return;
  stop_ = false;
  thread_ = new std::thread(&Watchdog::Loop, this);
}

void Watchdog::Stop() {
  std::thread* thread = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    thread = thread_;
    thread_ = nullptr;
    stop_ = true;
  }
  cv_.notify_all();
  if (thread != nullptr) {
    thread->join();
    delete thread;
  }
}

void Watchdog::PollAndStop() {
  poll_();
  Stop();
}

}  // namespace jax_ep
