"""Grid sizes of the spinning kernels: the co-residency check every mode runs at initialize.

A kernel that waits for other ranks' kernels (or for other blocks of its own
grid) needs every block it waits for to be running: the grids of all ranks
sharing one GPU (MPS) must fit on it together.
"""

from __future__ import annotations


def check_coresident(state: dict, num_blocks, *, kernels: str, where: str = "this GPU") -> None:
    """Raise unless `ranks_on_device` x `num_blocks` of a runtime's info dict fit in its
    `max_coresident_blocks`; the message names the largest num_blocks that works."""
    sharing, blocks, room = (state["ranks_on_device"], state["num_blocks"],
                             state["max_coresident_blocks"])
    if sharing * blocks > room:
        raise ValueError(
            f"jax_ep.initialize: num_blocks={num_blocks} gives {blocks} blocks per kernel for "
            f"each of the {sharing} ranks on {where}, but it holds at most {room} blocks of the "
            f"{kernels} kernels at once and every one of them must be resident; pass "
            f"num_blocks <= {room // sharing} (or 0 for automatic).")
