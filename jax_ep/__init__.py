"""jax_ep: DeepEP-class expert-parallel dispatch / combine for JAX.

Public API (docs/design.md §2). Every op is called inside `jax.shard_map` on
local shards, works under `jax.jit`, and is differentiable (the split
send / recv forms excepted).
"""

from ._backend import BACKENDS, default_backend, set_default_backend
from ._handles import DispatchHandle, LowLatencyHandle, LowLatencyPending
from ._ops import (
    combine,
    dispatch,
    get_dispatch_layout,
    low_latency_combine,
    low_latency_dispatch,
)
from ._overlap import (
    low_latency_combine_recv,
    low_latency_combine_send,
    low_latency_dispatch_recv,
    low_latency_dispatch_send,
)
from ._runtime import initialize, is_initialized, runtime_info, shutdown
from ._version import __version__
from .cuda.extension import build_info
from .cuda.intranode import buffer_size
from .options import COMM_STREAM_COMPILER_OPTIONS, Options

__all__ = [
    "BACKENDS",
    "COMM_STREAM_COMPILER_OPTIONS",
    "DispatchHandle",
    "LowLatencyHandle",
    "LowLatencyPending",
    "Options",
    "__version__",
    "buffer_size",
    "build_info",
    "combine",
    "default_backend",
    "dispatch",
    "get_dispatch_layout",
    "initialize",
    "is_initialized",
    "low_latency_combine",
    "low_latency_combine_recv",
    "low_latency_combine_send",
    "low_latency_dispatch",
    "low_latency_dispatch_recv",
    "low_latency_dispatch_send",
    "runtime_info",
    "set_default_backend",
    "shutdown",
]
