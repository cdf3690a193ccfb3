// Low-latency region layout, row strides and the checks that a call fits
// the allocated region (host code; the layout is drawn in
// low_latency/device.cuh).
#include <algorithm>

#include "ffi/kernels/low_latency/low_latency.h"

namespace jax_ep {
namespace {

int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

bool ValidComm(const LLComm& c) {
  return c.base != nullptr && c.peer_base != nullptr && c.num_ranks >= 1 &&
         c.num_ranks <= kLLMaxRanks && c.rank >= 0 && c.rank < c.num_ranks &&
         c.num_blocks >= 1 && c.layout.num_ranks == c.num_ranks;
}

}  // namespace

// ------------------------------------------------------------ public host API

int64_t LLDispatchRowStride(int64_t hidden, int64_t x_itemsize, bool use_fp8) {
  const int64_t payload = use_fp8 ? hidden + 4 * (hidden / kLLFp8Block) : hidden * x_itemsize;
  return RoundUp(payload, 16);
}

int64_t LLPlainRowStride(int64_t hidden, int64_t itemsize) { return RoundUp(hidden * itemsize, 16); }

int64_t LLSendRows(int64_t num_ranks, int64_t max_tokens, int64_t num_experts, int64_t top_k) {
  return std::max(max_tokens * top_k,
                  std::min(num_experts * max_tokens, num_ranks * max_tokens * top_k));
}

LLLayout MakeLLLayout(int num_ranks, int64_t max_tokens, int64_t hidden, int64_t num_experts,
                      int64_t top_k, int64_t itemsize, bool send_buffer) {
  LLLayout lay;
  lay.num_ranks = num_ranks;
  lay.max_tokens = max_tokens;
  lay.hidden = hidden;
  lay.num_experts = num_experts;
  lay.top_k = top_k;
  lay.itemsize = itemsize;
  const int64_t stride = std::max(LLDispatchRowStride(hidden, itemsize, false),
                                  LLDispatchRowStride(hidden, itemsize, true));
  size_t off = kLLControlBytes;
  lay.counts_offset = off;
  off += RoundUp(2 * static_cast<int64_t>(num_ranks) * num_experts * 4, 256);
  lay.scratch_offset = off;
  off += RoundUp(2 * num_experts * 4, 256);
  lay.jpos_offset = off;
  off += RoundUp(2 * max_tokens * top_k * 4, 256);
  lay.arrive_offset = off;
  off += RoundUp(2 * max_tokens * 8, 256);
  lay.set_offset = off;
  lay.set_bytes = static_cast<size_t>(
      RoundUp(std::max(num_experts * max_tokens * stride,
                       LLDispatchSetBytes(num_ranks, max_tokens, num_experts, stride)),
              256));
  off += 2 * lay.set_bytes;
  lay.send_offset = off;
  lay.send_bytes = send_buffer ? static_cast<size_t>(RoundUp(
                                     LLSendRows(num_ranks, max_tokens, num_experts, top_k) * stride,
                                     256))
                               : 0;
  off += lay.send_bytes;
  lay.total_bytes = off;
  return lay;
}

namespace {

const char* CheckCommon(const LLComm& c, const LLShape& s) {
  if (!ValidComm(c)) return "the NVSHMEM low-latency context is not set up";
  if (s.top_k < 1 || s.top_k > kLLMaxTopK) return "top_k must be in [1, 32]";
  if (s.hidden < 1 || s.hidden > kLLMaxHidden) return "hidden must be in [1, 65536]";
  if (s.max_tokens < 1 || s.max_tokens > kLLMaxTokens) {
    return "max_tokens_per_rank must be in [1, 4096]";
  }
  if (s.num_tokens < 0 || s.num_tokens > s.max_tokens) {
    return "the number of tokens exceeds max_tokens_per_rank";
  }
  // The per-token arrival counters (and the per-token rows of every set) are
  // laid out for the allocation's M: a larger call's tokens would land past them.
  if (s.max_tokens > c.layout.max_tokens) {
    return "max_tokens_per_rank exceeds the max_tokens_per_rank the low-latency buffer was "
           "allocated for";
  }
  if (s.num_experts < c.num_ranks || s.num_experts % c.num_ranks != 0) {
    return "num_experts must be a positive multiple of the number of PEs";
  }
  if (s.num_experts > c.layout.num_experts) {
    return "num_experts exceeds the num_experts the low-latency buffer was allocated for";
  }
  return nullptr;
}

}  // namespace

const char* LLCheckDispatch(const LLComm& c, const LLShape& s, int64_t x_itemsize, bool use_fp8) {
  if (const char* why = CheckCommon(c, s)) return why;
  if (use_fp8 && s.hidden % kLLFp8Block != 0) return "use_fp8 needs hidden to be a multiple of 128";
  if (s.max_tokens * s.top_k > c.layout.max_tokens * c.layout.top_k) {
    return "max_tokens_per_rank * top_k exceeds what the low-latency buffer was allocated for";
  }
  const int64_t stride = LLDispatchRowStride(s.hidden, x_itemsize, use_fp8);
  if (static_cast<size_t>(LLDispatchSetBytes(c.num_ranks, s.max_tokens, s.num_experts, stride)) >
      c.layout.set_bytes) {
    return "num_experts * max_tokens_per_rank * 4 + PEs * max_tokens_per_rank * row bytes exceeds "
           "the low-latency buffer (allocate it for a larger hidden / itemsize / "
           "max_tokens_per_rank)";
  }
  if (c.any_put && static_cast<size_t>(s.num_tokens * s.top_k * stride) > c.layout.send_bytes) {
    return "the send buffer for NVSHMEM puts is too small (or missing: allocate with "
           "send_buffer=True)";
  }
  return nullptr;
}

const char* LLCheckCombine(const LLComm& c, const LLShape& s, int64_t y_itemsize) {
  if (const char* why = CheckCommon(c, s)) return why;
  const int64_t stride = LLPlainRowStride(s.hidden, y_itemsize);
  if (static_cast<size_t>(s.num_experts * s.max_tokens * stride) > c.layout.set_bytes) {
    return "num_experts * max_tokens_per_rank * row bytes exceeds the low-latency buffer (allocate "
           "it for a larger hidden / itemsize / max_tokens_per_rank)";
  }
  if (s.top_k > c.layout.top_k) return "top_k exceeds the top_k the low-latency buffer was allocated for";
  if (c.any_put && c.layout.send_bytes == 0) {
    return "NVSHMEM puts need the send buffer (allocate with send_buffer=True)";
  }
  return nullptr;
}

const char* LLCheckCachedDispatch(const LLComm& c, const LLShape& s, int64_t x_itemsize) {
  if (const char* why = CheckCommon(c, s)) return why;
  if (s.max_tokens * s.top_k > c.layout.max_tokens * c.layout.top_k) {
    return "max_tokens_per_rank * top_k exceeds what the low-latency buffer was allocated for";
  }
  const int64_t stride = LLPlainRowStride(s.hidden, x_itemsize);
  if (static_cast<size_t>(s.num_experts * s.max_tokens * stride) > c.layout.set_bytes) {
    return "num_experts * max_tokens_per_rank * row bytes exceeds the low-latency buffer";
  }
  if (c.any_put && static_cast<size_t>(s.num_tokens * s.top_k * stride) > c.layout.send_bytes) {
    return "the send buffer for NVSHMEM puts is too small (or missing: allocate with "
           "send_buffer=True)";
  }
  return nullptr;
}

}  // namespace jax_ep
