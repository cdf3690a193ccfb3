"""benchmarks/ll_phases.py reads the kernels' phase trace (Options.phase_trace):
its layout constants match the headers of ffi/kernels/low_latency/, and a synthetic trace
with known stamps gives the phase times and per-PE kernel times it encodes."""

import glob
import os
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import ll_phases  # noqa: E402


def _header_constants():
    headers = sorted(glob.glob(os.path.join(ROOT, "ffi", "kernels", "low_latency", "*.h")))
    assert headers, "no low-latency kernel headers found"
    text = ""
    for path in headers:
        with open(path) as f:
            text += f.read()
    ints = {name: int(value) for name, value in
            re.findall(r"inline constexpr int (kLLTrace\w+) = (\d+);", text)}
    events = {name: int(value) for name, value in re.findall(r"(kLLTrace\w+) = (\d+),", text)}
    ops = {name: int(value) for name, value in re.findall(r"(kOpLL\w+) = (\d+),", text)}
    return ints, events, ops


def test_layout_matches_the_kernels():
    ints, events, ops = _header_constants()
    assert ints == {"kLLTraceOps": ll_phases.OPS, "kLLTraceBlocks": ll_phases.BLOCKS,
                    "kLLTraceEvents": ll_phases.EVENTS}
    assert events["kLLTraceStart"] == 0 and events["kLLTraceEnd"] == 6
    assert events["kLLTraceTag"] == 7
    assert {v: k for k, v in ops.items()}[16] == "kOpLLDispatch"
    assert set(ll_phases.OP_NAMES) == set(ops.values())
    for ev, _, _ in ll_phases.PHASES:
        assert 0 <= ev < events["kLLTraceTag"]


def _synthetic(num_pes, ops, pe_skew_ns, blocks=16, period_ns=1_000_000, one_kind=False):
    """Op n of kind 16 / 17 (odd / even n; all 16 with one_kind) starts at
    n * period_ns (+ the PE's skew); event ev of block b lands ev µs + 10 ns
    * b later; only block 5 stores the 'signalled' event (the last block), as
    in the kernels."""
    traces = []
    for pe in range(num_pes):
        t = np.zeros((ll_phases.OPS, ll_phases.BLOCKS, ll_phases.EVENTS), np.uint64)
        for n in range(1, ops + 1):
            start = period_ns * n + pe * pe_skew_ns
            for b in range(blocks):
                for ev in range(7):
                    if ev == 3 and b != 5:
                        continue
                    t[n % ll_phases.OPS, b, ev] = start + 1000 * ev + 10 * b
            t[n % ll_phases.OPS, 0, 7] = (n << 8) | (16 if n % 2 or one_kind else 17)
        traces.append(t)
    return traces


def test_phases_of_a_synthetic_trace():
    table = ll_phases.phases(_synthetic(num_pes=2, ops=40, pe_skew_ns=500))
    assert set(table) == {"dispatch", "combine"}
    rows = {label: (lo, hi) for label, lo, hi in table["dispatch"]}
    assert rows["ops traced"] == (20, 20)
    assert rows["kernel start (first block)"] == (0.0, 0.5)  # the second PE starts 0.5 µs later
    np.testing.assert_allclose(rows["send: rows written (first block)"], (2.0, 2.5))
    np.testing.assert_allclose(rows["send: rows written (last block)"], (2.15, 2.65))
    np.testing.assert_allclose(rows["send: done signals stored"], (3.05, 3.55))
    np.testing.assert_allclose(rows["receive: rows read out (first block)"], (5.0, 5.5))
    np.testing.assert_allclose(rows["receive: rows read out (last block)"], (5.15, 5.65))
    np.testing.assert_allclose(rows["kernel end (last block)"], (6.15, 6.65))
    np.testing.assert_allclose(rows["kernel time (own start to end)"], (6.15, 6.15))
    np.testing.assert_allclose(rows["kernel time, mean over the PEs"], (6.15, 6.15))
    # Calls alternate kinds here: no call of the same kind just before, no gap row.
    assert not any(label.startswith("gap") for label in rows)


def test_gap_between_chained_calls_and_the_last_starter():
    # Chained calls of one kind every 100 µs; PE 1 starts 0.5 µs after PE 0
    # and each kernel lasts 6.15 µs, so each PE waits 93.85 µs between calls.
    table = ll_phases.phases(_synthetic(num_pes=2, ops=30, pe_skew_ns=500, period_ns=100_000,
                                        one_kind=True))
    rows = {label: (lo, hi) for label, lo, hi in table["dispatch"]}
    np.testing.assert_allclose(rows["gap: previous call's end to start"], (93.85, 93.85))
    assert rows["PE starting last most often (rank, share)"] == (1, 1.0)


def test_ops_missing_on_a_pe_are_left_out():
    traces = _synthetic(num_pes=2, ops=10, pe_skew_ns=0)
    traces[1][3] = 0  # op 3 never reached PE 1's trace
    table = ll_phases.phases(traces)
    counts = {name: dict((lbl, lo) for lbl, lo, _ in rows)["ops traced"]
              for name, rows in table.items()}
    assert counts == {"dispatch": 4, "combine": 5}
