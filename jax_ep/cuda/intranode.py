"""Intranode mode (NVLink / CUDA IPC): peer setup, buffers and their sizing, custom calls, backend functions.

Setup (`setup`, from `jax_ep.initialize`, outside jit, every process):

1. one communication buffer per local device of the mesh (`buffer_size`
   bytes, or what the caller gives);
2. peers mapped: devices of this process by pointer (peer access), devices of
   other processes by CUDA IPC handles exchanged through the jax.distributed
   key-value store, so one process per GPU and one process per host both work;
3. a table device ordinal -> (EP group, rank) for the FFI handlers, one EP
   group per combination of the mesh's other axes;
4. an agreement across processes after each step (`_agreement.agree`): a
   failure on one raises on all, and no kernel spins before every peer is
   mapped.

The backend functions have the signatures of their `_reference` twins.
Routing (slot / sent) comes from the `jax_ep_route` kernel; the custom calls
only exchange counts and move rows, so no XLA collective runs (several
processes may share one GPU, where NCCL refuses to run).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _agreement, _kvstore
from .._mesh import check_call_mesh, ep_coordinates, ep_groups, group_ids
from .._routing import Routing, handle_from_counts, localize, valid_ids
from . import calls, errors, extension, grid, layout

DISPATCH = "jax_ep_intranode_dispatch"
DISPATCH_CACHED = "jax_ep_intranode_dispatch_cached"
COMBINE = "jax_ep_intranode_combine"
FP8_BLOCK = 128

SETUP_HINT = ("call jax_ep.initialize(mesh, axis_name=..., max_tokens_per_rank=..., "
              "hidden=...) on the GPU mesh first.")


@dataclasses.dataclass(frozen=True)
class _Buffers:
    axis_name: object
    data_bytes: int
    devices: tuple  # local device ordinals holding a buffer
    groups: tuple   # the EP groups as device ids (_mesh.group_ids)


_buffers: _Buffers | None = None


def compiled() -> bool:
    return extension.has_target(COMBINE)


def ready() -> bool:
    """Whether `setup` mapped the buffers."""
    return _buffers is not None


# --------------------------------------------------------------------------
# Buffer sizing: the one formula (the handlers check the same bound at run time)
# --------------------------------------------------------------------------


def dispatch_bytes(capacity, row_bytes) -> int:
    """Data bytes a dispatch of rows of `row_bytes` (one entry per payload) into `capacity` needs."""
    return int(capacity) * int(sum(row_bytes))


def combine_bytes(num_ranks, num_tokens, row_bytes) -> int:
    """Data bytes a combine of one payload of `row_bytes` back to `num_tokens` tokens needs."""
    return int(num_ranks) * int(num_tokens) * int(row_bytes)


def buffer_size(num_ranks, max_tokens_per_rank, hidden, *, top_k=8, dtype="bfloat16",
                capacity=None) -> int:
    """Bytes of communication buffer one GPU needs for dispatch / combine.

    Covers a dispatch of [T <= max_tokens_per_rank, hidden] rows of `dtype`
    (or an FP8 pair) with its top-k ids and weights into `capacity` rows
    (default R * T), a combine of such rows back, and both backward passes.
    """
    itemsize = jnp.dtype(dtype).itemsize
    rows = capacity if capacity is not None else num_ranks * max_tokens_per_rank
    meta = [4 * top_k, 4 * top_k]  # ids + weights
    dense = dispatch_bytes(rows, [hidden * itemsize] + meta)
    fp8 = dispatch_bytes(rows, [hidden, 4 * (hidden // FP8_BLOCK)] + meta)
    # combine of y, and the dispatch VJP's combine of the weight gradients
    combine = combine_bytes(num_ranks, max_tokens_per_rank, max(hidden * itemsize, 4 * top_k))
    return int(max(dense, fp8, combine))


def check_buffer(op, axis_name, nbytes):
    """Trace-time check that a call fits the buffers `setup` allocated."""
    if _buffers is None:
        raise RuntimeError(f"jax_ep.{op}: the CUDA backend needs its buffers: {SETUP_HINT}")
    if _buffers.axis_name != axis_name:
        raise ValueError(f"jax_ep.{op}: axis_name={axis_name!r} but initialize() set up "
                         f"axis {_buffers.axis_name!r}.")
    check_call_mesh(op, axis_name, _buffers.groups)
    if nbytes > _buffers.data_bytes:
        raise ValueError(
            f"jax_ep.{op}: this call needs {nbytes} bytes of communication buffer but "
            f"initialize() allocated {_buffers.data_bytes}; call jax_ep.initialize with larger "
            f"max_tokens_per_rank / hidden / top_k, or buffer_bytes >= {nbytes}.")


# --------------------------------------------------------------------------
# Setup and teardown
# --------------------------------------------------------------------------


IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)


def setup(mesh, axis_name, *, data_bytes, num_blocks, timeout_s):
    """Allocate, exchange and map every local device's buffer (collective, outside jit).

    Each step ends in an agreement across the mesh's processes, so a failure
    on one raises on all of them; on failure this process frees what it made.
    """
    global _buffers
    mod = extension.cuda_module()
    errors.install()
    groups = ep_groups(mesh, axis_name)
    max_ranks = mod.intranode_max_ranks()
    if groups.shape[1] > max_ranks:
        raise ValueError(f"jax_ep.initialize: the intranode kernels support EP groups of at "
                         f"most {max_ranks} ranks; axis {axis_name!r} has {groups.shape[1]}.")
    coords = ep_coordinates(mesh, axis_name)
    me = jax.process_index()
    local = [d for d in mesh.devices.flat if d.process_index == me]
    scope = _kvstore.new_scope("intranode")
    try:
        def allocate():
            for d in local:
                mod.comm_create(d.local_hardware_id, data_bytes)

        def connect(peers):
            for d in local:
                g, rank = coords[d]
                mod.comm_connect(d.local_hardware_id, rank, groups.shape[1], g, peers[d])

        _agreement.step(mesh, "allocating the intranode buffers", allocate, timeout_s=timeout_s)
        peers = _exchange_peers(mesh, scope, coords, groups.shape[1], local, timeout_s)
        _agreement.step(mesh, "mapping the intranode peers", lambda: connect(peers),
                        timeout_s=timeout_s)
        mod.comm_set_options(timeout_s, num_blocks)
        ordinals = [d.local_hardware_id for d in local]
        _agreement.step(mesh, "checking the intranode grid size",
                        lambda: _check_coresident(ordinals, num_blocks), timeout_s=timeout_s)
    except BaseException:
        mod.comm_destroy_all()
        raise
    _buffers = _Buffers(axis_name, int(data_bytes), tuple(d.local_hardware_id for d in local),
                        group_ids(mesh, axis_name))


def _check_coresident(ordinals, num_blocks):
    """The receive kernels spin: a rank's blocks wait for a peer whose kernel must run."""
    mod = extension.cuda_module()
    for o in ordinals:
        grid.check_coresident(mod.comm_info(o), num_blocks, kernels="intranode receive",
                              where=f"CUDA device {o}")


def _exchange_peers(mesh, scope, coords, num_ranks, local, timeout_s):
    """Each local device's peer list for comm_connect: ("self", 0), ("local", pointer) for
    devices of this process, ("ipc", handle) for the others, whose records come
    from the key-value store (JSON, validated; never a pointer)."""
    mod = extension.cuda_module()
    me = jax.process_index()
    mine = {coords[d]: d for d in local}
    remote = [(g, r) for g in {coords[d][0] for d in local} for r in range(num_ranks)
              if (g, r) not in mine]
    if remote:
        for (g, r), d in mine.items():
            record = dict(format=_PEER_FORMAT, process=me, group=g, rank=r,
                          ipc=mod.comm_ipc_handle(d.local_hardware_id).hex())
            _kvstore.kv_set_bytes(f"{scope}/peer/{g}/{r}", json.dumps(record).encode())
    owner = {coords[d]: d.process_index for d in mesh.devices.flat}
    handles = {}
    for g, r in remote:
        try:
            raw = _kvstore.kv_get_bytes(f"{scope}/peer/{g}/{r}", timeout=timeout_s)
        except Exception as err:  # noqa: BLE001 - the client's timeout error type varies
            raise _agreement.DisagreementError(
                f"jax_ep.initialize: process {owner[(g, r)]} (EP group {g}, rank {r}) did not "
                f"publish its intranode buffer within {timeout_s:g} s. Did every process call "
                f"jax_ep.initialize with the same mesh? ({type(err).__name__}: {err})") from None
        handles[(g, r)] = _peer_handle(raw, g, r, owner[(g, r)], me)
    peers = {}
    for d in local:
        g, rank = coords[d]
        peers[d] = [("self", 0) if r == rank
                    else ("local", mod.comm_local_pointer(mine[(g, r)].local_hardware_id))
                    if (g, r) in mine else ("ipc", handles[(g, r)]) for r in range(num_ranks)]
    return peers


_PEER_FORMAT = 1


def _peer_handle(raw, group, rank, process, me):
    """The IPC handle in a peer's record, after checking every field against the mesh."""
    where = f"jax_ep.initialize: the intranode record of EP group {group}, rank {rank}"
    try:
        record = json.loads(raw.decode())
        ok = (isinstance(record, dict) and record.get("format") == _PEER_FORMAT
              and record.get("process") == process and record.get("process") != me
              and record.get("group") == group and record.get("rank") == rank
              and isinstance(record.get("ipc"), str))
        handle = bytes.fromhex(record["ipc"]) if ok else b""
    except (UnicodeDecodeError, ValueError, KeyError):
        ok, handle = False, b""
    if not ok or len(handle) != IPC_HANDLE_BYTES:
        raise _agreement.DisagreementError(
            f"{where} is malformed or not from process {process} (format "
            f"{_PEER_FORMAT}, a {IPC_HANDLE_BYTES}-byte CUDA IPC handle expected): do all "
            f"processes run the same jax_ep version?")
    return handle


def teardown(mesh=None, *, timeout_s=60.0):
    """Free every buffer and close the peer mappings (idempotent).

    With `mesh` (a collective shutdown, every process): wait for the devices,
    close this process's mappings of the peers' buffers, agree that every
    process did, then free, since freeing a buffer a peer still has mapped
    is undefined. Without it (interpreter exit, or a failed setup), free at
    once. The buffers are freed even when the agreement fails (a peer gone).
    """
    global _buffers
    if _buffers is None:
        return
    mod = extension.cuda_module()
    try:
        if mesh is not None:
            mod.comm_close_peers()
            _agreement.agree(mesh, "closing the intranode peer mappings", None,
                             timeout_s=timeout_s)
    finally:
        mod.comm_destroy_all()
        _buffers = None


def info() -> dict | None:
    """What `setup` made: {"data_bytes", "devices": {ordinal: the runtime's comm info}}."""
    if _buffers is None:
        return None
    mod = extension.cuda_module()
    return dict(data_bytes=_buffers.data_bytes, axis_name=_buffers.axis_name,
                devices={o: dict(mod.comm_info(o)) for o in _buffers.devices})


# --------------------------------------------------------------------------
# Custom calls (they only describe operands, attributes and results)
# --------------------------------------------------------------------------


def dispatch_call(axis_index, slot, sent, payloads, *, capacity):
    """Count exchange + row transfer. axis_index int32 [], slot int32 [T, R], sent
    int32 [R], payloads [T, ...] -> (rank_counts int32 [R, R], *payloads moved to
    [capacity, ...])."""
    extension.register_targets()
    num_ranks = jax.typeof(sent).shape[0]
    flat = [calls.as_rows(p) for p in payloads]
    result_types = [extension.result_type(jax.typeof(sent), (num_ranks, num_ranks), jnp.int32)]
    result_types += [calls.moved_type(p, capacity) for p in flat]
    counts, *recv = calls.comm_call(DISPATCH, result_types,
        axis_index, slot, sent, *flat, capacity=np.int64(capacity))
    return [counts] + [r.reshape((capacity,) + tuple(p.shape[1:])) for r, p in zip(recv, payloads)]


def dispatch_cached_call(axis_index, token_slot, rank_counts, payloads, *, capacity):
    """Row transfer with known counts (the handle's): payloads [T, ...] -> [capacity, ...]."""
    extension.register_targets()
    flat = [calls.as_rows(p) for p in payloads]
    result_types = [calls.moved_type(p, capacity) for p in flat]
    recv = calls.comm_call(DISPATCH_CACHED, result_types,
        axis_index, token_slot, rank_counts, *flat, capacity=np.int64(capacity))
    return [r.reshape((capacity,) + tuple(p.shape[1:])) for r, p in zip(recv, payloads)]


def combine_call(axis_index, y, token_slot, rank_counts):
    """Rank-ordered float32 sum of each token's rows: y [capacity, ...] -> [T, ...]."""
    extension.register_targets()
    num_tokens = jax.typeof(token_slot).shape[0]
    flat = calls.as_rows(y)
    out_type = extension.result_type(jax.typeof(flat), (num_tokens, flat.shape[1]), flat.dtype)
    out = calls.comm_call(COMBINE, out_type, axis_index, flat, token_slot, rank_counts)
    return out.reshape((num_tokens,) + tuple(y.shape[1:]))


# --------------------------------------------------------------------------
# Backend functions (signatures of the `_reference` twins)
# --------------------------------------------------------------------------


def dispatch(parts, topk_idx, topk_weights, *, num_experts, axis_name, capacity):
    num_ranks = lax.axis_size(axis_name)
    idx, num_invalid = valid_ids(topk_idx, num_experts)
    slot, sent = layout.route_ffi(topk_idx, num_experts=num_experts, num_ranks=num_ranks)
    routing = Routing(idx, num_invalid, slot, sent)
    payloads = list(parts) + [routing.idx, topk_weights]
    check_buffer("dispatch", axis_name,
                 dispatch_bytes(capacity, [calls.row_bytes(p) for p in payloads]))
    rank_counts, *recv = dispatch_call(calls.axis_index(axis_name), routing.slot, routing.sent,
                                       payloads, capacity=capacity)
    handle = handle_from_counts(routing, rank_counts, num_experts=num_experts,
                                axis_name=axis_name, capacity=capacity)
    *recv_parts, recv_idx, recv_w = recv
    recv_idx, recv_w, handle = localize(recv_idx, recv_w, handle)
    return recv_parts, recv_idx, recv_w, handle


def dispatch_rows(parts, handle):
    check_buffer("dispatch", handle.axis_name,
                 dispatch_bytes(handle.capacity, [calls.row_bytes(p) for p in parts]))
    return dispatch_cached_call(calls.axis_index(handle.axis_name), handle.token_slot,
                                handle.rank_counts, list(parts), capacity=handle.capacity)


def combine_rows(parts, handle):
    out = []
    for part in parts:
        check_buffer("combine", handle.axis_name,
                     combine_bytes(handle.num_ranks, handle.num_tokens, calls.row_bytes(part)))
        out.append(combine_call(calls.axis_index(handle.axis_name), part, handle.token_slot,
                                handle.rank_counts))
    return out
