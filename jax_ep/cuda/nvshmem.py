"""NVSHMEM bootstrap and teardown: one PE per process, PE index = EP rank.

Used by the low-latency and the internode modes:

1. `locate`: NVSHMEM binds one PE to one GPU, so the EP axis must span the
   whole mesh and each process must own exactly one of its devices. Every PE
   publishes (hostname, PCI bus id) through the jax.distributed key-value
   store: whether all PEs share one host, and how many share this GPU.
2. `init`: EP rank 0 makes the 128-byte unique id (`nvshmemx_get_uniqueid`
   inside the extension: nvshmem4py is not needed) and publishes it; every PE
   calls `nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID)` from inside the
   module holding the kernels, so their NVSHMEM device state is registered
   (also after a prior nvshmem4py init: NVSHMEM counts references). On one
   host the single-host NVSHMEM defaults apply (no remote transport, no NCCL,
   bootstrap over `lo`); `NVSHMEM_DISABLE_NVLS=1` always.
3. `finalize`: collective; frees what the modes allocated and finalizes.

NVSHMEM stays initialized when a mode shuts down: a later `init` with the
same PE layout and a heap that fits reuses it (every PE takes the same
decision: the configurations were agreed). Initializing and finalizing
NVSHMEM repeatedly leaks device memory inside NVSHMEM (~1.7 MB a cycle,
measured), and costs seconds; the process's end finalizes it.
"""

from __future__ import annotations

import dataclasses
import socket

import jax

from .. import _agreement, _kvstore
from .._mesh import ep_groups
from . import extension


@dataclasses.dataclass(frozen=True)
class PeGroup:
    """This process's PE and what the bootstrap found out about the others."""
    rank: int
    num_ranks: int
    device: object          # the jax Device of this PE
    single_host: bool
    ranks_on_device: int    # PEs sharing this PE's GPU (MPS), for the grid size


def locate(mesh, axis_name, *, timeout_s, prefix, mode="low-latency") -> PeGroup:
    """This process's PE of the EP axis (checks the one-PE-per-process rule; `mode` names
    the mode in the messages)."""
    mod = extension.nvshmem_module()
    groups = ep_groups(mesh, axis_name)
    if groups.shape[0] != 1:
        raise ValueError(f"jax_ep {mode} mode: NVSHMEM forms one EP group; the EP axis "
                         f"{axis_name!r} must span the whole mesh (other axes of size 1).")
    ranks = list(groups[0])
    nranks = len(ranks)
    if nranks > mod.ll_max_ranks():
        raise ValueError(f"jax_ep {mode} mode: at most {mod.ll_max_ranks()} PEs, the EP "
                         f"axis {axis_name!r} has {nranks}.")
    me = jax.process_index()
    local = [r for r, d in enumerate(ranks) if d.process_index == me]
    if len(local) != 1:
        raise ValueError(f"jax_ep {mode} mode: NVSHMEM has one PE per process, so each "
                         f"process must own exactly one device of the EP axis; process {me} "
                         f"owns {len(local)}.")
    if len({d.process_index for d in ranks}) != nranks:
        raise ValueError(f"jax_ep {mode} mode: every EP rank must be its own process.")
    rank = local[0]
    device = ranks[rank]
    where = f"{socket.gethostname()}|{mod.cuda_pci_bus_id(device.local_hardware_id)}"
    if nranks > 1:
        _kvstore.kv_set_bytes(f"{prefix}/where/{rank}", where.encode())
        places = [_kvstore.kv_get_bytes(f"{prefix}/where/{r}", timeout=timeout_s).decode()
                  for r in range(nranks)]
    else:
        places = [where]
    return PeGroup(rank=rank, num_ranks=nranks, device=device,
                   single_host=len({p.split("|")[0] for p in places}) == 1,
                   ranks_on_device=places.count(where))


_current = None  # (rank, num_ranks, device ordinal, heap bytes) while NVSHMEM is up


def init(pes: PeGroup, *, heap_bytes, timeout_s, prefix) -> None:
    """Collective: NVSHMEM up on every PE with a symmetric heap of `heap_bytes` (if unset).

    Reuses an NVSHMEM that is up with the same PEs and a heap at least that
    large; else finalizes it first."""
    global _current
    mod = extension.nvshmem_module()
    layout = (pes.rank, pes.num_ranks, pes.device.local_hardware_id)
    if _current is not None and mod.nvshmem_initialized():
        if _current[:3] == layout and _current[3] >= heap_bytes:
            return
        finalize()
    if pes.rank == 0:
        uid = mod.nvshmem_get_unique_id(pes.single_host)
        if pes.num_ranks > 1:
            _kvstore.kv_set_bytes(f"{prefix}/uid", uid)
    else:
        uid = _kvstore.kv_get_bytes(f"{prefix}/uid", timeout=timeout_s)
    mod.nvshmem_init(uid, pes.rank, pes.num_ranks, pes.device.local_hardware_id,
                     pes.single_host, int(heap_bytes))
    _current = layout + (int(heap_bytes),)


def bootstrap(mesh, axis_name, heap_bytes, *, timeout_s, mode) -> PeGroup:
    """`locate` then `init` (collective), each step agreed across the processes.
    heap_bytes: a function of the PeGroup giving the symmetric heap to ask for."""
    prefix = _kvstore.new_scope("nvshmem")
    pes = _agreement.step(
        mesh, "locating the NVSHMEM PEs",
        lambda: locate(mesh, axis_name, timeout_s=timeout_s, prefix=prefix, mode=mode),
        timeout_s=timeout_s)
    heap = heap_bytes(pes)
    _agreement.step(mesh, "initializing NVSHMEM",
                    lambda: init(pes, heap_bytes=heap, timeout_s=timeout_s, prefix=prefix),
                    timeout_s=timeout_s)
    return pes


def free_regions() -> None:
    """Collective: free the modes' symmetric regions; NVSHMEM stays up (idempotent)."""
    if extension.nvshmem_available():
        extension.nvshmem_module().nvshmem_ll_free()


def finalize() -> None:
    """Collective: free the modes' symmetric regions and finalize NVSHMEM (idempotent)."""
    global _current
    _current = None
    if extension.nvshmem_available():
        extension.nvshmem_module().nvshmem_finalize()
