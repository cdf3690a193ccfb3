"""The compiled extensions: loading them, registering every FFI target once, build facts.

- ``_jax_ep_cpu`` is always built and reports compile-time facts.
- ``_jax_ep_cuda`` exists when the build found nvcc: the layout, route and
  intranode handlers (PyCapsules) and the intranode runtime.
- ``_jax_ep_nvshmem`` exists when the build also found the NVSHMEM wheel:
  the low-latency handlers and the NVSHMEM runtime. It links
  libnvshmem_host.so.3, so without that library only the low-latency ops go.

Nothing happens at ``import jax_ep``: the modules load, and the CUDA targets
are registered with ``jax.ffi.register_ffi_target(..., platform="CUDA")``, on
first use (registering eagerly can fail before a backend starts).
Registration is idempotent and thread-safe.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import os
import threading
import warnings
from types import ModuleType
from typing import Any

import jax
import jaxlib
from jax.sharding import PartitionSpec

from jax_ep._version import __version__

_register_lock = threading.Lock()
_registered_targets: tuple[str, ...] = ()


def _load(name: str, why_missing: str) -> ModuleType | None:
    """jax_ep.<name>, or None when it was not built (or cannot load: warned once)."""
    if importlib.util.find_spec(f"jax_ep.{name}") is None:
        return None
    try:
        return importlib.import_module(f"jax_ep.{name}")
    except ImportError as err:
        warnings.warn(f"jax_ep: the extension {name} exists but failed to load ({err}); "
                      f"{why_missing}", RuntimeWarning, stacklevel=3)
        return None


@functools.cache
def cpu_module() -> ModuleType:
    return importlib.import_module("jax_ep._jax_ep_cpu")


@functools.cache
def _cuda_module() -> ModuleType | None:
    return _load("_jax_ep_cuda", "the CUDA ops are off.")


@functools.cache
def _nvshmem_module() -> ModuleType | None:
    module = _load("_jax_ep_nvshmem", "the low-latency CUDA ops are off "
                   "(pip install 'nvidia-nvshmem-cu13>=3.4.5,<4').")
    if module is None:
        return None
    built = tuple(module.nvshmem_version())
    running = _nvshmem_host_version(_nvshmem_host_path())
    if running is not None and running[:2] < built[:2]:
        warnings.warn(f"jax_ep: the NVSHMEM host library in use ({_nvshmem_host_path()}, "
                      f"{'.'.join(map(str, running))}) is older than the {'.'.join(map(str, built))} "
                      f"jax_ep was built against, which NVSHMEM refuses; the NVSHMEM ops "
                      f"(low-latency, internode) are off. Install nvidia-nvshmem-cu13>="
                      f"{built[0]}.{built[1]}.", RuntimeWarning, stacklevel=3)
        return None
    return module


_NVSHMEM_HOST = "libnvshmem_host.so.3"


def _nvshmem_host_path() -> str | None:
    """The libnvshmem_host.so.3 of this process: the one already mapped (loaded with
    _jax_ep_nvshmem, wherever the loader found it), else the nvidia-nvshmem-cu13
    wheel's; None if there is neither."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path) == _NVSHMEM_HOST:
                    return path
    except OSError:
        pass
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(root, "nvshmem", "lib", _NVSHMEM_HOST)
        if os.path.isfile(path):
            return path
    return None


def _nvshmem_host_version(path: str | None) -> tuple[int, int, int] | None:
    """(major, minor, patch) that library reports (no nvshmem_init needed)."""
    if path is None:
        return None
    try:
        get = ctypes.CDLL(path).nvshmemx_vendor_get_version_info
    except (OSError, AttributeError):
        return None
    parts = [ctypes.c_int() for _ in range(3)]
    get(*map(ctypes.byref, parts))
    return tuple(p.value for p in parts)


def cuda_available() -> bool:
    """Whether the CUDA ops are compiled in and loadable (says nothing about GPUs present)."""
    return _cuda_module() is not None


def nvshmem_available() -> bool:
    """Whether the NVSHMEM low-latency ops are compiled in and loadable."""
    return _cuda_module() is not None and _nvshmem_module() is not None


def cuda_module() -> ModuleType:
    """The CUDA extension (RuntimeError when this build has none)."""
    mod = _cuda_module()
    if mod is None:
        raise RuntimeError("jax_ep was built without its CUDA ops (no nvcc at build time, or "
                           "JAX_EP_CUDA=OFF); rebuild with nvcc on PATH or use "
                           "backend='reference'.")
    return mod


def nvshmem_module() -> ModuleType:
    """The NVSHMEM extension (RuntimeError when this build has none)."""
    mod = _nvshmem_module() if _cuda_module() is not None else None
    if mod is None:
        raise RuntimeError("jax_ep was built without its NVSHMEM low-latency ops (needs nvcc "
                           "and the nvidia-nvshmem-cu13 wheel at build time, "
                           "JAX_EP_NVSHMEM=AUTO|ON).")
    return mod


def has_target(name: str) -> bool:
    """Whether this build holds the CUDA FFI target `name`."""
    return name in _capsules()


def _from_modules(binding: str) -> dict:
    """The dicts `binding()` of the CUDA and NVSHMEM modules return, merged
    (empty without the CUDA extension)."""
    mod = _cuda_module()
    if mod is None:
        return {}
    merged = dict(getattr(mod, binding)())
    nvshmem = _nvshmem_module()
    if nvshmem is not None:
        merged.update(getattr(nvshmem, binding)())
    return merged


@functools.cache
def _capsules() -> dict:
    return _from_modules("registrations")


# XLA_FFI_HANDLER_TRAITS_COMMAND_BUFFER_COMPATIBLE: the handler may join a CUDA graph.
GRAPH_SAFE_TRAIT = 1


def handler_traits() -> dict[str, int]:
    """FFI target name -> the XLA_FFI_Handler_Traits bits its handler declares (what
    XLA reads to let the call join a CUDA graph), or -1 if it refused the query.
    Empty without the CUDA extension."""
    return _from_modules("handler_traits")


def handler_host_runs() -> int:
    """How many times the communication handlers of this process ran their host
    code: once per call without CUDA graphs, once per recording with them (XLA's
    replays skip it). Diagnostics and tests; 0 without the CUDA extension."""
    mod = _cuda_module()
    if mod is None:
        return 0
    nvshmem = _nvshmem_module()
    return mod.handler_host_runs() + (0 if nvshmem is None else nvshmem.handler_host_runs())


def register_targets() -> None:
    """Register every CUDA FFI target with JAX, once per process.

    Raises RuntimeError if jax_ep was built without CUDA.
    """
    global _registered_targets
    if _registered_targets:
        return
    with _register_lock:
        if _registered_targets:
            return
        cuda_module()
        capsules = _capsules()
        for name, capsule in capsules.items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        _registered_targets = tuple(sorted(capsules))


def build_info() -> dict[str, Any]:
    """Facts about this build of jax_ep.

    Keys: ``version`` (str), ``cuda`` (bool: CUDA ops compiled in and
    loadable), ``nvshmem`` (bool: the NVSHMEM low-latency ops compiled in and
    loadable), ``nvshmem_version`` ((major, minor, patch) built against, or
    None), ``cuda_archs`` (list of str, e.g. ``["90a"]``), ``ffi_targets``
    (list of CUDA FFI target names), plus the compile-time facts of
    ``_jax_ep_cpu`` (``compiler``, ``build_type``, ``ffi_api_version`` of the
    XLA FFI headers, ``cuda_built``, ``nvshmem_built``); and what runs:
    ``jax_version`` / ``jaxlib_version``, ``nvshmem_runtime_version``
    ((major, minor, patch) of the libnvshmem_host.so.3 in use, or None; it
    must not be older in its minor version than ``nvshmem_version``) and
    ``nvshmem_runtime_path``.
    """
    info: dict[str, Any] = dict(cpu_module().build_info())
    cuda = _cuda_module()
    nvshmem = _nvshmem_module() if cuda is not None else None
    info.update(
        version=__version__,
        cuda=cuda is not None,
        nvshmem=nvshmem is not None,
        nvshmem_version=tuple(nvshmem.nvshmem_version()) if nvshmem is not None else None,
        cuda_archs=list(cuda.cuda_archs()) if cuda is not None else [],
        ffi_targets=sorted(_capsules()),
        jax_version=jax.__version__,
        jaxlib_version=jaxlib.__version__,
        nvshmem_runtime_version=_nvshmem_host_version(_nvshmem_host_path()),
        nvshmem_runtime_path=_nvshmem_host_path(),
    )
    return info


def result_type(operand_type: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """A custom call's result type derived from an operand's type.

    ``jax.typeof(x).update`` keeps shard_map's varying-axis info (a bare
    ShapeDtypeStruct would mark the result invariant). The partition spec is
    reset to replicated: outside shard_map the custom call sees whole arrays,
    and inside it every spec is already unsharded.
    """
    sharding = operand_type.sharding
    spec = PartitionSpec(*([None] * len(shape)))
    return operand_type.update(shape=shape, dtype=dtype, sharding=sharding.update(spec=spec))
