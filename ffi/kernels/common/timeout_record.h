// The record a device spin-wait fills when it times out, shared by the
// intranode kernels (intranode.cu) and the low-latency kernels
// (low_latency/*.cu) and read by the host watchdog (ffi/runtime/watchdog.h).
// Plain C++: included by host and device code.
#pragma once

#include <cstdint>

namespace jax_ep {

// Words of an op signature (what every rank's call of one op must agree on;
// each mode encodes its own, see kSignatureWords' users).
inline constexpr int kSignatureWords = 6;

// Written by the first spin-wait that times out (or the first check that
// finds ranks disagreeing), in host-mapped pinned memory, right before the
// kernel traps. state: 0 = none, 1 = being written, 2 = complete (the host
// reads the other fields only then).
struct TimeoutRecord {
  int32_t state;
  int32_t rank;
  int32_t op;      // IntranodeOp or LLOp
  int32_t what;    // IntranodeWait or LLWait
  int32_t peer;    // the rank waited on
  int32_t reserved;
  uint64_t timeout_ns;
  uint64_t epoch;  // the op's sequence number on this rank
  uint64_t seen;   // the flag value last seen
  uint64_t mine[kSignatureWords];    // a disagreement: this rank's op signature
  uint64_t theirs[kSignatureWords];  // and the peer's
};

}  // namespace jax_ep
