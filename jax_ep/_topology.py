"""The node grouping of the EP axis (docs/design.md §2.16), set by `initialize`.

An EP axis of R ranks is grouped into N = R / G nodes of G = ranks_per_node
consecutive ranks: rank r = n * G + g is local rank g of node n. `_runtime`
sets the grouping at `initialize` and clears it at `shutdown`; `_ops` reads it
when it traces a dispatch, so the handle records the grouping its combine
follows. Nothing here imports the rest of jax_ep.
"""

from __future__ import annotations

_ranks_per_node: int | None = None


def set_ranks_per_node(value: int | None) -> None:
    """Record the grouping in force (None: no grouping, plain rank order)."""
    global _ranks_per_node
    _ranks_per_node = value


def ranks_per_node(num_ranks: int, op: str = "dispatch") -> int | None:
    """G for an EP axis of `num_ranks`, or None when it is one node (plain rank order).

    Raises ValueError when the configured G does not divide `num_ranks` (the
    call's EP axis is not the one `initialize` validated it against).
    """
    g = _ranks_per_node
    if g is None or g == num_ranks:
        return None
    if num_ranks % g:
        raise ValueError(
            f"jax_ep.{op}: initialize(ranks_per_node={g}) does not divide this call's EP axis "
            f"size {num_ranks}; call it under the EP axis given to initialize, or initialize "
            f"with a ranks_per_node dividing {num_ranks}.")
    return g
