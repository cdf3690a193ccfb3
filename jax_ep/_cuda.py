"""The CUDA backend: maps public ops onto FFI custom calls (see `_ffi`).

Functions here have the same signatures as their `_reference` twins so that
`_backend.select` can swap them. Handle arithmetic is shared with the
reference (`_routing`); dispatch's slot / sent come from the `jax_ep_route`
kernel (the same values as `_routing.route`, whose cumsum is slow in XLA). The
custom calls only exchange counts and move rows, so no XLA collective runs
(several processes may share one GPU, where NCCL refuses to run).
`supported_ops()` says what this build's kernels cover; everything else stays
on the reference backend.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from . import _ffi, _runtime
from ._handles import LowLatencyHandle
from ._routing import Routing, handle_from_counts, localize, valid_ids

# Ops whose kernels talk to peers: they need the buffers set up by initialize.
_INTRANODE_OPS = frozenset({"dispatch", "combine"})
_LOW_LATENCY_OPS = frozenset({"low_latency_dispatch", "low_latency_combine"})


def supported_ops() -> frozenset:
    """Ops this build's CUDA kernels implement."""
    if not _ffi.cuda_available():
        return frozenset()
    ops = {"get_dispatch_layout"}
    if _ffi.intranode_available():
        ops |= _INTRANODE_OPS
    if _ffi.nvshmem_available():
        ops |= _LOW_LATENCY_OPS
    return frozenset(ops)


def needs_runtime(op) -> bool:
    return op in _INTRANODE_OPS or op in _LOW_LATENCY_OPS


def _low_latency_ready() -> bool:
    from . import _nvshmem

    info = _nvshmem.low_latency_info()
    return bool(info and info["allocated"])


def why_unavailable(op) -> str | None:
    """None when `op` can run on the CUDA backend now, else the reason."""
    if not _ffi.cuda_available():
        return ("this jax_ep build has no CUDA kernels (it was built without nvcc; reinstall "
                "with nvcc on PATH or CMAKE_ARGS=-DJAX_EP_CUDA=ON).")
    if op not in supported_ops():
        return f"the CUDA kernels for {op} are not part of this build yet."
    if op in _INTRANODE_OPS and not _runtime.gpu_ready():
        return ("its communication buffers are not set up: call jax_ep.initialize(mesh, "
                "axis_name=..., max_tokens_per_rank=..., hidden=...) on the GPU mesh first.")
    if op in _LOW_LATENCY_OPS and not _low_latency_ready():
        return ("its NVSHMEM buffers are not set up: call jax_ep.initialize(mesh, "
                "axis_name=..., max_tokens_per_rank=..., hidden=..., num_experts=..., "
                "low_latency=True) on the GPU mesh first.")
    return None


def get_dispatch_layout(topk_idx, *, num_experts, num_ranks):
    return _ffi.get_dispatch_layout_ffi(topk_idx, num_experts=num_experts, num_ranks=num_ranks)


def dispatch(parts, topk_idx, topk_weights, *, num_experts, axis_name, capacity):
    num_ranks = lax.axis_size(axis_name)
    idx, num_invalid = valid_ids(topk_idx, num_experts)
    slot, sent = _ffi.route_ffi(topk_idx, num_experts=num_experts, num_ranks=num_ranks)
    routing = Routing(idx, num_invalid, slot, sent)
    payloads = list(parts) + [routing.idx, topk_weights]
    _runtime.check_buffer("dispatch", axis_name, _ffi.dispatch_bytes(payloads, capacity))
    rank_counts, *recv = _ffi.intranode_dispatch(routing.slot, routing.sent, payloads,
                                                 capacity=capacity)
    handle = handle_from_counts(routing, rank_counts, num_experts=num_experts,
                                axis_name=axis_name, capacity=capacity)
    *recv_parts, recv_idx, recv_w = recv
    recv_idx, recv_w, handle = localize(recv_idx, recv_w, handle)
    return recv_parts, recv_idx, recv_w, handle


def dispatch_rows(parts, handle):
    _runtime.check_buffer("dispatch", handle.axis_name,
                          _ffi.dispatch_bytes(parts, handle.capacity))
    return _ffi.intranode_dispatch_cached(handle.token_slot, handle.rank_counts, list(parts),
                                          capacity=handle.capacity)


def combine_rows(parts, handle):
    out = []
    for part in parts:
        _runtime.check_buffer("combine", handle.axis_name,
                              _ffi.combine_bytes(part, handle.num_ranks, handle.num_tokens))
        out.append(_ffi.intranode_combine(part, handle.token_slot, handle.rank_counts))
    return out



# ----------------------------------------------------------------------------
# Low-latency mode (NVSHMEM kernels, see _nvshmem). The handle carries owner,
# the flattened slot and recv_src; recv_row stays -1 (only the reference
# backend's combine reads it), so a low-latency handle is combined by the
# backend that made it.
# ----------------------------------------------------------------------------


def _ll_check(handle_or_m, hidden, top_k, num_experts, num_ranks):
    from . import _nvshmem

    lay = _nvshmem.low_latency_info()["layout"]
    want = dict(max_tokens_per_rank=handle_or_m, hidden=hidden, top_k=top_k,
                num_experts=num_experts)
    too_big = {k: v for k, v in want.items() if v > lay[k]}
    if too_big or num_ranks != lay["num_ranks"]:
        raise ValueError(
            f"jax_ep low-latency: this call ({want}, EP size {num_ranks}) does not fit the "
            f"buffers initialize() allocated ({ {k: lay[k] for k in want} }, EP size "
            f"{lay['num_ranks']}); initialize with larger sizes.")


def _ll_ids(handle):
    """Global expert ids, reconstructed from the handle's owner and slot."""
    rows = handle.num_ranks * handle.max_tokens_per_rank
    local = handle.num_experts // handle.num_ranks
    return jnp.where(handle.owner >= 0, handle.owner * local + handle.slot // rows, -1)


def _ll_slot(handle):
    """The kernels' slots (row among the expert's R * M), from the handle's
    (local expert * R * M + row)."""
    rows = handle.num_ranks * handle.max_tokens_per_rank
    return jnp.where(handle.slot >= 0, handle.slot % rows, -1)


def _ll_handle(idx, num_invalid, count, recv_src, slot, *, num_experts, axis_name,
               max_tokens_per_rank):
    num_ranks = lax.axis_size(axis_name)
    local = num_experts // num_ranks
    rows = num_ranks * max_tokens_per_rank
    return LowLatencyHandle(
        recv_count=count,
        num_invalid_experts=num_invalid,
        owner=jnp.where(idx >= 0, idx // local, -1).astype(jnp.int32),
        slot=jnp.where(slot >= 0, (idx % local) * rows + slot, -1).astype(jnp.int32),
        recv_row=jnp.full((num_ranks,) + idx.shape, -1, jnp.int32),
        recv_src=recv_src,
        num_experts=num_experts,
        max_tokens_per_rank=max_tokens_per_rank,
        axis_name=axis_name,
    )


def low_latency_dispatch(x, topk_idx, *, num_experts, axis_name, max_tokens_per_rank,
                         use_fp8, zero_padding=True):
    from . import _nvshmem

    num_ranks = lax.axis_size(axis_name)
    _ll_check(max_tokens_per_rank, x.shape[1], topk_idx.shape[1], num_experts, num_ranks)
    idx, num_invalid = valid_ids(topk_idx, num_experts)
    recv, count, recv_src, slot = _nvshmem.ll_dispatch(
        x, idx, num_experts=num_experts, max_tokens_per_rank=max_tokens_per_rank,
        use_fp8=use_fp8, zero_fill=zero_padding, num_ranks=num_ranks)
    handle = _ll_handle(idx, num_invalid, count, recv_src, slot, num_experts=num_experts,
                        axis_name=axis_name, max_tokens_per_rank=max_tokens_per_rank)
    return (list(recv) if use_fp8 else [recv]), count, handle


def low_latency_dispatch_send(x, topk_idx, *, num_experts, axis_name, max_tokens_per_rank,
                              use_fp8):
    """Send half: (token, cleaned ids, invalid count) for low_latency_dispatch_recv."""
    from . import _nvshmem

    num_ranks = lax.axis_size(axis_name)
    _ll_check(max_tokens_per_rank, x.shape[1], topk_idx.shape[1], num_experts, num_ranks)
    idx, num_invalid = valid_ids(topk_idx, num_experts)
    token = _nvshmem.ll_dispatch_send(x, idx, num_experts=num_experts,
                                      max_tokens_per_rank=max_tokens_per_rank, use_fp8=use_fp8)
    return token, idx, num_invalid


def low_latency_dispatch_recv(token, idx, num_invalid, *, hidden, x_dtype, num_experts,
                              axis_name, max_tokens_per_rank, use_fp8, zero_padding=True):
    from . import _nvshmem

    num_ranks = lax.axis_size(axis_name)
    recv, count, recv_src, slot = _nvshmem.ll_dispatch_recv(
        token, idx, hidden=hidden, x_dtype=x_dtype, num_experts=num_experts,
        max_tokens_per_rank=max_tokens_per_rank, use_fp8=use_fp8, zero_fill=zero_padding,
        num_ranks=num_ranks)
    handle = _ll_handle(idx, num_invalid, count, recv_src, slot, num_experts=num_experts,
                        axis_name=axis_name, max_tokens_per_rank=max_tokens_per_rank)
    return (list(recv) if use_fp8 else [recv]), count, handle


def low_latency_combine_send(y, handle):
    from . import _nvshmem

    return _nvshmem.ll_combine_send(y, handle.recv_src, handle.recv_count,
                                    num_ranks=handle.num_ranks)


def low_latency_combine_recv(token, topk_weights, handle, *, hidden, y_dtype):
    from . import _nvshmem

    return _nvshmem.ll_combine_recv(token, _ll_ids(handle), topk_weights, hidden=hidden,
                                    y_dtype=y_dtype, num_experts=handle.num_experts,
                                    max_tokens_per_rank=handle.max_tokens_per_rank)


def low_latency_combine(y, topk_weights, handle):
    from . import _nvshmem

    return _nvshmem.ll_combine(y, _ll_ids(handle), topk_weights, handle.recv_src,
                               handle.recv_count, _ll_slot(handle), num_ranks=handle.num_ranks)


def low_latency_gather_rows(y, handle):
    from . import _nvshmem

    return _nvshmem.ll_gather(y, _ll_ids(handle), handle.recv_src, handle.recv_count,
                              _ll_slot(handle), num_ranks=handle.num_ranks)


def low_latency_dispatch_rows(parts, handle, row_weights=None):
    from . import _nvshmem

    return [_nvshmem.ll_dispatch_cached(
        part, _ll_ids(handle), _ll_slot(handle), handle.recv_count, row_weights,
        num_experts=handle.num_experts, max_tokens_per_rank=handle.max_tokens_per_rank,
        num_ranks=handle.num_ranks) for part in parts]
