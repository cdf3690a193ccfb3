"""Processes that disagree get an error on every one of them, not a hang or garbage.

Two tools, both over the jax.distributed key-value store with a bounded wait:

- `compare_configs`: at `initialize`, before anything is allocated, every
  process publishes a fingerprint of its whole configuration (arguments,
  options, mesh, jax_ep version and build) and checks everyone else's; a
  difference raises on every process, naming the fields and the processes.
- `agree`: after each setup step, every process says whether the step
  succeeded; if one failed, all raise (naming it and its error) instead of
  waiting forever in the next collective step.

Records are JSON (never pickle) and scoped to one setup call
(`_kvstore.new_scope`), so a later `initialize` never reads a stale one.
In a single-process run both are no-ops.
"""

from __future__ import annotations

import json

import jax

from . import _kvstore

FORMAT = 1  # of the records below; part of every record


class DisagreementError(RuntimeError):
    """Processes of one jax_ep job were set up or called differently."""


def _processes(mesh) -> list[int]:
    return sorted({d.process_index for d in mesh.devices.flat})


def _exchange(scope, what, record, processes, me, timeout_s) -> dict:
    """Publish my record under scope/what, read everyone's (bounded wait)."""
    body = json.dumps(dict(record, format=FORMAT), sort_keys=True).encode()
    _kvstore.kv_set_bytes(f"{scope}/{what}/{me}", body)
    records = {}
    for p in processes:
        if p == me:
            records[p] = dict(record, format=FORMAT)
            continue
        try:
            raw = _kvstore.kv_get_bytes(f"{scope}/{what}/{p}", timeout=timeout_s)
        except Exception as err:  # noqa: BLE001 - the client's timeout error type varies
            raise DisagreementError(
                f"jax_ep: process {p} did not reach '{what}' within {timeout_s:g} s "
                f"(process {me} did). Did every process call jax_ep.initialize with the same "
                f"mesh? Is process {p} alive? ({type(err).__name__}: {err})") from None
        records[p] = _decode(raw, p, what)
    return records


def _decode(raw: bytes, process: int, what: str) -> dict:
    try:
        record = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        raise DisagreementError(f"jax_ep: the '{what}' record of process {process} is not "
                                f"JSON; another program is using jax_ep's key-value keys?") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DisagreementError(
            f"jax_ep: the '{what}' record of process {process} has format "
            f"{record.get('format') if isinstance(record, dict) else None!r}, expected "
            f"{FORMAT}: every process must run the same jax_ep version.")
    return record


def compare_configs(mesh, config: dict, *, timeout_s: float) -> None:
    """Raise on every process of `mesh` unless all have the same `config` (JSON-able)."""
    processes = _processes(mesh)
    if len(processes) < 2 or _kvstore.client() is None:
        return
    me = processes.index(_my_process())
    records = _exchange(_kvstore.new_scope("initialize"), "config", config, processes,
                        processes[me], timeout_s)
    fields = sorted(set().union(*records.values()) - {"format"})
    differing = []
    for field in fields:
        values = {p: records[p].get(field) for p in processes}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            shown = ", ".join(f"process {p}: {v!r}" for p, v in values.items())
            differing.append(f"{field} ({shown})")
    if differing:
        raise DisagreementError(
            "jax_ep.initialize: the processes were initialized differently; every process "
            "must call jax_ep.initialize with the same arguments and options, the same mesh "
            "and the same jax_ep build. Differences: " + "; ".join(differing) + ".")


def agree(mesh, step: str, error: BaseException | None, *, timeout_s: float) -> None:
    """Every process of `mesh` reports whether `step` succeeded; raise if any failed.

    The local error, if any, is re-raised as the cause on this process; the
    other processes raise a DisagreementError naming this one and its error.
    """
    processes = _processes(mesh)
    if len(processes) < 2 or _kvstore.client() is None:
        if error is not None:
            raise error
        return
    me = _my_process()
    record = {"ok": error is None,
              "error": "" if error is None else f"{type(error).__name__}: {error}"}
    records = _exchange(_kvstore.new_scope(f"agree/{step}"), "status", record, processes, me,
                        timeout_s)
    failed = {p: r.get("error", "?") for p, r in records.items() if not r.get("ok")}
    if failed:
        detail = "; ".join(f"process {p}: {e}" for p, e in sorted(failed.items()))
        raise DisagreementError(f"jax_ep: {step} failed on {len(failed)} of "
                                f"{len(processes)} processes ({detail}).") from error


def step(mesh, what: str, fn, *, timeout_s: float):
    """Run this process's part of a setup step, then `agree` on its success; fn's result."""
    result, error = None, None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - reported to every process, then re-raised
        error = err
    agree(mesh, what, error, timeout_s=timeout_s)
    return result


def _my_process() -> int:
    return jax.process_index()
