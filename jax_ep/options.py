"""`Options`: every switch of the CUDA kernels, one frozen object given to `jax_ep.initialize`.

The kernels read no environment variable. The ones that used to steer them
are still honoured, as defaults, by `Options.from_env` — the only place in
jax_ep that reads them — which `initialize(options=None)` calls.

| field              | default | environment default         |
|--------------------|---------|-----------------------------|
| `force_put`        | False   | `JAX_EP_LL_FORCE_PUT=1`     |
| `system_scope`     | False   | `JAX_EP_LL_SYS_SCOPE=1`     |
| `dependent_launch` | True    | `JAX_EP_LL_NO_PDL=1` -> off |
| `streamed_combine` | True    | `JAX_EP_LL_NO_STREAM=1` -> off |
| `phase_trace`      | None    | `JAX_EP_LL_TRACE=<path>`    |
| `comm_stream`      | None    | (none)                      |
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

_FALSE_WORDS = ("", "0", "false", "no", "off")

# jax.jit compiler options under which Options.comm_stream takes effect: XLA
# honours the stream annotation compute_on attaches only with this option.
COMM_STREAM_COMPILER_OPTIONS = {"xla_gpu_experimental_stream_annotation": True}


def _env_flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() not in _FALSE_WORDS


@dataclasses.dataclass(frozen=True)
class Options:
    """Switches of the CUDA backend's kernels (the low-latency mode's today).

    Attributes:
      force_put: move every low-latency row with NVSHMEM puts, even to peers
        this GPU reaches by loads and stores. Exercises the path PEs on other
        nodes take, on one host. Needs the staging buffer, which initialize
        then allocates.
      system_scope: signal and fence at system scope even when every PE
        shares this GPU (what PEs on several GPUs need anyway). For A/B
        timings and tests of the multi-GPU protocol on one GPU.
      dependent_launch: launch the low-latency kernels with programmatic
        dependent launch, so a kernel's prologue overlaps its predecessor's
        tail.
      streamed_combine: let the fused low-latency combine reduce each token
        as soon as its rows have arrived (several PEs at GPU scope); False
        keeps the plain kernel that waits for every peer first.
      phase_trace: path prefix of a per-phase timestamp trace of the
        low-latency kernels, written at `shutdown` to `<path>.pe<rank>` and
        read by benchmarks/ll_phases.py; None turns it off. Diagnostics only.
      comm_stream: run the communication custom calls (dispatch, combine, their
        split halves, gather, cached dispatch; every mode) on their own XLA
        stream, so that they overlap independent compute, e.g. one
        micro-batch's combine with the next one's expert matmuls. An int
        n >= 1 is XLA's execution stream n, "collective" the stream XLA runs
        its own collectives on (ordering jax_ep with them rather than
        competing for SMs). XLA wraps each call in an async start / done pair
        (jax.experimental.compute_on) only when the function is compiled with
        `compiler_options=jax_ep.COMM_STREAM_COMPILER_OPTIONS` (XLA's stream
        annotations are off by default). None keeps them on the compute
        stream. Read when a function is traced; the routing / layout kernels
        stay on the compute stream.
    """

    force_put: bool = False
    system_scope: bool = False
    dependent_launch: bool = True
    streamed_combine: bool = True
    phase_trace: str | None = None
    comm_stream: int | str | None = None

    def __post_init__(self):
        for field in ("force_put", "system_scope", "dependent_launch", "streamed_combine"):
            value = getattr(self, field)
            if not isinstance(value, bool):
                raise TypeError(f"jax_ep.Options: {field} must be True or False, "
                                f"got {value!r}.")
        if self.phase_trace is not None and (not isinstance(self.phase_trace, str)
                                             or not self.phase_trace):
            raise TypeError("jax_ep.Options: phase_trace must be a non-empty path prefix "
                            f"(str) or None, got {self.phase_trace!r}.")

        stream = self.comm_stream
        if not (stream is None or stream == "collective"
                or (isinstance(stream, int) and not isinstance(stream, bool) and stream >= 1)):
            raise ValueError("jax_ep.Options: comm_stream must be None, an XLA stream number "
                             f">= 1, or \"collective\", got {stream!r}.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Options:
        """The defaults with the JAX_EP_LL_* environment variables applied."""
        env = os.environ if environ is None else environ
        return cls(
            force_put=_env_flag(env, "JAX_EP_LL_FORCE_PUT"),
            system_scope=_env_flag(env, "JAX_EP_LL_SYS_SCOPE"),
            dependent_launch=not _env_flag(env, "JAX_EP_LL_NO_PDL"),
            streamed_combine=not _env_flag(env, "JAX_EP_LL_NO_STREAM"),
            phase_trace=env.get("JAX_EP_LL_TRACE") or None,
        )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
