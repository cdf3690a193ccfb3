"""The CUDA backend: maps public ops onto FFI custom calls (see `_ffi`).

Functions here have the same signatures as their `_reference` twins so that
`_backend.select` can swap them. Routing and handle arithmetic are shared with
the reference (`_routing`); the custom calls only exchange counts and move
rows, so no XLA collective runs (several processes may share one GPU, where
NCCL refuses to run). `SUPPORTED_OPS` lists what this build's kernels cover;
everything else stays on the reference backend.
"""

from __future__ import annotations

from jax import lax

from . import _ffi, _runtime
from ._routing import handle_from_counts, localize, route

# Ops whose kernels talk to peers: they need the buffers set up by initialize.
_INTRANODE_OPS = frozenset({"dispatch", "combine"})


def supported_ops() -> frozenset:
    """Ops this build's CUDA kernels implement."""
    if not _ffi.cuda_available():
        return frozenset()
    ops = {"get_dispatch_layout"}
    if _ffi.intranode_available():
        ops |= _INTRANODE_OPS
    return frozenset(ops)


def needs_runtime(op) -> bool:
    return op in _INTRANODE_OPS


def why_unavailable(op) -> str | None:
    """None when `op` can run on the CUDA backend now, else the reason."""
    if not _ffi.cuda_available():
        return ("this jax_ep build has no CUDA kernels (it was built without nvcc; reinstall "
                "with nvcc on PATH or CMAKE_ARGS=-DJAX_EP_CUDA=ON).")
    if op not in supported_ops():
        return f"the CUDA kernels for {op} are not part of this build yet."
    if needs_runtime(op) and not _runtime.gpu_ready():
        return ("its communication buffers are not set up: call jax_ep.initialize(mesh, "
                "axis_name=..., max_tokens_per_rank=..., hidden=...) on the GPU mesh first.")
    return None


def get_dispatch_layout(topk_idx, *, num_experts, num_ranks):
    return _ffi.get_dispatch_layout_ffi(topk_idx, num_experts=num_experts, num_ranks=num_ranks)


def dispatch(parts, topk_idx, topk_weights, *, num_experts, axis_name, capacity):
    num_ranks = lax.axis_size(axis_name)
    routing = route(topk_idx, num_experts, num_ranks)
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

