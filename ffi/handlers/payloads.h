// Payload decoding shared by the dispatch handlers of both normal modes
// (ffi/handlers/intranode.cc, internode.cc): each payload operand [T, ...]
// and its receive result [capacity, ...] become a (src, dst, row bytes)
// triple, with the checks and messages of both. Header-only.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ffi/handlers/ffi_helpers.h"
#include "xla/ffi/api/ffi.h"

namespace jax_ep::ffi_util {

struct Payload {
  const void* src;    // [T, row_bytes]
  void* dst;          // [capacity, row_bytes]
  int64_t row_bytes;
};

// Bytes per element, or 0 for types whose elements are not whole bytes.
inline size_t ElementBytes(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::S1:
    case ffi::DataType::S2:
    case ffi::DataType::S4:
    case ffi::DataType::U1:
    case ffi::DataType::U2:
    case ffi::DataType::U4:
    case ffi::DataType::F4E2M1FN:
    case ffi::DataType::TOKEN:
    case ffi::DataType::INVALID:
      return 0;
    default:
      return ffi::ByteWidth(dtype);
  }
}

// "<where><name> must have shape [rows, cols] (EP size cols)" unless it has.
inline ffi::Error CheckMatrix(const std::string& where, const char* name, ffi::Span<const int64_t> dims,
                       int64_t rows, int64_t cols) {
  if (dims.size() != 2 || dims[0] != rows || dims[1] != cols) {
    return ffi::Error::InvalidArgument(where + name + " must have shape [" + Str(rows) + ", " +
                                       Str(cols) + "] (EP size " + Str(cols) + "), got " +
                                       Dims(dims));
  }
  return ffi::Error::Success();
}

// The payloads and their receive results (N each, at most max_parts),
// checked against T and capacity, into *found.
inline ffi::Error CollectPayloads(const std::string& where, const ffi::RemainingArgs& payloads,
                                  const ffi::RemainingRets& recvs, int64_t num_tokens,
                                  int64_t capacity, int max_parts, std::vector<Payload>* found) {
  const size_t n = payloads.size();
  if (recvs.size() != n) {
    return ffi::Error::InvalidArgument(where + "got " + Str(static_cast<int64_t>(n)) +
                                       " payload operands but " +
                                       Str(static_cast<int64_t>(recvs.size())) +
                                       " receive results; they must match one to one");
  }
  if (n > static_cast<size_t>(max_parts)) {
    return ffi::Error::InvalidArgument(where + "at most " + Str(max_parts) +
                                       " payload arrays per call, got " +
                                       Str(static_cast<int64_t>(n)));
  }
  for (size_t i = 0; i < n; ++i) {
    const std::string name = "payload " + Str(static_cast<int64_t>(i));
    auto in = payloads.get<ffi::AnyBuffer>(i);
    if (!in.has_value()) return ffi::Error::InvalidArgument(where + name + ": " + in.error().message());
    auto out = recvs.get<ffi::AnyBuffer>(i);
    if (!out.has_value()) {
      return ffi::Error::InvalidArgument(where + "result for " + name + ": " + out.error().message());
    }
    const ffi::AnyBuffer src = in.value();
    ffi::AnyBuffer dst = *out.value();
    const auto src_dims = src.dimensions();
    const auto dst_dims = dst.dimensions();
    if (src_dims.size() < 1 || src_dims[0] != num_tokens) {
      return ffi::Error::InvalidArgument(where + name + " must have shape [T=" + Str(num_tokens) +
                                         ", ...] like slot, got " + Dims(src_dims));
    }
    if (dst.element_type() != src.element_type()) {
      return ffi::Error::InvalidArgument(where + "the result for " + name +
                                         " must have the payload's dtype");
    }
    bool same_row = dst_dims.size() == src_dims.size() && dst_dims[0] == capacity;
    int64_t elems = 1;
    for (size_t d = 1; d < src_dims.size(); ++d) {
      elems *= src_dims[d];
      if (same_row && dst_dims[d] != src_dims[d]) same_row = false;
    }
    if (!same_row) {
      return ffi::Error::InvalidArgument(where + "the result for " + name + " must have shape [" +
                                         "capacity=" + Str(capacity) + ", <payload row shape>], "
                                         "payload " + Dims(src_dims) + ", result " +
                                         Dims(dst_dims));
    }
    const size_t width = ElementBytes(src.element_type());
    if (width == 0) {
      return ffi::Error::InvalidArgument(where + name +
                                         ": sub-byte and token dtypes are not supported");
    }
    found->push_back(Payload{src.untyped_data(), dst.untyped_data(),
                             elems * static_cast<int64_t>(width)});
  }
  return ffi::Error::Success();
}

}  // namespace jax_ep::ffi_util
