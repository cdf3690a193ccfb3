"""The bridge to the compiled extensions: loading, FFI target registration, ffi_call wrappers.

- ``_jax_ep_cpu`` is always built and reports compile-time facts.
- ``_jax_ep_cuda`` exists only when the build found nvcc (``JAX_EP_CUDA``);
  it hands out the XLA FFI handlers as PyCapsules.

Nothing happens at ``import jax_ep``: the modules are imported, and the CUDA
targets registered with ``jax.ffi.register_ffi_target(..., platform="CUDA")``,
on first use (registering eagerly can fail before a backend starts, see
shared/reference/jax_ffi.md). Registration is idempotent and thread-safe.

The wrappers here only describe the custom call (operands, attributes,
result types); argument checking for users lives in ``jax_ep._ops``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import threading
import warnings
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jax_ep._version import __version__

__all__ = [
    "build_info",
    "cuda_available",
    "ensure_cuda_targets_registered",
    "get_dispatch_layout_ffi",
]

GET_DISPATCH_LAYOUT = "jax_ep_get_dispatch_layout"
ROUTE = "jax_ep_route"

_register_lock = threading.Lock()
_registered_targets: tuple[str, ...] = ()


@functools.cache
def _cpu_module() -> ModuleType:
    return importlib.import_module("jax_ep._jax_ep_cpu")


@functools.cache
def _cuda_module() -> ModuleType | None:
    """The CUDA extension, or None when it was not built (or cannot load)."""
    if importlib.util.find_spec("jax_ep._jax_ep_cuda") is None:
        return None
    try:
        return importlib.import_module("jax_ep._jax_ep_cuda")
    except ImportError as err:  # built but broken: say so once, run without it
        warnings.warn(
            f"jax_ep: the CUDA extension exists but failed to load ({err}); CUDA ops are off.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


@functools.cache
def _nvshmem_module() -> ModuleType | None:
    """The NVSHMEM low-latency extension, or None when not built (or not loadable,
    e.g. without libnvshmem_host.so.3 from the nvidia-nvshmem-cu13 wheel)."""
    if importlib.util.find_spec("jax_ep._jax_ep_nvshmem") is None:
        return None
    try:
        return importlib.import_module("jax_ep._jax_ep_nvshmem")
    except ImportError as err:
        warnings.warn(
            f"jax_ep: the NVSHMEM extension exists but failed to load ({err}); the "
            "low-latency CUDA ops are off (pip install 'nvidia-nvshmem-cu13>=3.4.5,<4').",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def nvshmem_available() -> bool:
    """Whether the NVSHMEM low-latency ops are compiled in and loadable."""
    return _nvshmem_module() is not None


def nvshmem_module() -> ModuleType:
    """The NVSHMEM extension (RuntimeError when this build has none)."""
    mod = _nvshmem_module()
    if mod is None:
        raise RuntimeError(
            "jax_ep was built without its NVSHMEM low-latency ops (needs nvcc and the "
            "nvidia-nvshmem-cu13 wheel at build time, JAX_EP_NVSHMEM=AUTO|ON)."
        )
    return mod


def cuda_available() -> bool:
    """Whether the CUDA ops are compiled in and loadable (says nothing about GPUs present)."""
    return _cuda_module() is not None


def ensure_cuda_targets_registered() -> None:
    """Register every CUDA FFI target with JAX, once per process.

    Raises RuntimeError if jax_ep was built without CUDA.
    """
    global _registered_targets
    if _registered_targets:
        return
    with _register_lock:
        if _registered_targets:
            return
        mod = _cuda_module()
        if mod is None:
            raise RuntimeError(
                "jax_ep was built without its CUDA ops (no nvcc at build time, or "
                "JAX_EP_CUDA=OFF); rebuild with nvcc on PATH or use backend='reference'."
            )
        capsules = dict(mod.registrations())
        nvshmem = _nvshmem_module()
        if nvshmem is not None:
            capsules.update(nvshmem.registrations())
        for name, capsule in capsules.items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        _registered_targets = tuple(sorted(capsules))


def build_info() -> dict[str, Any]:
    """Facts about this build of jax_ep.

    Keys: ``version`` (str), ``cuda`` (bool: CUDA ops compiled in and
    loadable), ``nvshmem`` (bool: the NVSHMEM low-latency ops compiled in and
    loadable), ``nvshmem_version`` ((major, minor, patch) built against, or
    None), ``cuda_archs`` (list of str, e.g.
    ``["90a"]``), ``ffi_targets`` (list of CUDA FFI target names), plus the
    compile-time facts of ``_jax_ep_cpu`` (``compiler``, ``build_type``,
    ``ffi_api_version`` of the XLA FFI headers, ``cuda_built`` ...).
    """
    info: dict[str, Any] = dict(_cpu_module().build_info())
    cuda = _cuda_module()
    nvshmem = _nvshmem_module() if cuda is not None else None
    targets = sorted(cuda.registrations()) if cuda is not None else []
    if nvshmem is not None:
        targets = sorted(set(targets) | set(nvshmem.registrations()))
    info.update(
        version=__version__,
        cuda=cuda is not None,
        nvshmem=nvshmem is not None,
        nvshmem_version=tuple(nvshmem.nvshmem_version()) if nvshmem is not None else None,
        cuda_archs=list(cuda.cuda_archs()) if cuda is not None else [],
        ffi_targets=targets,
    )
    return info


def _result_type(operand_type: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """A result type derived from an operand's type.

    ``jax.typeof(x).update`` keeps shard_map's varying-axis info (a bare
    ShapeDtypeStruct would mark the result invariant). The partition spec is
    reset to replicated: outside shard_map the custom call sees whole arrays,
    and inside it every spec is already unsharded.
    """
    sharding = operand_type.sharding
    spec = PartitionSpec(*([None] * len(shape)))
    return operand_type.update(shape=shape, dtype=dtype, sharding=sharding.update(spec=spec))


def get_dispatch_layout_ffi(
    topk_idx: jax.Array, *, num_experts: int, num_ranks: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Custom call ``jax_ep_get_dispatch_layout`` (CUDA only).

    Args:
      topk_idx: int32 ``[T, K]`` global expert ids; ids outside ``[0, E)``
        mean "no expert".
      num_experts: E (static). num_ranks: R (static), must divide E.

    Returns:
      ``num_tokens_per_rank`` int32 ``[R]``, ``num_tokens_per_expert`` int32
      ``[E]``, ``is_token_in_rank`` bool ``[T, R]``.
    """
    ensure_cuda_targets_registered()
    operand_type = jax.typeof(topk_idx)
    if operand_type.ndim != 2 or operand_type.dtype != jnp.int32:
        raise TypeError(f"topk_idx must be int32[T, K], got {operand_type.str_short()}")
    num_experts, num_ranks = int(num_experts), int(num_ranks)
    if num_ranks < 1 or num_experts < 1 or num_experts % num_ranks:
        raise ValueError(
            f"num_ranks ({num_ranks}) must be >= 1 and divide num_experts ({num_experts})"
        )
    num_tokens = operand_type.shape[0]
    result_types = (
        _result_type(operand_type, (num_ranks,), jnp.int32),
        _result_type(operand_type, (num_experts,), jnp.int32),
        _result_type(operand_type, (num_tokens, num_ranks), jnp.bool_),
    )
    # vmap: a batch of layouts is one kernel call per batch element. The
    # handler takes exactly rank-2 ids and sums over all tokens, so handing it
    # a batched operand ("expand_dims"/"broadcast_all") would be wrong;
    # "sequential" loops and stays correct.
    call = jax.ffi.ffi_call(GET_DISPATCH_LAYOUT, result_types, vmap_method="sequential")
    return call(topk_idx, num_experts=np.int64(num_experts), num_ranks=np.int64(num_ranks))


def route_ffi(topk_idx: jax.Array, *, num_experts: int, num_ranks: int):
    """Custom call ``jax_ep_route`` (CUDA only): the slot and sent arrays of
    ``_routing.route`` (int32 ``[T, R]``, ``[R]``) without XLA's slow cumsum."""
    ensure_cuda_targets_registered()
    operand_type = jax.typeof(topk_idx)
    result_types = (
        _result_type(operand_type, (operand_type.shape[0], num_ranks), jnp.int32),
        _result_type(operand_type, (num_ranks,), jnp.int32),
    )
    call = jax.ffi.ffi_call(ROUTE, result_types)
    return call(topk_idx, num_experts=np.int64(num_experts), num_ranks=np.int64(num_ranks))


# ----------------------------------------------------------------------------
# Intranode (NVLink / CUDA IPC) dispatch and combine
# ----------------------------------------------------------------------------

INTRANODE_DISPATCH = "jax_ep_intranode_dispatch"
INTRANODE_DISPATCH_CACHED = "jax_ep_intranode_dispatch_cached"
INTRANODE_COMBINE = "jax_ep_intranode_combine"


def cuda_module() -> ModuleType:
    """The CUDA extension (RuntimeError when this build has none)."""
    mod = _cuda_module()
    if mod is None:
        raise RuntimeError("jax_ep was built without its CUDA ops; rebuild with nvcc on PATH.")
    return mod


def intranode_available() -> bool:
    mod = _cuda_module()
    return mod is not None and INTRANODE_COMBINE in mod.registrations()


def _row_bytes(a) -> int:
    t = jax.typeof(a)
    return int(np.prod(t.shape[1:], dtype=np.int64)) * t.dtype.itemsize


def dispatch_bytes(payloads, capacity) -> int:
    """Communication-buffer bytes a dispatch of these [T, ...] payloads needs."""
    return int(capacity) * sum(_row_bytes(p) for p in payloads)


def combine_bytes(y, num_ranks, num_tokens) -> int:
    """Communication-buffer bytes a combine of y [capacity, ...] needs."""
    return int(num_ranks) * int(num_tokens) * _row_bytes(y)


def _as_rows(a):
    """Payloads travel as 2-D [rows, row] arrays; restore the shape after."""
    return a.reshape(a.shape[0], -1) if a.ndim != 2 else a


def intranode_dispatch(slot, sent, payloads, *, capacity):
    """Count exchange + row transfer. slot int32 [T, R], sent int32 [R], payloads
    [T, ...] -> (rank_counts int32 [R, R], *payloads moved to [capacity, ...])."""
    ensure_cuda_targets_registered()
    num_ranks = jax.typeof(sent).shape[0]
    flat = [_as_rows(p) for p in payloads]
    result_types = [_result_type(jax.typeof(sent), (num_ranks, num_ranks), jnp.int32)]
    result_types += [_result_type(jax.typeof(p), (capacity,) + tuple(jax.typeof(p).shape[1:]),
                                  jax.typeof(p).dtype) for p in flat]
    call = jax.ffi.ffi_call(INTRANODE_DISPATCH, result_types)
    counts, *recv = call(slot, sent, *flat, capacity=np.int64(capacity))
    return [counts] + [r.reshape((capacity,) + tuple(p.shape[1:])) for r, p in zip(recv, payloads)]


def intranode_dispatch_cached(token_slot, rank_counts, payloads, *, capacity):
    """Row transfer with known counts (the handle's): payloads [T, ...] -> [capacity, ...]."""
    ensure_cuda_targets_registered()
    flat = [_as_rows(p) for p in payloads]
    result_types = [_result_type(jax.typeof(p), (capacity,) + tuple(jax.typeof(p).shape[1:]),
                                 jax.typeof(p).dtype) for p in flat]
    call = jax.ffi.ffi_call(INTRANODE_DISPATCH_CACHED, result_types)
    recv = call(token_slot, rank_counts, *flat, capacity=np.int64(capacity))
    return [r.reshape((capacity,) + tuple(p.shape[1:])) for r, p in zip(recv, payloads)]


def intranode_combine(y, token_slot, rank_counts):
    """Rank-ordered float32 sum of each token's rows: y [capacity, ...] -> [T, ...]."""
    ensure_cuda_targets_registered()
    num_tokens = jax.typeof(token_slot).shape[0]
    flat = _as_rows(y)
    out_type = _result_type(jax.typeof(flat), (num_tokens, flat.shape[1]), flat.dtype)
    out = jax.ffi.ffi_call(INTRANODE_COMBINE, out_type)(flat, token_slot, rank_counts)
    return out.reshape((num_tokens,) + tuple(y.shape[1:]))
