"""Split send / receive forms of the low-latency ops, for overlap.

`*_send` starts an op and returns a `LowLatencyPending`; `*_recv` finishes it.
Put independent compute between the two: on the CUDA backend they are two
custom calls linked only by the pending token, so XLA can schedule work in
between while the rows travel. The fused ops and the split forms give the same
results. Two ops may be in flight at once (the buffers are double-buffered).
The dispatch's layout ("padded" or "ragged") travels in the pending op and
then in the handle, so the combine's send takes y in that layout.

The split forms are for inference: they are not differentiable (a gradient
through them raises); train with the fused ops. On the reference backend the
send half does all the work.
"""

from __future__ import annotations

import jax
import numpy as np

from . import _backend, _checks, _inflight, _ops, cuda
from ._handles import LowLatencyHandle, LowLatencyPending


def _not_differentiable(op):
    @jax.custom_vjp
    def identity(x):
        return x

    def bwd(_, g):
        raise TypeError(f"jax_ep.{op}: the split send/recv forms are not differentiable; "
                        f"use the fused low-latency ops for training.")

    identity.defvjp(lambda x: (x, None), bwd)
    return identity


def low_latency_dispatch_send(x, topk_idx, *, num_experts, axis_name, max_tokens_per_rank,
                              use_fp8=False, zero_padding=True, layout="padded", backend=None):
    """First half of `low_latency_dispatch` (same arguments); returns a pending op."""
    op = "low_latency_dispatch_send"
    num_experts, idx, m = _checks.low_latency_dispatch_args(
        x, topk_idx, num_experts, axis_name, max_tokens_per_rank, use_fp8, op)
    layout = _checks.low_latency_layout(layout, op)
    x = _not_differentiable(op)(x)
    kw = dict(num_experts=num_experts, axis_name=axis_name, max_tokens_per_rank=m,
              use_fp8=bool(use_fp8))
    if _backend.resolve(backend, "low_latency_dispatch") == "cuda":
        arrays = cuda.low_latency.low_latency_dispatch_send(x, idx, **kw)
        _inflight.issue(op, pending_key=arrays[0])
        meta = tuple(sorted(kw.items())) + (("hidden", x.shape[1]),
                                            ("x_dtype", np.dtype(x.dtype).name),
                                            ("zero_padding", bool(zero_padding)),
                                            ("layout", layout))
        return LowLatencyPending(arrays=tuple(arrays), kind="dispatch", backend="cuda",
                                 meta=meta)
    recv_x, count, handle = _ops.low_latency_dispatch(x, idx, backend="reference",
                                                      layout=layout, **kw)
    return LowLatencyPending(arrays=(recv_x, count, handle), kind="dispatch",
                             backend="reference", meta=())


def low_latency_dispatch_recv(pending):
    """Second half: (recv_x, recv_count, handle), as `low_latency_dispatch` returns."""
    _expect(pending, "dispatch", "low_latency_dispatch_recv")
    if pending.backend == "reference":
        return pending.arrays
    _inflight.finish(pending.arrays[0])
    meta = dict(pending.meta)
    meta["x_dtype"] = np.dtype(meta["x_dtype"])
    recv, count, handle = cuda.low_latency.low_latency_dispatch_recv(*pending.arrays, **meta)
    return (tuple(recv) if meta["use_fp8"] else recv[0]), count, handle


def low_latency_combine_send(y, handle, *, backend=None):
    """First half of `low_latency_combine`: send the expert outputs `y` (in the
    handle's layout) back."""
    op = "low_latency_combine_send"
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(f"jax_ep.{op}: handle must be the LowLatencyHandle returned by "
                        f"jax_ep.low_latency_dispatch, got {type(handle).__name__}.")
    _checks.axis_size(handle.axis_name, op)
    _checks.low_latency_y(y, handle, op)
    y = _not_differentiable(op)(y)
    if _backend.resolve(backend, "low_latency_combine") == "cuda":
        token = cuda.low_latency.low_latency_combine_send(y, handle)
        _inflight.issue(op, pending_key=token)
        meta = (("hidden", y.shape[-1]), ("y_dtype", np.dtype(y.dtype).name))
        return LowLatencyPending(arrays=(token, handle), kind="combine", backend="cuda",
                                 meta=meta)
    return LowLatencyPending(arrays=(y, handle), kind="combine", backend="reference", meta=())


def low_latency_combine_recv(pending, topk_idx, topk_weights):
    """Second half: the [T, H] weighted sum, as `low_latency_combine` returns."""
    op = "low_latency_combine_recv"
    _expect(pending, "combine", op)
    first, handle = pending.arrays
    if pending.backend == "reference":
        return _ops.low_latency_combine(first, topk_idx, topk_weights, handle,
                                        backend="reference")
    idx = _checks.topk_idx(topk_idx, handle.slot.shape[0], handle.num_experts, op)
    w = _checks.topk_weights(topk_weights, idx.shape, op)
    _inflight.finish(first)
    meta = dict(pending.meta)
    return cuda.low_latency.low_latency_combine_recv(first, w, handle, hidden=meta["hidden"],
                                          y_dtype=np.dtype(meta["y_dtype"]))


def _expect(pending, kind, op):
    if not isinstance(pending, LowLatencyPending) or pending.kind != kind:
        raise TypeError(f"jax_ep.{op}: pass the pending op returned by "
                        f"jax_ep.low_latency_{kind}_send.")
