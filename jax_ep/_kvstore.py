"""The one adapter around jax.distributed's (private) key-value store client.

Used at initialize to exchange peer handles between processes, and by the
test helpers. Every call has a bounded timeout; in a single-process run the
barrier is a no-op.
"""

from __future__ import annotations

import itertools

_setups = itertools.count(1)


def new_scope(name: str) -> str:
    """A fresh key prefix for one setup step, e.g. "jax_ep/3/intranode".

    Every process makes the same setup calls in the same order, so the n-th
    call names the same scope everywhere, and a later initialize never reads a
    stale record of an earlier one.
    """
    return f"jax_ep/{next(_setups)}/{name}"


def client():
    """The coordination service's client, or None in a single-process run."""
    return _client(required=False)


def _client(required=True):
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None and required:
        raise RuntimeError("jax.distributed is not initialised in this process")
    return client


def barrier(name: str, timeout: float = 60.0, process_ids=None) -> None:
    """Waits until every process (or ``process_ids``) reaches barrier ``name``;
    raises after ``timeout`` seconds.  A no-op in a single-process run."""
    client = _client(required=False)
    if client is None:
        return
    ms = int(timeout * 1000)
    if process_ids is None:
        client.wait_at_barrier(name, ms)
    else:
        client.wait_at_barrier(name, ms, list(process_ids))


def kv_set_bytes(key: str, value: bytes, allow_overwrite: bool = False) -> None:
    """Stores ``value`` under ``key`` in the coordination service's KV store."""
    _client().key_value_set_bytes(key, bytes(value), allow_overwrite)


def kv_get_bytes(key: str, timeout: float = 60.0) -> bytes:
    """Waits (at most ``timeout`` seconds) for ``key`` and returns its bytes."""
    return _client().blocking_key_value_get_bytes(key, int(timeout * 1000))
