"""NVSHMEM bootstrap and ffi_call wrappers of the low-latency (decode) CUDA ops.

Bootstrap (`initialize_low_latency`, outside jit, every process, same order):

1. NVSHMEM has one PE per process, bound to one GPU: the EP axis must span the
   whole mesh and each process must own exactly one of its devices. PE index
   = EP rank.
2. Hostnames go through the jax.distributed key-value store; when all PEs are
   on one host the single-host NVSHMEM defaults apply (no remote transport,
   no NCCL, bootstrap over `lo`). `NVSHMEM_DISABLE_NVLS=1` always.
3. EP rank 0 makes the 128-byte unique id (`nvshmemx_get_uniqueid`, inside
   the extension: nvshmem4py is not needed), publishes it in the KV store,
   every PE calls `nvshmem_init(uid, rank, nranks, device)` which runs
   `nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID)` from inside the module
   holding the kernels, so their NVSHMEM device state is registered (also
   after a prior nvshmem4py init: NVSHMEM counts references).
4. Collective allocation of the double-buffered symmetric region sized from
   (max_tokens_per_rank, hidden, num_experts, top_k, itemsize), then a
   barrier. The symmetric heap (NVSHMEM_SYMMETRIC_SIZE, unless set) is sized
   to fit it.

The wrappers describe the custom calls only (operands, attributes, result
types); checks for users and the custom_vjp rules belong in jax_ep._ops.
Conventions (see ffi/handlers/low_latency.cc): R = EP size, M =
max_tokens_per_rank, L = num_experts // R. `slot[t, k]` is the row of
(token t, expert topk_idx[t, k]) among that expert's R * M rows on its owner
(not the flattened L * R * M index of LowLatencyHandle.slot: add
`(topk_idx % L) * R * M` where slot >= 0 to convert). `recv_src[l, p]` =
`s * M + t` of row p of local expert l, -1 past recv_count[l].
"""

from __future__ import annotations

import os
import socket

import jax
import jax.numpy as jnp
import numpy as np

from . import _ffi, _kvstore

__all__ = [
    "initialize_low_latency",
    "shutdown_low_latency",
    "low_latency_info",
    "ll_dispatch",
    "ll_dispatch_send",
    "ll_dispatch_recv",
    "ll_combine",
    "ll_combine_send",
    "ll_combine_recv",
    "ll_gather",
    "ll_dispatch_cached",
]

LL_DISPATCH = "jax_ep_ll_dispatch"
LL_DISPATCH_SEND = "jax_ep_ll_dispatch_send"
LL_DISPATCH_RECV = "jax_ep_ll_dispatch_recv"
LL_COMBINE = "jax_ep_ll_combine"
LL_COMBINE_SEND = "jax_ep_ll_combine_send"
LL_COMBINE_RECV = "jax_ep_ll_combine_recv"
LL_GATHER = "jax_ep_ll_gather"
LL_DISPATCH_CACHED = "jax_ep_ll_dispatch_cached"

FP8_BLOCK = 128
# Symmetric-heap headroom for NVSHMEM's own allocations (teams, psync, ...).
_HEAP_HEADROOM = 128 << 20

_generation = 0  # distinguishes KV keys of successive initializations


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def initialize_low_latency(mesh, axis_name, *, max_tokens_per_rank, hidden, num_experts,
                           top_k, itemsize=2, send_buffer=None, force_put=None,
                           timeout_s=60.0, num_blocks=0):
    """Set up NVSHMEM and the low-latency buffers for the EP axis of `mesh`.

    Collective: every process of the mesh calls it, outside jit, in the same
    order relative to other jax_ep setup calls. Returns the extension's info
    dict (rank, num_ranks, layout, num_blocks, ...).

    Args:
      max_tokens_per_rank, hidden, num_experts, top_k: the largest problem;
        every later call must fit (M, H, E, K no larger, same EP size).
      itemsize: bytes per element of x / y (2 for bf16 / f16, 4 for f32).
      send_buffer: allocate the staging rows NVSHMEM puts need. Default: when
        the PEs span several hosts or force_put is on.
      force_put: move every row with NVSHMEM puts even to peers reachable by
        loads / stores (tests the remote path on one host). Default: the
        environment variable JAX_EP_LL_FORCE_PUT.
      timeout_s: spin-wait limit before a kernel reports which PE it waited for.
      num_blocks: thread blocks per kernel; 0 = SMs / PEs sharing the GPU.
    """
    global _generation
    mod = _ffi.nvshmem_module()
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name={axis_name!r} is not one of the mesh axes "
                         f"{tuple(mesh.axis_names)}")
    devices = np.asarray(mesh.devices)
    axis = mesh.axis_names.index(axis_name)
    groups = np.moveaxis(devices, axis, -1).reshape(-1, devices.shape[axis])
    if groups.shape[0] != 1:
        raise ValueError("jax_ep low-latency mode: NVSHMEM forms one EP group; the EP axis "
                         f"{axis_name!r} must span the whole mesh (other axes of size 1).")
    ranks = list(groups[0])
    nranks = len(ranks)
    me = jax.process_index()
    local = [r for r, d in enumerate(ranks) if d.process_index == me]
    if len(local) != 1:
        raise ValueError("jax_ep low-latency mode: NVSHMEM has one PE per process, so each "
                         f"process must own exactly one device of the EP axis; process {me} "
                         f"owns {len(local)}.")
    rank = local[0]
    device = ranks[rank]
    if len({d.process_index for d in ranks}) != nranks:
        raise ValueError("jax_ep low-latency mode: every EP rank must be its own process.")
    if force_put is None:
        force_put = _env_true("JAX_EP_LL_FORCE_PUT")

    _generation += 1
    prefix = f"jax_ep/nvshmem/{_generation}"
    # (host, GPU) of every PE: single host? how many PEs share my GPU (grid size)?
    where = f"{socket.gethostname()}|{mod.cuda_pci_bus_id(device.local_hardware_id)}"
    if nranks > 1:
        _kvstore.kv_set_bytes(f"{prefix}/where/{rank}", where.encode())
        places = [_kvstore.kv_get_bytes(f"{prefix}/where/{r}", timeout=timeout_s).decode()
                  for r in range(nranks)]
    else:
        places = [where]
    single_host = len({p.split("|")[0] for p in places}) == 1
    ranks_on_device = places.count(where)
    if send_buffer is None:
        send_buffer = bool(force_put) or not single_host
    heap = mod.nvshmem_ll_region_bytes(nranks, max_tokens_per_rank, hidden, num_experts, top_k,
                                       itemsize, bool(send_buffer)) + _HEAP_HEADROOM
    if rank == 0:
        uid = mod.nvshmem_get_unique_id(single_host)
        if nranks > 1:
            _kvstore.kv_set_bytes(f"{prefix}/uid", uid)
    else:
        uid = _kvstore.kv_get_bytes(f"{prefix}/uid", timeout=timeout_s)
    mod.nvshmem_init(uid, rank, nranks, device.local_hardware_id, single_host, heap)
    mod.nvshmem_ll_set_options(float(timeout_s), int(num_blocks), int(bool(force_put)),
                               int(ranks_on_device))
    info = mod.nvshmem_ll_alloc(max_tokens_per_rank, hidden, num_experts, top_k, itemsize,
                                bool(send_buffer))
    # Rank 0's bootstrap socket must outlive everyone's init; no kernel spins
    # before every PE has zeroed its region (nvshmem_ll_alloc ends in an
    # NVSHMEM barrier too).
    _kvstore.barrier(f"{prefix}/ready", timeout=timeout_s)
    _ffi.ensure_cuda_targets_registered()
    return info


def shutdown_low_latency():
    """Collective: free the region and finalize NVSHMEM (idempotent)."""
    mod = _ffi._nvshmem_module()
    if mod is not None:
        mod.nvshmem_finalize()


def low_latency_info():
    """The extension's info dict, or None when this build has no NVSHMEM ops."""
    mod = _ffi._nvshmem_module()
    return None if mod is None else mod.nvshmem_ll_info()


# ----------------------------------------------------------------------------
# ffi_call wrappers (inside shard_map: every argument is this rank's shard)
# ----------------------------------------------------------------------------

def _num_ranks(num_ranks):
    if num_ranks is not None:
        return int(num_ranks)
    info = low_latency_info()
    if not info or not info["allocated"]:
        raise RuntimeError("jax_ep low-latency ops: call initialize_low_latency first (or pass "
                           "num_ranks= to trace without it).")
    return int(info["num_ranks"])


def _attrs(max_tokens_per_rank, num_experts):
    return dict(max_tokens_per_rank=np.int64(max_tokens_per_rank),
                num_experts=np.int64(num_experts))


def _token_type(like):
    return _ffi._result_type(jax.typeof(like), (2,), jnp.int32)


def _dispatch_results(like, x_dtype, hidden, num_tokens, top_k, num_ranks, num_experts,
                      max_tokens_per_rank, use_fp8):
    L = num_experts // num_ranks
    RM = num_ranks * max_tokens_per_rank
    t = jax.typeof(like)
    types = [
        _ffi._result_type(t, (L, RM, hidden), jnp.float8_e4m3fn if use_fp8 else x_dtype),
        _ffi._result_type(t, (L,), jnp.int32),
        _ffi._result_type(t, (L, RM), jnp.int32),
        _ffi._result_type(t, (num_tokens, top_k), jnp.int32),
    ]
    if use_fp8:
        types.append(_ffi._result_type(t, (L, RM, hidden // FP8_BLOCK), jnp.float32))
    return types


def _pack_dispatch(out, use_fp8):
    recv_x, recv_count, recv_src, slot, *scales = out
    return ((recv_x, scales[0]) if use_fp8 else recv_x), recv_count, recv_src, slot


def ll_dispatch(x, topk_idx, *, num_experts, max_tokens_per_rank, use_fp8=False,
                zero_fill=True, num_ranks=None):
    """x [T, H] (bf16 / f16 / f32), topk_idx int32 [T, K] ->
    (recv_x [L, R*M, H] or (e4m3 [L, R*M, H], f32 scales [L, R*M, H/128]),
    recv_count int32 [L], recv_src int32 [L, R*M], slot int32 [T, K])."""
    _ffi.ensure_cuda_targets_registered()
    R = _num_ranks(num_ranks)
    T, H = jax.typeof(x).shape
    K = jax.typeof(topk_idx).shape[1]
    types = _dispatch_results(x, jax.typeof(x).dtype, H, T, K, R, num_experts,
                              max_tokens_per_rank, use_fp8)
    out = jax.ffi.ffi_call(LL_DISPATCH, types)(
        x, topk_idx, use_fp8=bool(use_fp8), zero_fill=bool(zero_fill),
        **_attrs(max_tokens_per_rank, num_experts))
    return _pack_dispatch(out, use_fp8)


def ll_dispatch_send(x, topk_idx, *, num_experts, max_tokens_per_rank, use_fp8=False):
    """Send half of ll_dispatch: returns the int32 [2] token ll_dispatch_recv takes."""
    _ffi.ensure_cuda_targets_registered()
    return jax.ffi.ffi_call(LL_DISPATCH_SEND, _token_type(x))(
        x, topk_idx, use_fp8=bool(use_fp8), **_attrs(max_tokens_per_rank, num_experts))


def ll_dispatch_recv(token, topk_idx, *, hidden, x_dtype, num_experts, max_tokens_per_rank,
                     use_fp8=False, zero_fill=True, num_ranks=None):
    """Receive half of ll_dispatch (same results); x_dtype / hidden of the sent x."""
    _ffi.ensure_cuda_targets_registered()
    R = _num_ranks(num_ranks)
    T, K = jax.typeof(topk_idx).shape
    types = _dispatch_results(topk_idx, x_dtype, hidden, T, K, R, num_experts,
                              max_tokens_per_rank, use_fp8)
    out = jax.ffi.ffi_call(LL_DISPATCH_RECV, types)(
        token, topk_idx, use_fp8=bool(use_fp8), zero_fill=bool(zero_fill),
        **_attrs(max_tokens_per_rank, num_experts))
    return _pack_dispatch(out, use_fp8)


def _moe_attrs(y, num_ranks):
    L, RM, H = jax.typeof(y).shape
    R = _num_ranks(num_ranks)
    if RM % R:
        raise ValueError(f"y's second dimension {RM} is not a multiple of the EP size {R}")
    return L, RM // R, H, L * R


def ll_combine(y, topk_idx, topk_weights, recv_src, recv_count, slot, *, num_ranks=None):
    """out[t] = sum_k w[t, k] * y_owner[row of (t, k)] in fp32, k order, cast to y's dtype.

    slot: ll_dispatch's [T, K] slot (at one rank the rows are read from y
    there)."""
    _ffi.ensure_cuda_targets_registered()
    L, M, H, E = _moe_attrs(y, num_ranks)
    T = jax.typeof(topk_idx).shape[0]
    out_type = _ffi._result_type(jax.typeof(y), (T, H), jax.typeof(y).dtype)
    return jax.ffi.ffi_call(LL_COMBINE, out_type)(
        y, topk_idx, topk_weights, recv_src, recv_count, slot, **_attrs(M, E))


def ll_combine_send(y, recv_src, recv_count, *, num_ranks=None):
    """Send half of ll_combine: returns the int32 [2] token ll_combine_recv takes."""
    _ffi.ensure_cuda_targets_registered()
    L, M, H, E = _moe_attrs(y, num_ranks)
    return jax.ffi.ffi_call(LL_COMBINE_SEND, _token_type(y))(
        y, recv_src, recv_count, **_attrs(M, E))


def ll_combine_recv(token, topk_idx, topk_weights, *, hidden, y_dtype, num_experts,
                    max_tokens_per_rank):
    """Receive half of ll_combine: [T, H] of the sent y's dtype."""
    _ffi.ensure_cuda_targets_registered()
    T = jax.typeof(topk_idx).shape[0]
    out_type = _ffi._result_type(jax.typeof(topk_weights), (T, hidden), y_dtype)
    return jax.ffi.ffi_call(LL_COMBINE_RECV, out_type)(
        token, topk_idx, topk_weights, **_attrs(max_tokens_per_rank, num_experts))


def ll_gather(y, topk_idx, recv_src, recv_count, slot, *, num_ranks=None):
    """[T, K, H]: the row of each (t, k) from its expert's owner, 0 for invalid ids
    (slot as in ll_combine)."""
    _ffi.ensure_cuda_targets_registered()
    L, M, H, E = _moe_attrs(y, num_ranks)
    T, K = jax.typeof(topk_idx).shape
    out_type = _ffi._result_type(jax.typeof(y), (T, K, H), jax.typeof(y).dtype)
    return jax.ffi.ffi_call(LL_GATHER, out_type)(
        y, topk_idx, recv_src, recv_count, slot, **_attrs(M, E))


def ll_dispatch_cached(x, topk_idx, slot, recv_count, scale=None, *, num_experts,
                       max_tokens_per_rank, zero_fill=True, num_ranks=None):
    """Dispatch with known slots: [T, H] -> [L, R*M, H]; the row sent to expert e
    is x[t] * (sum of scale[t, k] over the k naming e), once per distinct
    expert; rows past recv_count are zero (zero_fill)."""
    _ffi.ensure_cuda_targets_registered()
    R = _num_ranks(num_ranks)
    T, H = jax.typeof(x).shape
    L = num_experts // R
    out_type = _ffi._result_type(jax.typeof(x), (L, R * max_tokens_per_rank, H),
                                 jax.typeof(x).dtype)
    operands = [x, topk_idx, slot, recv_count] + ([] if scale is None else [scale])
    return jax.ffi.ffi_call(LL_DISPATCH_CACHED, out_type)(
        *operands, zero_fill=bool(zero_fill), **_attrs(max_tokens_per_rank, num_experts))
