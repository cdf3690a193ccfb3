"""The CUDA backend: maps public ops onto FFI custom calls (see `_ffi`).

Functions here have the same signatures as their `_reference` twins so that
`_backend.select` can swap them. `SUPPORTED_OPS` lists what the kernels in
this build implement; everything else stays on the reference backend.
"""

from __future__ import annotations

from . import _ffi

SUPPORTED_OPS = frozenset({"get_dispatch_layout"})


def available() -> bool:
    return _ffi.cuda_available()


def why_unavailable(op) -> str:
    if not available():
        return ("this jax_ep build has no CUDA kernels (it was built without nvcc; reinstall "
                "with nvcc on PATH or CMAKE_ARGS=-DJAX_EP_CUDA=ON).")
    return f"the CUDA kernels for {op} are not part of this build yet."


def get_dispatch_layout(topk_idx, *, num_experts, num_ranks):
    return _ffi.get_dispatch_layout_ffi(topk_idx, num_experts=num_experts, num_ranks=num_ranks)
