"""The CUDA backend: one module per mode, and the answer to "is it usable, and if not, why".

- `extension`   loads the compiled modules, registers the FFI targets, build_info
- `errors`      jax_ep's timeout / disagreement message in JAX's runtime errors
- `grid`        the co-residency check of the spinning kernels' grids
- `calls`       what the custom-call wrappers share (axis index operand, rows, types)
- `layout`      get_dispatch_layout / route kernels (local, no setup)
- `intranode`   dispatch / combine over NVLink peer pointers (CUDA IPC)
- `internode`   dispatch / combine across nodes (NVSHMEM puts + NVLink forwarding)
- `normal`      picks internode or intranode for dispatch / combine
- `low_latency` decode dispatch / combine over NVSHMEM
- `nvshmem`     NVSHMEM bootstrap / teardown

`MODES` says which module implements each public op; `why_unavailable(op)`
says whether the op can run on this backend now and, if not, what to do.
"""

from __future__ import annotations

from . import errors, extension, internode, intranode, layout, low_latency, normal, nvshmem

# public op -> the mode module whose backend functions implement it
MODES = {
    "get_dispatch_layout": layout,
    "dispatch": normal,
    "combine": normal,
    "low_latency_dispatch": low_latency,
    "low_latency_combine": low_latency,
}


def supported_ops() -> frozenset:
    """Ops this build's CUDA kernels implement."""
    if not extension.cuda_available():
        return frozenset()
    return frozenset(op for op, mode in MODES.items() if mode.compiled())


def needs_runtime(op) -> bool:
    """Whether `op` talks to peers, so it needs the buffers `initialize` sets up."""
    return hasattr(MODES.get(op), "ready")


def why_unavailable(op) -> str | None:
    """None when `op` can run on the CUDA backend now, else the reason and the fix."""
    if not extension.cuda_available():
        return ("this jax_ep build has no CUDA kernels (it was built without nvcc; reinstall "
                "with nvcc on PATH or CMAKE_ARGS=-DJAX_EP_CUDA=ON).")
    if op not in supported_ops():
        return f"the CUDA kernels for {op} are not part of this build."
    mode = MODES[op]
    if needs_runtime(op) and not mode.ready():
        return f"its communication buffers are not set up: {mode.SETUP_HINT}"
    return None


__all__ = ["MODES", "errors", "extension", "internode", "intranode", "layout", "low_latency",
           "needs_runtime", "normal", "nvshmem", "supported_ops", "why_unavailable"]
