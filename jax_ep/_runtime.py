"""`initialize` / `shutdown`: which modes to set up, in which order, and what is in force.

On CPU `initialize` is optional: it records the default backend (and the
node grouping). On NVIDIA GPUs it sets up the CUDA backend's modes once,
before any call: the intranode buffers (`cuda.intranode.setup`), or, when
the EP axis spans several nodes, NVSHMEM and the internode region
(`cuda.internode.setup`); with `low_latency=True` also NVSHMEM and the
low-latency region (`cuda.low_latency.setup`). The modes own their state;
this module only orchestrates and reports it (`runtime_info`).
"""

from __future__ import annotations

import atexit
import dataclasses
import numbers
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from . import _agreement, _backend, _topology, cuda
from .cuda import calls
from .options import Options

DEFAULT_TIMEOUT_S = 60.0


@dataclasses.dataclass
class _State:
    mesh: object = None
    axis_name: object = None
    backend: str = "auto"
    options: Options = dataclasses.field(default_factory=Options)
    timeout_s: float = DEFAULT_TIMEOUT_S
    ranks_per_node: int | None = None
    intranode: bool = False    # cuda.intranode buffers set up
    internode: bool = False    # cuda.internode region set up (the EP axis spans nodes)
    low_latency: bool = False  # NVSHMEM set up (finalised only by an explicit shutdown)


_state: _State | None = None


def initialize(mesh=None, axis_name=None, *, backend="auto", max_tokens_per_rank=None,
               hidden=None, top_k=8, dtype="bfloat16", buffer_bytes=None, num_blocks=0,
               timeout_s=DEFAULT_TIMEOUT_S, num_experts=None, low_latency=False,
               options=None, ranks_per_node=None):
    """Set up jax_ep for `mesh` (optional on CPU, required for the CUDA backend).

    Collective: every process of the mesh calls it with the same arguments.
    Before anything is allocated the processes compare a fingerprint of their
    whole configuration (these arguments, the options, the mesh, jax_ep's
    version and build) and all raise, naming the differences, when they
    disagree. Each setup step ends in an agreement, so a failure on one
    process raises on all; a failed initialize leaves nothing behind. Call
    `shutdown` before initializing again.

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
        message naming the rank and what it waited for; also the bound of
        every wait for another process during setup.
      num_experts, low_latency: with low_latency=True (GPU, NVSHMEM build),
        also bootstrap NVSHMEM and allocate the low-latency buffers for
        max_tokens_per_rank tokens of `hidden` x `dtype`, `num_experts`
        experts and `top_k` (one process per GPU, EP over the whole mesh).
      options: a `jax_ep.Options` with the kernels' switches; None =
        `Options.from_env()` (the defaults, with their environment variables
        applied).
      ranks_per_node: G, the ranks of one node (NVLink domain): the EP axis of
        R ranks is then N = R / G nodes of G consecutive ranks, and combine
        (with the VJP of dispatch) sums each token's rows within a node in
        rank order, rounds each node's partial to y's dtype and sums the
        partials in node order (docs/design.md §2.16). None or R: one node,
        plain rank order. Must be a positive int dividing the EP axis size;
        only with a mesh.
    """
    global _state
    if _state is not None:
        raise RuntimeError(
            f"jax_ep.initialize: jax_ep is already initialized (backend={_state.backend!r}, "
            f"axis {_state.axis_name!r}); call jax_ep.shutdown() on every process first.")
    if mesh is not None and (axis_name is None or axis_name not in mesh.axis_names):
        raise ValueError(f"jax_ep.initialize: axis_name={axis_name!r} must be one of the "
                         f"mesh axes {tuple(mesh.axis_names)}.")
    if backend not in _backend.BACKENDS:
        raise ValueError(f"jax_ep.initialize: backend must be one of {_backend.BACKENDS}, "
                         f"got {backend!r}.")
    if options is None:
        options = Options.from_env()
    elif not isinstance(options, Options):
        raise TypeError(f"jax_ep.initialize: options must be a jax_ep.Options, got "
                        f"{type(options).__name__}.")
    if not (isinstance(timeout_s, (int, float)) and 0 < timeout_s < 1e9):
        raise ValueError(f"jax_ep.initialize: timeout_s must be a positive number of "
                         f"seconds, got {timeout_s!r}.")
    timeout_s = float(timeout_s)
    ranks_per_node = _check_ranks_per_node(ranks_per_node, mesh, axis_name)
    if mesh is not None:
        _agreement.compare_configs(mesh, _fingerprint(
            mesh, axis_name, backend=backend, max_tokens_per_rank=max_tokens_per_rank,
            hidden=hidden, top_k=top_k, dtype=dtype, buffer_bytes=buffer_bytes,
            num_blocks=num_blocks, timeout_s=timeout_s, num_experts=num_experts,
            low_latency=low_latency, options=options, ranks_per_node=ranks_per_node),
            timeout_s=timeout_s)

    state = _State(mesh=mesh, axis_name=axis_name, backend=backend, options=options,
                   timeout_s=timeout_s, ranks_per_node=ranks_per_node)
    on_gpu = mesh is not None and mesh.devices.flat[0].platform == "gpu"
    if backend == "cuda" and not cuda.extension.cuda_available():
        raise RuntimeError(f"jax_ep.initialize: backend='cuda': "
                           f"{cuda.why_unavailable('dispatch')}")
    if cuda.extension.cuda_available():
        cuda.extension.register_targets()
    try:
        node_size = _node_size(mesh, axis_name, ranks_per_node, backend, on_gpu, timeout_s)
        if node_size is not None:
            ranks_per_node = node_size  # found from the hosts when not given
            state.ranks_per_node = node_size
            _setup_internode(state, mesh, axis_name, node_size, backend=backend,
                             max_tokens_per_rank=max_tokens_per_rank, hidden=hidden,
                             top_k=top_k, dtype=dtype, num_blocks=num_blocks,
                             low_latency=low_latency, num_experts=num_experts)
        elif on_gpu and backend != "reference" and cuda.intranode.compiled():
            data_bytes = _intranode_bytes(mesh, axis_name, backend, buffer_bytes,
                                          max_tokens_per_rank, hidden, top_k, dtype)
            if data_bytes:
                cuda.intranode.setup(mesh, axis_name, data_bytes=data_bytes,
                                     num_blocks=int(num_blocks), timeout_s=timeout_s)
                state.intranode = True
        if low_latency and on_gpu and backend != "reference":
            if not cuda.extension.nvshmem_available():
                raise RuntimeError("jax_ep.initialize(low_latency=True): this build has no "
                                   "NVSHMEM ops (install nvidia-nvshmem-cu13 and rebuild with "
                                   "nvcc).")
            if None in (max_tokens_per_rank, hidden, num_experts):
                raise ValueError("jax_ep.initialize(low_latency=True) needs "
                                 "max_tokens_per_rank=, hidden= and num_experts=.")
            state.low_latency = True  # from here on, a failure tears NVSHMEM down
            cuda.low_latency.setup(
                mesh, axis_name, max_tokens_per_rank=max_tokens_per_rank, hidden=hidden,
                num_experts=num_experts, top_k=top_k, itemsize=jnp.dtype(dtype).itemsize,
                options=options, timeout_s=timeout_s, num_blocks=int(num_blocks),
                ranks_per_node=ranks_per_node)
    except BaseException:
        _teardown(state, collective=False)
        raise
    _backend.set_default_backend(backend)
    _topology.set_ranks_per_node(ranks_per_node)
    calls.set_comm_stream(options.comm_stream)
    _state = state


def _check_ranks_per_node(value, mesh, axis_name):
    """None, or a positive int dividing the EP axis size (returned as an int)."""
    if value is None:
        return None
    if mesh is None:
        raise ValueError(f"jax_ep.initialize: ranks_per_node={value!r} needs the mesh it "
                         f"groups: pass mesh= and axis_name=, or leave ranks_per_node=None.")
    num_ranks = int(mesh.shape[axis_name])
    divisors = [g for g in range(1, num_ranks + 1) if num_ranks % g == 0]
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0
            or num_ranks % int(value)):
        raise ValueError(
            f"jax_ep.initialize: ranks_per_node must be None or a positive int dividing the "
            f"EP axis size ({num_ranks} ranks on axis {axis_name!r}), got {value!r}; pass one "
            f"of {divisors} or None.")
    return int(value)


def _node_size(mesh, axis_name, ranks_per_node, backend, on_gpu, timeout_s):
    """G when the CUDA internode kernels run (the EP axis spans N > 1 nodes), else None.

    ranks_per_node=None finds the nodes from the hosts of the mesh's processes."""
    if not on_gpu or backend == "reference":
        return None
    num_ranks = int(mesh.shape[axis_name])
    if not cuda.internode.compiled():
        if ranks_per_node is not None and ranks_per_node < num_ranks and backend == "cuda":
            raise RuntimeError(f"jax_ep.initialize(ranks_per_node={ranks_per_node}): this "
                               f"build has no internode (NVSHMEM) kernels (install "
                               f"nvidia-nvshmem-cu13 and rebuild with nvcc).")
        return None
    size = cuda.internode.node_size(mesh, axis_name, ranks_per_node, timeout_s=timeout_s)
    return size if size < num_ranks else None


def _setup_internode(state, mesh, axis_name, node_size, *, backend, max_tokens_per_rank, hidden,
                     top_k, dtype, num_blocks, low_latency, num_experts):
    """The internode region for dispatch / combine (NVSHMEM, which the low-latency
    mode then shares: the heap is sized for both)."""
    if max_tokens_per_rank is None or hidden is None:
        msg = ("jax_ep.initialize: the internode kernels need buffer sizes: pass "
               "max_tokens_per_rank= and hidden=.")
        if backend == "cuda":
            raise ValueError(msg)
        warnings.warn(msg + " Falling back to the reference backend.", stacklevel=3)
        return
    itemsize = jnp.dtype(dtype).itemsize
    extra = 0
    if low_latency and None not in (num_experts,):
        extra = cuda.low_latency.region_bytes(int(mesh.shape[axis_name]), max_tokens_per_rank,
                                              hidden, num_experts, top_k, itemsize)
    state.internode = True  # from here on, a failure frees the region (collectively)
    cuda.internode.setup(mesh, axis_name, ranks_per_node=node_size,
                         max_tokens_per_rank=max_tokens_per_rank, hidden=hidden, top_k=top_k,
                         itemsize=itemsize, num_blocks=int(num_blocks),
                         timeout_s=state.timeout_s, extra_heap_bytes=extra)


def _intranode_bytes(mesh, axis_name, backend, buffer_bytes, max_tokens_per_rank, hidden,
                     top_k, dtype):
    """The intranode data bytes to allocate; 0 (with a warning) under "auto" without sizes."""
    if buffer_bytes is not None:
        return int(buffer_bytes)
    if max_tokens_per_rank is None or hidden is None:
        msg = ("jax_ep.initialize: the CUDA backend needs buffer sizes: pass "
               "max_tokens_per_rank= and hidden= (or buffer_bytes=).")
        if backend == "cuda":
            raise ValueError(msg)
        warnings.warn(msg + " Falling back to the reference backend.", stacklevel=3)
        return 0
    return cuda.intranode.buffer_size(mesh.shape[axis_name], max_tokens_per_rank, hidden,
                                      top_k=top_k, dtype=dtype)


def _fingerprint(mesh, axis_name, *, options, dtype, **arguments) -> dict:
    """Everything the processes of one job must agree on, as JSON-able values."""
    build = cuda.extension.build_info()
    return dict(
        arguments,
        dtype=None if dtype is None else jnp.dtype(dtype).name,
        axis_name=str(axis_name),
        mesh_axes=[str(a) for a in mesh.axis_names],
        mesh_shape=[int(n) for n in np.shape(mesh.devices)],
        mesh_device_ids=[int(d.id) for d in mesh.devices.flat],
        options=options.as_dict(),
        jax_ep_version=build["version"],
        jax_ep_build={k: build.get(k) for k in ("cuda", "nvshmem", "cuda_archs",
                                                 "nvshmem_version", "ffi_api_version")},
    )


def is_initialized() -> bool:
    return _state is not None


def runtime_info() -> dict:
    """What is in force: {"initialized", "backend", "options", "ranks_per_node",
    "intranode", "internode", "low_latency"}.

    "options" is the `Options` given to (or derived by) `initialize`;
    "ranks_per_node" the node grouping given to `initialize` (an int) or None;
    "intranode" the buffer size and each local device's communicator (rank,
    num_ranks, num_blocks, timeout_s, ...) or None; "internode" the internode
    runtime's state (rank, ranks_per_node, num_nodes, num_blocks, region) when
    the EP axis spans nodes, else None; "low_latency" the NVSHMEM
    runtime's state (rank, layout and the settings in effect: force_put,
    system_scope, gpu_scope, pdl, stream_combine, phase_trace, num_blocks,
    timeout_s) or None when the mode was not set up.
    """
    if _state is None:
        return dict(initialized=False, backend=_backend.default_backend(), options=None,
                    ranks_per_node=None, intranode=None, internode=None, low_latency=None)
    return dict(initialized=True, backend=_state.backend, options=_state.options,
                ranks_per_node=_state.ranks_per_node,
                intranode=cuda.intranode.info() if _state.intranode else None,
                internode=cuda.internode.info() if _state.internode else None,
                low_latency=cuda.low_latency.info() if _state.low_latency else None)


def _teardown(state, *, collective=True, at_exit=False):
    """Undo what `state` records. collective: agree with the peers first (a normal
    shutdown); a failed initialize has agreed on its failure already."""
    mesh = state.mesh if collective and not at_exit else None
    try:
        if state.intranode:
            cuda.intranode.teardown(mesh, timeout_s=state.timeout_s)
    finally:
        try:
            if state.internode and not at_exit:
                cuda.internode.teardown(mesh, timeout_s=state.timeout_s)
        finally:
            if state.low_latency and not at_exit:
                cuda.low_latency.teardown(mesh, timeout_s=state.timeout_s)


def shutdown(*, at_exit=False):
    """Release what initialize set up (GPU buffers, peer mappings); idempotent.

    Collective: every process of the mesh calls it. It waits for the devices,
    agrees with the peers (bounded by initialize's timeout_s) and only then
    frees what a peer may still map. At interpreter exit nothing is agreed
    and NVSHMEM is left to the process's end, since a peer that already died
    would hang a collective finalize.
    """
    global _state
    state, _state = _state, None
    _backend.set_default_backend("auto")
    _topology.set_ranks_per_node(None)
    calls.set_comm_stream(None)
    if state is not None:
        if not at_exit and (state.intranode or state.internode or state.low_latency):
            _drain()
        _teardown(state, at_exit=at_exit)
        if not at_exit and (state.intranode or state.internode or state.low_latency):
            # Compiled functions hold the freed buffers' addresses (baked into
            # XLA's CUDA graphs, which replay without asking jax_ep) and the
            # options they were traced with: trace them again after the next
            # initialize.
            jax.clear_caches()


def _drain():
    """Wait until every computation already dispatched has finished: JAX may
    still be launching one on its own thread (after `f(x)` returned), and a
    jax_ep kernel launched after the teardown would find its buffers gone."""
    jax.effects_barrier()
    for array in jax.live_arrays():
        try:
            array.block_until_ready()
        except Exception:  # noqa: BLE001 - a failed computation is not ours to report here
            pass


atexit.register(shutdown, at_exit=True)
