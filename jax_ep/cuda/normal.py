"""The normal (high-throughput) mode: the internode kernels where `initialize` set them up
(an EP axis spanning nodes), else the intranode ones.

`jax_ep._ops` calls these backend functions; they pick the mode at trace time.
"""

from __future__ import annotations

from . import internode, intranode

SETUP_HINT = intranode.SETUP_HINT


def _mode():
    return internode if internode.ready() else intranode


def compiled() -> bool:
    return intranode.compiled()


def ready() -> bool:
    return internode.ready() or intranode.ready()


def dispatch(parts, topk_idx, topk_weights, *, num_experts, axis_name, capacity):
    return _mode().dispatch(parts, topk_idx, topk_weights, num_experts=num_experts,
                            axis_name=axis_name, capacity=capacity)


def dispatch_rows(parts, handle):
    return _mode().dispatch_rows(parts, handle)


def combine_rows(parts, handle):
    return _mode().combine_rows(parts, handle)
