"""Per-process runtime state: `initialize` / `shutdown`.

On CPU `initialize` is optional: it only records the default backend and
checks the mesh axis. On GPU it will also allocate the communication buffers
and map peers (see the NVLink issue); until those kernels exist it registers
the CUDA FFI targets so that the first traced call need not.
"""

from __future__ import annotations

import atexit
import dataclasses

from . import _backend


@dataclasses.dataclass
class _State:
    mesh: object = None
    axis_name: object = None
    backend: str = "auto"


_state: _State | None = None


def initialize(mesh=None, axis_name=None, *, backend="auto"):
    """Set up jax_ep for `mesh` (optional on CPU).

    Args:
      mesh: the jax.sharding.Mesh the EP ops run under, or None.
      axis_name: the EP axis of `mesh` (required when mesh is given).
      backend: "reference", "cuda" or "auto" (CUDA kernels where built and
        running on NVIDIA GPUs, the pure-JAX reference elsewhere); the default
        for ops called with backend=None.
    """
    global _state
    if mesh is not None:
        if axis_name is None or axis_name not in mesh.axis_names:
            raise ValueError(f"jax_ep.initialize: axis_name={axis_name!r} must be one of the "
                             f"mesh axes {tuple(mesh.axis_names)}.")
    _backend.set_default_backend(backend)
    if backend in ("cuda", "auto"):
        from . import _ffi

        if _ffi.cuda_available():
            _ffi.ensure_cuda_targets_registered()
        elif backend == "cuda":
            from . import _cuda

            raise RuntimeError(f"jax_ep.initialize: backend='cuda': {_cuda.why_unavailable('any op')}")
    _state = _State(mesh=mesh, axis_name=axis_name, backend=backend)


def is_initialized() -> bool:
    return _state is not None


def shutdown():
    """Release what initialize set up; safe to call twice and at exit."""
    global _state
    _state = None
    _backend.set_default_backend("auto")


atexit.register(shutdown)
