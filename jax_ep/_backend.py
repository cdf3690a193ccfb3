"""Backend choice: "reference" (pure JAX), "cuda" (FFI kernels) or "auto".

"auto" defers the choice to lowering with `lax.platform_dependent`, so one
traced program runs the CUDA kernels on NVIDIA GPUs and the reference backend
everywhere else. Ops the CUDA build does not (yet) provide always take the
reference path under "auto"; asking for them with "cuda" is an error. Ops that
talk to peers (dispatch, combine) take the CUDA path under "auto" only once
`initialize` has set up GPU buffers.
"""

from __future__ import annotations

from jax import lax

from . import cuda

BACKENDS = ("reference", "cuda", "auto")

_default = "auto"


def set_default_backend(name: str) -> None:
    """Set the backend used when an op is called with backend=None."""
    global _default
    _default = _validate(name)


def default_backend() -> str:
    return _default


def _validate(name):
    if name not in BACKENDS:
        raise ValueError(f"jax_ep: backend must be one of {BACKENDS}, got {name!r}.")
    return name


def resolve(backend, op):
    """The concrete choice for `op`: "reference", "cuda", or "auto" (decided at lowering)."""
    name = _validate(backend if backend is not None else _default)
    if name == "reference":
        return "reference"
    why = cuda.why_unavailable(op)
    if name == "cuda":
        if why is not None:
            raise NotImplementedError(
                f"jax_ep.{op}: backend='cuda' is not available: {why} "
                f"Use backend='reference' or 'auto'.")
        return "cuda"
    if why is not None:
        return "reference"
    # Peer-talking ops are only ready once initialize() mapped GPU buffers, so the
    # platform is known; stateless ops decide per platform when lowered.
    return "cuda" if cuda.needs_runtime(op) else "auto"


def select(op, backend, reference_fn, cuda_fn):
    """A callable running `op` on the resolved backend."""
    choice = resolve(backend, op)
    if choice == "reference":
        return reference_fn
    if choice == "cuda":
        return cuda_fn
    return lambda *args: lax.platform_dependent(*args, cuda=cuda_fn, default=reference_fn)
