"""Per-process runtime state: `initialize` / `shutdown` and buffer sizing.

On CPU `initialize` is optional: it records the default backend. On NVIDIA
GPUs it sets up the CUDA backend's peer-to-peer state, once, before any call:

1. one communication buffer per local device of the mesh (sized from the
   problem, see `buffer_size`, or given in bytes);
2. peers mapped: devices of this process by pointer (peer access), devices of
   other processes by CUDA IPC handles exchanged through the jax.distributed
   key-value store — so one process per GPU and one process per host both work;
3. a table device ordinal -> (EP group, rank) for the FFI handlers, one EP
   group per combination of the mesh's other axes;
4. a barrier across processes, so no kernel spins before every peer is mapped.
"""

from __future__ import annotations

import atexit
import dataclasses
import pickle
import warnings

import numpy as np

from . import _backend, _kvstore

DEFAULT_TIMEOUT_S = 60.0


@dataclasses.dataclass
class _State:
    mesh: object = None
    axis_name: object = None
    backend: str = "auto"
    gpu_bytes: int = 0  # data bytes of each communication buffer; 0 = no GPU runtime
    low_latency: bool = False  # NVSHMEM set up (finalised only by an explicit shutdown)


_state: _State | None = None
_generation = 0  # distinguishes KV keys of successive initialize() calls


def buffer_size(num_ranks, max_tokens_per_rank, hidden, *, top_k=8, dtype="bfloat16",
                capacity=None) -> int:
    """Bytes of communication buffer one GPU needs for dispatch/combine.

    Covers a dispatch of [T <= max_tokens_per_rank, hidden] rows of `dtype`
    (or an FP8 pair) with its top-k ids and weights into `capacity` rows
    (default R * T), and a combine of such rows back, including the backward
    passes.
    """
    import jax.numpy as jnp

    itemsize = jnp.dtype(dtype).itemsize
    rows = capacity if capacity is not None else num_ranks * max_tokens_per_rank
    meta = 2 * 4 * top_k  # ids + weights
    dense = rows * (hidden * itemsize + meta)
    fp8 = rows * (hidden + 4 * (hidden // 128) + meta)
    combine = num_ranks * max_tokens_per_rank * max(hidden * itemsize, 4 * top_k)
    return int(max(dense, fp8, combine))


def initialize(mesh=None, axis_name=None, *, backend="auto", max_tokens_per_rank=None,
               hidden=None, top_k=8, dtype="bfloat16", buffer_bytes=None, num_blocks=0,
               timeout_s=DEFAULT_TIMEOUT_S, num_experts=None, low_latency=False):
    """Set up jax_ep for `mesh` (optional on CPU, required for the CUDA backend).

    Args:
      mesh: the jax.sharding.Mesh the EP ops run under, or None.
      axis_name: the EP axis of `mesh` (required when mesh is given).
      backend: default for ops called with backend=None: "reference", "cuda"
        or "auto" (CUDA kernels where this build has them and the mesh is on
        NVIDIA GPUs, the pure-JAX reference elsewhere).
      max_tokens_per_rank, hidden, top_k, dtype: the largest problem the GPU
        buffers must hold (see `buffer_size`); or give `buffer_bytes`.
      num_blocks: thread blocks per kernel (SM budget); 0 = the kernels' default.
      timeout_s: how long a kernel waits for a peer before failing with a
        message naming the rank and what it waited for.
      num_experts, low_latency: with low_latency=True (GPU, NVSHMEM build),
        also bootstrap NVSHMEM and allocate the low-latency buffers for
        max_tokens_per_rank tokens of `hidden` x `dtype`, `num_experts`
        experts and `top_k` (one process per GPU, EP over the whole mesh).
    """
    global _state, _generation
    if mesh is not None and (axis_name is None or axis_name not in mesh.axis_names):
        raise ValueError(f"jax_ep.initialize: axis_name={axis_name!r} must be one of the "
                         f"mesh axes {tuple(mesh.axis_names)}.")
    _backend.set_default_backend(backend)
    if _state is not None and _state.gpu_bytes:
        shutdown()
    state = _State(mesh=mesh, axis_name=axis_name, backend=backend)

    from . import _ffi

    on_gpu = mesh is not None and mesh.devices.flat[0].platform == "gpu"
    if backend == "cuda" and not _ffi.cuda_available():
        from . import _cuda
        raise RuntimeError(f"jax_ep.initialize: backend='cuda': {_cuda.why_unavailable('dispatch')}")
    if _ffi.cuda_available():
        _ffi.ensure_cuda_targets_registered()
    if on_gpu and backend != "reference" and _ffi.intranode_available():
        if buffer_bytes is None:
            if max_tokens_per_rank is None or hidden is None:
                msg = ("jax_ep.initialize: the CUDA backend needs buffer sizes: pass "
                       "max_tokens_per_rank= and hidden= (or buffer_bytes=).")
                if backend == "cuda":
                    raise ValueError(msg)
                warnings.warn(msg + " Falling back to the reference backend.", stacklevel=2)
                _state = state
                return
            buffer_bytes = buffer_size(mesh.shape[axis_name], max_tokens_per_rank, hidden,
                                       top_k=top_k, dtype=dtype)
        _generation += 1
        _setup_gpu(mesh, axis_name, int(buffer_bytes), int(num_blocks), float(timeout_s))
        state.gpu_bytes = int(buffer_bytes)
    if low_latency and on_gpu and backend != "reference":
        _setup_low_latency(mesh, axis_name, max_tokens_per_rank, hidden, num_experts, top_k,
                           dtype, num_blocks, timeout_s)
        state.low_latency = True
    _state = state


def _setup_low_latency(mesh, axis_name, max_tokens_per_rank, hidden, num_experts, top_k,
                       dtype, num_blocks, timeout_s):
    import jax.numpy as jnp

    from . import _ffi, _nvshmem

    if not _ffi.nvshmem_available():
        raise RuntimeError("jax_ep.initialize(low_latency=True): this build has no NVSHMEM "
                           "ops (install nvidia-nvshmem-cu13 and rebuild with nvcc).")
    if None in (max_tokens_per_rank, hidden, num_experts):
        raise ValueError("jax_ep.initialize(low_latency=True) needs max_tokens_per_rank=, "
                         "hidden= and num_experts=.")
    _nvshmem.initialize_low_latency(
        mesh, axis_name, max_tokens_per_rank=max_tokens_per_rank, hidden=hidden,
        num_experts=num_experts, top_k=top_k, itemsize=jnp.dtype(dtype).itemsize,
        timeout_s=timeout_s, num_blocks=num_blocks)


def _ep_coordinates(mesh, axis_name):
    """device -> (EP group, rank): rank along axis_name, group over the other axes."""
    axis = mesh.axis_names.index(axis_name)
    devices = np.asarray(mesh.devices)
    moved = np.moveaxis(devices, axis, -1)
    groups = moved.reshape(-1, moved.shape[-1])
    return {d: (g, r) for g, row in enumerate(groups) for r, d in enumerate(row)}, groups


def _setup_gpu(mesh, axis_name, data_bytes, num_blocks, timeout_s):
    import jax

    from . import _ffi

    mod = _ffi.cuda_module()
    coords, groups = _ep_coordinates(mesh, axis_name)
    me = jax.process_index()
    local = [d for d in mesh.devices.flat if d.process_index == me]
    for d in local:
        mod.comm_create(d.local_hardware_id, data_bytes)

    multi_process = any(d.process_index != me for d in mesh.devices.flat)
    key = lambda g, r: f"jax_ep/{_generation}/peer/{g}/{r}"
    info = {}
    for d in local:
        g, r = coords[d]
        info[(g, r)] = dict(process=me, ordinal=d.local_hardware_id,
                            pointer=mod.comm_local_pointer(d.local_hardware_id),
                            ipc=mod.comm_ipc_handle(d.local_hardware_id))
        if multi_process:
            _kvstore.kv_set_bytes(key(g, r), pickle.dumps(info[(g, r)]))

    def peer_info(g, r):
        if (g, r) not in info:
            info[(g, r)] = pickle.loads(_kvstore.kv_get_bytes(key(g, r), timeout=timeout_s))
        return info[(g, r)]

    for d in local:
        g, rank = coords[d]
        peers = []
        for r in range(groups.shape[1]):
            p = peer_info(g, r)
            if p["process"] != me:
                peers.append(("ipc", p["ipc"]))
            elif p["ordinal"] == d.local_hardware_id:
                peers.append(("self", 0))
            else:
                peers.append(("local", p["pointer"]))
        mod.comm_connect(d.local_hardware_id, rank, groups.shape[1], g, peers)
    mod.comm_set_options(timeout_s, num_blocks)
    if multi_process:
        _kvstore.barrier(f"jax_ep/{_generation}/connected", timeout=timeout_s)


def gpu_ready() -> bool:
    """Whether initialize() set up GPU buffers for the CUDA backend."""
    return _state is not None and _state.gpu_bytes > 0


def check_buffer(op, axis_name, nbytes):
    """Trace-time check that a CUDA call fits the buffers initialize() allocated."""
    if not gpu_ready():
        raise RuntimeError(f"jax_ep.{op}: the CUDA backend needs jax_ep.initialize(mesh, "
                           f"axis_name=..., max_tokens_per_rank=..., hidden=...) first.")
    if _state.axis_name != axis_name:
        raise ValueError(f"jax_ep.{op}: axis_name={axis_name!r} but initialize() set up "
                         f"axis {_state.axis_name!r}.")
    if nbytes > _state.gpu_bytes:
        raise ValueError(
            f"jax_ep.{op}: this call needs {nbytes} bytes of communication buffer but "
            f"initialize() allocated {_state.gpu_bytes}; call jax_ep.initialize with larger "
            f"max_tokens_per_rank / hidden / top_k, or buffer_bytes >= {nbytes}.")


def is_initialized() -> bool:
    return _state is not None


def shutdown(*, at_exit=False):
    """Release what initialize set up (GPU buffers, peer mappings); idempotent.

    Collective when the low-latency mode was set up (NVSHMEM finalize): every
    process calls it. At interpreter exit NVSHMEM is left to the process's end,
    since a peer that already died would hang a collective finalize.
    """
    global _state
    if _state is not None and _state.gpu_bytes:
        from . import _ffi

        _ffi.cuda_module().comm_destroy_all()
    if _state is not None and _state.low_latency and not at_exit:
        from . import _nvshmem

        _nvshmem.shutdown_low_latency()
    _state = None
    _backend.set_default_backend("auto")


atexit.register(shutdown, at_exit=True)
