// The op-signature check of the normal-mode notify kernels (intranode.cu,
// internode/internode.cu): every rank leaves its signature with every peer
// before any row moves; a peer whose call differs, or whose EP axis index is
// not its rank, stops this rank with a record naming both calls.
// Header-only (see device_sync.cuh).
#pragma once

#include <cstdint>

#include "ffi/kernels/common/device_sync.cuh"
#include "ffi/kernels/common/timeout_record.h"

namespace jax_ep {

// What a signature mismatch records (the mode's wait kinds and its op).
struct SignatureSite {
  TimeoutRecord* record;
  int32_t rank;
  int32_t op;
  int32_t rank_order_what;  // the call's axis index is not the peer's rank
  int32_t mismatch_what;    // another op or other shapes
  uint64_t timeout_ns;
  uint64_t epoch;
};

// Peer s's signature (`slot`, written by s) against mine; word `axis_word`
// holds the call's EP axis index and is compared with s instead. Out of line:
// the common path stays small.
__device__ __noinline__ inline void CheckPeerSignature(const volatile uint64_t* slot, int s,
                                                       const uint64_t* mine, int axis_word,
                                                       const SignatureSite& site) {
  uint64_t theirs[kSignatureWords];
  for (int i = 0; i < kSignatureWords; ++i) theirs[i] = slot[i];
  if (theirs[axis_word] != static_cast<uint64_t>(s)) {
    RecordTimeoutAndTrap(site.record, site.rank, site.op, site.rank_order_what, s,
                         site.timeout_ns, site.epoch, theirs[axis_word], mine, theirs);
  }
  for (int i = 0; i < kSignatureWords; ++i) {
    if (i != axis_word && theirs[i] != mine[i]) {
      RecordTimeoutAndTrap(site.record, site.rank, site.op, site.mismatch_what, s,
                           site.timeout_ns, site.epoch, 0, mine, theirs);
    }
  }
}

}  // namespace jax_ep
