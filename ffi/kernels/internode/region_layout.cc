// The internode region's layout (internode.h, InternodeLayout): one formula
// for the runtime's allocation, the handlers' size checks and Python's
// heap sizing.
#include <algorithm>

#include "ffi/kernels/internode/internode.h"

namespace jax_ep {
namespace {

constexpr size_t Round(size_t v, size_t to) { return (v + to - 1) / to * to; }

}  // namespace

int64_t InternodeMessageBytes(int ranks_per_node, const int64_t* row_bytes, int num_parts) {
  int64_t bytes = static_cast<int64_t>(Round(4 * static_cast<size_t>(ranks_per_node), 16));
  for (int p = 0; p < num_parts; ++p) bytes += static_cast<int64_t>(Round(row_bytes[p], 16));
  return bytes;
}

InternodeLayout MakeInternodeLayout(int num_ranks, int ranks_per_node, int64_t max_tokens,
                                    int64_t message_bytes, int64_t combine_row_bytes) {
  InternodeLayout lay;
  const size_t R = static_cast<size_t>(std::max(num_ranks, 1));
  const size_t G = static_cast<size_t>(std::max(ranks_per_node, 1));
  const size_t N = std::max<size_t>(R / G, 1);
  const size_t B = kInternodeMaxBlocks;
  const size_t W = kSignatureWords;
  lay.num_ranks = static_cast<int32_t>(R);
  lay.ranks_per_node = static_cast<int32_t>(G);
  lay.num_nodes = static_cast<int32_t>(N);
  lay.max_tokens = max_tokens;
  lay.stride = static_cast<int64_t>(
      Round(static_cast<size_t>(std::max<int64_t>({message_bytes, combine_row_bytes, 16})), 16));
  size_t at = 0;
  auto take = [&at](size_t bytes) {
    const size_t offset = at;
    at = Round(at + bytes, 256);
    return offset;
  };
  lay.epoch_offset = take(8);
  lay.arrive_offset = take(16);
  lay.record_bytes = Round(4 * (R + N), 8) + 8 * W;
  lay.outbox_offset = take(lay.record_bytes);
  lay.barrier_offset = take(8 * R);
  lay.records_offset = take(2 * R * lay.record_bytes);
  lay.relay_flag_offset = take(N * B * 8);
  lay.forward_flag_offset = take(R * B * 8);
  lay.combine_flag_offset = take(G * 8);
  lay.partial_flag_offset = take(N * B * 8);
  const size_t rows = static_cast<size_t>(std::max<int64_t>(max_tokens, 1));
  const size_t stride = static_cast<size_t>(lay.stride);
  lay.area_a_offset = take(N * rows * stride);
  lay.area_b_offset = take(N * rows * stride);
  lay.area_c_offset = take(R * rows * stride);
  lay.total_bytes = at;
  return lay;
}

}  // namespace jax_ep
