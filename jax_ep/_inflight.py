"""Low-latency ops in flight within one traced function: at most two, checked at trace time.

The CUDA low-latency buffers are double-buffered: op n reuses the buffer set
of op n - 2 and waits until every peer has released it, which a split op
does only in its receive half. So op n may be issued only once op n - 2 has
finished; otherwise its kernel waits for a release that comes later on the
same stream, and times out. Within one traced function the order is known,
so a violation raises here, naming both ops. Ops of other programs (a
pending op returned from one jitted function and received in another) are
not seen: there the ordering is the caller's duty (docs/design.md §2).
"""

from __future__ import annotations

import dataclasses
import weakref

from jax._src import core

_ops_by_trace: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class _Op:
    name: str
    done: bool
    key: object = None  # the pending op's first array (its identity links send and recv)


def _ops():
    trace = core.trace_ctx.trace
    try:
        return _ops_by_trace.setdefault(trace, [])
    except TypeError:  # a trace that cannot be weakly referenced: do not track
        return []


def issue(name: str, pending_key=None) -> None:
    """Record an op about to be issued (fused: pending_key None, done at once).

    Raises RuntimeError when the op two before it in this trace is a split op
    whose receive half has not been traced yet.
    """
    ops = _ops()
    if len(ops) >= 2 and not ops[-2].done:
        earlier = ops[-2]
        raise RuntimeError(
            f"jax_ep.{name}: this would be the third low-latency op in flight: "
            f"{earlier.name} (issued two ops earlier in this function) has not been received "
            f"yet, and its buffer set is the one this op needs. At most two low-latency ops "
            f"may be in flight (the buffers are double-buffered): call the matching *_recv "
            f"before issuing another low-latency op.")
    ops.append(_Op(name, done=pending_key is None, key=pending_key))


def finish(pending_key) -> None:
    """Mark the split op whose pending op starts with `pending_key` as received."""
    for op in reversed(_ops()):
        if op.key is pending_key:
            op.done = True
            op.key = None
            return
