// Standalone self-test and timing of the intranode kernels, without JAX: R
// ranks live in one process on one GPU, each with its own comm buffer and
// stream; peers are plain device pointers. Checks dispatch / cached dispatch /
// combine against a CPU model of the docs/design.md §2 semantics (bitwise),
// over several epochs, then times R=1 and R=8 for bandwidth (kernels only).
// Build: cmake target jax_ep_intranode_selftest (-DJAX_EP_SELFTESTS=ON).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "ffi/kernels/intranode/intranode.h"

using namespace jax_ep;

static std::vector<TimeoutRecord*> g_records;
static void DumpRecords() {
  for (size_t r = 0; r < g_records.size(); ++r) {
    volatile TimeoutRecord* t = g_records[r];
    if (t && t->state) {
      std::printf("  timeout record of rank %zu: state %d rank %d op %d what %d peer %d epoch %llu seen %llu\n",
                  r, t->state, t->rank, t->op, t->what, t->peer, (unsigned long long)t->epoch,
                  (unsigned long long)t->seen);
    }
  }
}
#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d: %s\n", #x, __FILE__, __LINE__,                  \
                  cudaGetErrorString(e_));                                                 \
      DumpRecords();                                                                       \
      std::fflush(stdout);                                                                 \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

static int g_failures = 0;
#define EXPECT(cond, ...)                \
  do {                                   \
    if (!(cond)) {                       \
      if (g_failures < 20) {             \
        std::printf("FAIL: " __VA_ARGS__); \
        std::printf("\n");               \
      }                                  \
      ++g_failures;                      \
    }                                    \
  } while (0)

struct Rank {
  uint8_t* buf = nullptr;
  uint8_t** peers = nullptr;
  TimeoutRecord* rec = nullptr;
  int32_t* axis_index = nullptr;  // device int: this rank's index on the EP axis
  cudaStream_t stream = nullptr;
  IntranodeComm comm{};
};

struct World {
  int R;
  std::vector<Rank> ranks;
};

World MakeWorld(int R, size_t data_bytes, int num_blocks) {
  World w;
  w.R = R;
  w.ranks.resize(R);
  std::vector<uint8_t*> bases(R);
  for (int r = 0; r < R; ++r) {
    CK(cudaMalloc(&w.ranks[r].buf, kIntranodeSignalBytes + data_bytes));
    CK(cudaMemset(w.ranks[r].buf, 0, kIntranodeSignalBytes + data_bytes));
    bases[r] = w.ranks[r].buf;
  }
  for (int r = 0; r < R; ++r) {
    Rank& k = w.ranks[r];
    CK(cudaMalloc(&k.peers, R * sizeof(uint8_t*)));
    CK(cudaMemcpy(k.peers, bases.data(), R * sizeof(uint8_t*), cudaMemcpyHostToDevice));
    CK(cudaHostAlloc(&k.rec, sizeof(TimeoutRecord), cudaHostAllocMapped));
    std::memset(k.rec, 0, sizeof(TimeoutRecord));
    TimeoutRecord* drec;
    CK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&drec), k.rec, 0));
    CK(cudaMalloc(&k.axis_index, sizeof(int32_t)));
    CK(cudaMemcpy(k.axis_index, &r, sizeof(int32_t), cudaMemcpyHostToDevice));
    CK(cudaStreamCreateWithFlags(&k.stream, cudaStreamNonBlocking));
    k.comm.peer_bases = k.peers;
    k.comm.local_base = k.buf;
    k.comm.data_bytes = data_bytes;
    k.comm.rank = r;
    k.comm.num_ranks = R;
    k.comm.timeout_record = drec;
    k.comm.timeout_ns = 20ull * 1000 * 1000 * 1000;
    k.comm.num_blocks = num_blocks;
  }
  CK(cudaDeviceSynchronize());
  g_records.clear();
  for (auto& k : w.ranks) g_records.push_back(k.rec);
  return w;
}

void FreeWorld(World& w) {
  CK(cudaDeviceSynchronize());
  for (auto& k : w.ranks) {
    cudaFree(k.buf);
    cudaFree(k.peers);
    cudaFree(k.axis_index);
    cudaFreeHost(k.rec);
    cudaStreamDestroy(k.stream);
  }
}

template <typename T>
T* ToDevice(const std::vector<T>& v) {
  T* d = nullptr;
  CK(cudaMalloc(&d, std::max<size_t>(1, v.size() * sizeof(T))));
  if (!v.empty()) CK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <typename T>
std::vector<T> ToHost(const T* d, size_t n) {
  std::vector<T> v(n);
  if (n) CK(cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

// ---- dtype helpers for combine
float ToF(ElemType dt, const uint8_t* p) {
  switch (dt) {
    case ElemType::kBF16: {
      uint16_t u;
      std::memcpy(&u, p, 2);
      uint32_t b = uint32_t(u) << 16;
      float f;
      std::memcpy(&f, &b, 4);
      return f;
    }
    case ElemType::kF16: {
      __half_raw h;
      std::memcpy(&h.x, p, 2);
      return __half2float(__half(h));
    }
    case ElemType::kF32: {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    case ElemType::kF8E4M3FN: {
      __half_raw h = __nv_cvt_fp8_to_halfraw(*p, __NV_E4M3);
      return __half2float(__half(h));
    }
  }
  return 0;
}
void FromF(ElemType dt, float f, uint8_t* p) {
  switch (dt) {
    case ElemType::kBF16: {
      __nv_bfloat16 b = __float2bfloat16_rn(f);
      std::memcpy(p, &b, 2);
      return;
    }
    case ElemType::kF16: {
      __half h = __float2half_rn(f);
      std::memcpy(p, &h, 2);
      return;
    }
    case ElemType::kF32:
      std::memcpy(p, &f, 4);
      return;
    case ElemType::kF8E4M3FN:
      *p = __nv_cvt_float_to_fp8(f, __NV_NOSAT, __NV_E4M3);
      return;
  }
}

struct Problem {
  int R, T;
  int64_t capacity;
  std::vector<int64_t> row_bytes;  // per part
  // per source rank
  std::vector<std::vector<int32_t>> slot;                 // [s][T*R]
  std::vector<std::vector<int32_t>> sent;                 // [s][R]
  std::vector<std::vector<std::vector<uint8_t>>> pay;     // [s][p][T*rb]
  // derived
  std::vector<int32_t> C;                                 // [R*R]
  std::vector<std::vector<int32_t>> token_slot;           // post-drop [s][T*R]
  std::vector<std::vector<std::vector<uint8_t>>> recv;    // [r][p][cap*rb]
  std::vector<int64_t> num_recv;
  int64_t Off(int s, int r) const {
    int64_t o = 0;
    for (int q = 0; q < s; ++q) o += C[q * R + r];
    return o;
  }
};

Problem MakeProblem(int R, int T, int64_t capacity, const std::vector<int64_t>& row_bytes,
                    double p_send, uint32_t seed) {
  Problem P;
  P.R = R;
  P.T = T;
  P.capacity = capacity;
  P.row_bytes = row_bytes;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> U(0, 1);
  P.slot.assign(R, std::vector<int32_t>(size_t(T) * R, -1));
  P.sent.assign(R, std::vector<int32_t>(R, 0));
  P.pay.resize(R);
  for (int s = 0; s < R; ++s) {
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r)
        if (U(rng) < p_send) P.slot[s][size_t(t) * R + r] = P.sent[s][r]++;
    P.pay[s].resize(row_bytes.size());
    for (size_t p = 0; p < row_bytes.size(); ++p) {
      P.pay[s][p].resize(size_t(T) * row_bytes[p]);
      for (auto& b : P.pay[s][p]) b = uint8_t(rng());
    }
  }
  P.C.assign(size_t(R) * R, 0);
  for (int s = 0; s < R; ++s)
    for (int r = 0; r < R; ++r) P.C[s * R + r] = P.sent[s][r];
  P.token_slot.assign(R, std::vector<int32_t>(size_t(T) * R, -1));
  P.recv.resize(R);
  P.num_recv.assign(R, 0);
  for (int r = 0; r < R; ++r) {
    P.recv[r].resize(row_bytes.size());
    for (size_t p = 0; p < row_bytes.size(); ++p) P.recv[r][p].assign(capacity * row_bytes[p], 0);
    int64_t tot = 0;
    for (int s = 0; s < R; ++s) tot += P.C[s * R + r];
    P.num_recv[r] = std::min(tot, capacity);
  }
  for (int s = 0; s < R; ++s)
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) {
        int32_t j = P.slot[s][size_t(t) * R + r];
        if (j < 0) continue;
        int64_t row = P.Off(s, r) + j;
        if (row >= capacity) continue;
        P.token_slot[s][size_t(t) * R + r] = j;
        for (size_t p = 0; p < row_bytes.size(); ++p)
          std::memcpy(&P.recv[r][p][row * row_bytes[p]], &P.pay[s][p][size_t(t) * row_bytes[p]],
                      row_bytes[p]);
      }
  return P;
}

struct DevProblem {
  std::vector<int32_t*> slot, sent, counts, token_slot;
  std::vector<std::vector<uint8_t*>> pay, recv;
};

DevProblem Upload(const Problem& P) {
  DevProblem D;
  for (int s = 0; s < P.R; ++s) {
    D.slot.push_back(ToDevice(P.slot[s]));
    D.sent.push_back(ToDevice(P.sent[s]));
    D.token_slot.push_back(ToDevice(P.token_slot[s]));
    D.counts.push_back(ToDevice(std::vector<int32_t>(size_t(P.R) * P.R, -123)));
    std::vector<uint8_t*> pp, rr;
    for (size_t p = 0; p < P.row_bytes.size(); ++p) {
      pp.push_back(ToDevice(P.pay[s][p]));
      rr.push_back(ToDevice(std::vector<uint8_t>(P.capacity * P.row_bytes[p], 0xAB)));
    }
    D.pay.push_back(pp);
    D.recv.push_back(rr);
  }
  return D;
}

void FreeDev(DevProblem& D) {
  for (auto* p : D.slot) cudaFree(p);
  for (auto* p : D.sent) cudaFree(p);
  for (auto* p : D.counts) cudaFree(p);
  for (auto* p : D.token_slot) cudaFree(p);
  for (auto& v : D.pay)
    for (auto* p : v) cudaFree(p);
  for (auto& v : D.recv)
    for (auto* p : v) cudaFree(p);
}

void LaunchDispatch(World& w, const Problem& P, DevProblem& D, bool cached, int offset_ptr = 0) {
  for (int phase = 0; phase < 3; ++phase)
  for (int r = 0; r < w.R; ++r) {
    IntranodeDispatchArgs a{};
    a.axis_index = w.ranks[r].axis_index;
    a.slot = cached ? D.token_slot[r] : D.slot[r];
    a.sent = cached ? nullptr : D.sent[r];
    a.rank_counts = D.counts[r];
    a.num_tokens = P.T;
    a.capacity = P.capacity;
    a.num_parts = int(P.row_bytes.size());
    for (size_t p = 0; p < P.row_bytes.size(); ++p) {
      a.parts[p].src = D.pay[r][p] + offset_ptr * 0;
      a.parts[p].dst = D.recv[r][p];
      a.parts[p].row_bytes = P.row_bytes[p];
    }
    cudaError_t e = LaunchIntranodeDispatchPhase(w.ranks[r].comm, a, IntranodePhase(phase),
                                                 w.ranks[r].stream);
    CK(e);
  }
}

void CheckDispatch(const std::string& tag, const Problem& P, DevProblem& D, bool cached) {
  for (int r = 0; r < P.R; ++r) {
    if (!cached) {
      auto c = ToHost(D.counts[r], size_t(P.R) * P.R);
      EXPECT(c == P.C, "%s rank %d rank_counts", tag.c_str(), r);
    }
    for (size_t p = 0; p < P.row_bytes.size(); ++p) {
      auto got = ToHost(D.recv[r][p], P.capacity * P.row_bytes[p]);
      if (got != P.recv[r][p]) {
        int64_t first = -1;
        for (size_t i = 0; i < got.size(); ++i)
          if (got[i] != P.recv[r][p][i]) {
            first = int64_t(i);
            break;
          }
        EXPECT(false, "%s rank %d part %zu: first mismatch at byte %lld (row %lld, num_recv %lld)",
               tag.c_str(), r, p, (long long)first, (long long)(first / P.row_bytes[p]),
               (long long)P.num_recv[r]);
      }
    }
  }
}

void RunCombine(const std::string& tag, World& w, const Problem& P, DevProblem& D,
                ElemType dt, int64_t hidden, uint32_t seed, bool check = true) {
  const int esz = ElemTypeBytes(dt);
  const int64_t rb = hidden * esz;
  std::mt19937 rng(seed);
  std::vector<std::vector<uint8_t>> y(P.R);
  std::vector<uint8_t*> dy(P.R), dout(P.R);
  std::uniform_real_distribution<float> U(-2.f, 2.f);
  for (int r = 0; r < P.R; ++r) {
    y[r].resize(P.capacity * rb);
    for (int64_t i = 0; i < P.capacity * hidden; ++i) {
      float v = U(rng);
      if (rng() % 50 == 0) v = -0.0f;
      FromF(dt, v, &y[r][i * esz]);
    }
    dy[r] = ToDevice(y[r]);
    dout[r] = ToDevice(std::vector<uint8_t>(size_t(P.T) * rb, 0xCD));
  }
  for (int phase = 0; phase < 3; ++phase)
  for (int r = 0; r < P.R; ++r) {
    IntranodeCombineArgs a{};
    a.axis_index = w.ranks[r].axis_index;
    a.y = dy[r];
    a.token_slot = D.token_slot[r];
    a.rank_counts = D.counts[r];  // from the last non-cached dispatch
    a.out = dout[r];
    a.num_tokens = P.T;
    a.capacity = P.capacity;
    a.hidden = hidden;
    a.dtype = dt;
    CK(LaunchIntranodeCombinePhase(w.ranks[r].comm, a, IntranodePhase(phase), w.ranks[r].stream));
  }
  CK(cudaDeviceSynchronize());
  if (check) {
    for (int s = 0; s < P.R; ++s) {
      auto got = ToHost(dout[s], size_t(P.T) * rb);
      std::vector<uint8_t> want(size_t(P.T) * rb);
      for (int t = 0; t < P.T; ++t)
        for (int64_t h = 0; h < hidden; ++h) {
          float acc = 0;
          for (int r = 0; r < P.R; ++r) {
            int32_t j = P.token_slot[s][size_t(t) * P.R + r];
            float term = 0.0f;
            if (j >= 0) term = ToF(dt, &y[r][((P.Off(s, r) + j) * hidden + h) * esz]);
            acc = (r == 0) ? term : acc + term;
          }
          FromF(dt, acc, &want[(size_t(t) * hidden + h) * esz]);
        }
      if (got != want) {
        size_t i = 0;
        while (got[i] == want[i]) ++i;
        EXPECT(false, "%s combine rank %d dtype %d: first mismatch at byte %zu (token %zu)",
               tag.c_str(), s, int(dt), i, i / rb);
      }
    }
  }
  for (int r = 0; r < P.R; ++r) {
    cudaFree(dy[r]);
    cudaFree(dout[r]);
  }
}

void CorrectnessCase(int R, int T, int64_t capacity, std::vector<int64_t> rbs, double p_send,
                     int num_blocks, int iters, int64_t hidden) {
  char tagbuf[256];
  std::snprintf(tagbuf, sizeof(tagbuf), "R=%d T=%d cap=%lld blocks=%d", R, T,
                (long long)capacity, num_blocks);
  const std::string tag = tagbuf;
  int64_t sumrb = 0;
  for (auto b : rbs) sumrb += b;
  const size_t data = std::max<size_t>(capacity * sumrb, size_t(R) * T * hidden * 4);
  World w = MakeWorld(R, data, num_blocks);
  const int fail0 = g_failures;
  for (int it = 0; it < iters; ++it) {
    Problem P = MakeProblem(R, T, capacity, rbs, p_send, 1234 + it * 7 + R);
    DevProblem D = Upload(P);
    LaunchDispatch(w, P, D, false);
    CK(cudaDeviceSynchronize());
    CheckDispatch(tag + " dispatch", P, D, false);
    // cached: clear outputs first
    for (int r = 0; r < R; ++r)
      for (size_t p = 0; p < rbs.size(); ++p)
        CK(cudaMemset(D.recv[r][p], 0x5A, capacity * rbs[p]));
    LaunchDispatch(w, P, D, true);
    CK(cudaDeviceSynchronize());
    CheckDispatch(tag + " cached", P, D, true);
    const ElemType dts[] = {ElemType::kBF16, ElemType::kF16, ElemType::kF32,
                                ElemType::kF8E4M3FN};
    std::printf("  [%s it %d: dispatch+cached ok, combine dtype %d]\n", tag.c_str(), it, it % 4);
    RunCombine(tag, w, P, D, dts[it % 4], hidden, 99 + it);
    if (it == 0) {  // a non-vector hidden too
      RunCombine(tag + " odd-H", w, P, D, ElemType::kBF16, 3, 5);
    }
    FreeDev(D);
  }
  for (int r = 0; r < R; ++r) EXPECT(w.ranks[r].rec->state == 0, "%s timeout record set", tag.c_str());
  std::printf("%-60s %s\n", tag.c_str(), g_failures == fail0 ? "ok" : "FAILED");
  FreeWorld(w);
}

void Bench(int R, int T, int64_t hidden, int num_blocks, double p_send) {
  const int64_t rb = hidden * 2;
  std::vector<int64_t> rbs = {rb, 32, 32};
  const int64_t cap = int64_t(R) * T;
  const size_t data = std::max<size_t>(cap * (rb + 64), size_t(R) * T * rb);
  World w = MakeWorld(R, data, num_blocks);
  Problem P = MakeProblem(R, T, cap, rbs, p_send, 42);
  DevProblem D = Upload(P);
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  auto time_it = [&](auto fn, int iters) {
    for (int i = 0; i < 3; ++i) fn();
    CK(cudaDeviceSynchronize());
    // all ranks' streams join via events on stream 0 of rank 0
    CK(cudaEventRecord(a, w.ranks[0].stream));
    for (int r = 1; r < R; ++r) CK(cudaStreamWaitEvent(w.ranks[r].stream, a));
    for (int i = 0; i < iters; ++i) fn();
    std::vector<cudaEvent_t> ends(R);
    for (int r = 1; r < R; ++r) {
      CK(cudaEventCreate(&ends[r]));
      CK(cudaEventRecord(ends[r], w.ranks[r].stream));
      CK(cudaStreamWaitEvent(w.ranks[0].stream, ends[r]));
    }
    CK(cudaEventRecord(b, w.ranks[0].stream));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    return ms / iters;
  };
  int64_t total_recv = 0, self_rows = 0;
  for (int r = 0; r < R; ++r) {
    total_recv += P.num_recv[r];
    self_rows += P.C[r * R + r];  // a rank's rows for itself move once
  }
  const double payload = double(total_recv) * (rb + 64);
  const double self_payload = double(self_rows) * (rb + 64);
  // HBM bytes: peer rows are read + written twice (into the peer's buffer, then
  // out of it), self rows once; combine also writes one output row per token.
  const double disp_hbm = 4 * (payload - self_payload) + 2 * self_payload;
  float t_disp = time_it([&] { LaunchDispatch(w, P, D, false); }, 20);
  float t_cached = time_it([&] { LaunchDispatch(w, P, D, true); }, 20);
  // combine timing (bf16)
  std::vector<uint8_t*> dy(R), dout(R);
  for (int r = 0; r < R; ++r) {
    CK(cudaMalloc(&dy[r], cap * rb));
    CK(cudaMemset(dy[r], 0, cap * rb));
    CK(cudaMalloc(&dout[r], size_t(T) * rb));
  }
  auto comb = [&] {
    for (int phase = 0; phase < 3; ++phase)
    for (int r = 0; r < R; ++r) {
      IntranodeCombineArgs c{};
      c.axis_index = w.ranks[r].axis_index;
      c.y = dy[r];
      c.token_slot = D.token_slot[r];
      c.rank_counts = D.counts[r];
      c.out = dout[r];
      c.num_tokens = T;
      c.capacity = cap;
      c.hidden = hidden;
      c.dtype = ElemType::kBF16;
      CK(LaunchIntranodeCombinePhase(w.ranks[r].comm, c, IntranodePhase(phase), w.ranks[r].stream));
    }
  };
  float t_comb = time_it(comb, 20);
  // yardstick: D2D memcpy of the payload bytes
  uint8_t *m1, *m2;
  const size_t mbytes = size_t(payload / R);
  CK(cudaMalloc(&m1, mbytes));
  CK(cudaMalloc(&m2, mbytes));
  CK(cudaMemcpy(m2, m1, mbytes, cudaMemcpyDeviceToDevice));
  CK(cudaEventRecord(a, 0));
  for (int i = 0; i < 20; ++i) CK(cudaMemcpyAsync(m2, m1, mbytes, cudaMemcpyDeviceToDevice, 0));
  CK(cudaEventRecord(b, 0));
  CK(cudaEventSynchronize(b));
  float t_copy;
  CK(cudaEventElapsedTime(&t_copy, a, b));
  t_copy /= 20;
  const double comb_bytes = double(total_recv) * rb;
  const double comb_hbm =
      3 * (comb_bytes - double(self_rows) * rb) + double(self_rows) * rb + double(R) * T * rb;
  std::printf(
      "bench R=%d T=%d H=%lld blocks=%d recv_rows=%lld: dispatch %.1f us (%.0f GB/s payload, "
      "%.0f GB/s HBM r+w) | cached %.1f us (%.0f GB/s HBM) | combine %.1f us (%.0f GB/s "
      "payload, %.0f GB/s HBM) | memcpy of %.0f MB: %.1f us (%.0f GB/s r+w)\n",
      R, T, (long long)hidden, w.ranks[0].comm.num_blocks, (long long)total_recv, t_disp * 1e3,
      payload / t_disp / 1e6, disp_hbm / t_disp / 1e6, t_cached * 1e3,
      disp_hbm / t_cached / 1e6, t_comb * 1e3, comb_bytes / t_comb / 1e6,
      comb_hbm / t_comb / 1e6, mbytes / 1e6, t_copy * 1e3, 2.0 * mbytes / t_copy / 1e6);
  for (int r = 0; r < R; ++r) {
    cudaFree(dy[r]);
    cudaFree(dout[r]);
  }
  cudaFree(m1);
  cudaFree(m2);
  FreeDev(D);
  FreeWorld(w);
}

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IONBF, 0);
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  auto blocks_for = [&](int R) { return std::max(8, 2 * sms / R); };
  const bool bench_only = argc > 1 && std::string(argv[1]) == "bench";
  if (argc > 1 && std::string(argv[1]) == "focus") {
    const std::vector<int64_t> rbs = {256, 24, 32, 3};
    CorrectnessCase(2, 300, 150, rbs, 0.6, 2, 2, 40);
    CorrectnessCase(2, 300, 600, rbs, 0.6, 1, 2, 40);
    CorrectnessCase(2, 300, 150, rbs, 0.6, 1, 2, 40);
    return 0;
  }
  if (!bench_only) {
    // parts: a 16-multiple row, 24-byte ids (4-byte path), 32-byte weights,
    // and a 3-byte odd row (byte path).
    const std::vector<int64_t> rbs = {256, 24, 32, 3};
    CorrectnessCase(1, 100, 100, rbs, 0.7, blocks_for(1), 5, 64);
    CorrectnessCase(1, 0, 0, rbs, 0.7, blocks_for(1), 3, 64);
    CorrectnessCase(2, 300, 600, rbs, 0.6, blocks_for(2), 5, 64);
    CorrectnessCase(2, 300, 150, rbs, 0.6, 1, 5, 40);      // drops, one block
    CorrectnessCase(3, 257, 400, rbs, 0.5, blocks_for(3), 5, 136);
    CorrectnessCase(4, 500, 2000, rbs, 0.5, blocks_for(4), 6, 72);
    CorrectnessCase(4, 500, 333, rbs, 0.9, 3, 6, 72);      // heavy drops
    CorrectnessCase(8, 1000, 8000, {1024, 32, 32}, 0.6, blocks_for(8), 5, 1024);
    CorrectnessCase(8, 64, 0, rbs, 0.5, blocks_for(8), 4, 16);   // capacity 0
    CorrectnessCase(8, 64, 64, rbs, 0.02, blocks_for(8), 4, 16); // many ranks receive 0 rows
    CorrectnessCase(33, 40, 33 * 40, rbs, 0.3, blocks_for(33), 4, 24);  // lanes 32+
    CorrectnessCase(64, 20, 64 * 20, rbs, 0.3, blocks_for(64), 4, 24);
    std::printf("correctness: %s (%d failures)\n", g_failures ? "FAILED" : "all ok", g_failures);
  }
  Bench(1, 4096, 7168, blocks_for(1), 1.0);
  Bench(1, 16384, 4096, blocks_for(1), 1.0);
  Bench(1, 4096, 7168, 132, 1.0);
  Bench(8, 4096, 7168, blocks_for(8), 0.6);
  return g_failures ? 1 : 0;
}
