"""The GPU graph test's worker (tests/gpu/workers/graph_workers.py) on CPU with
the reference backend: its scan of steps, inputs and per-step oracle checks
must pass on correct ops, so that on the GPU only the CUDA graphs can fail it
(no graphs here: the host-run counts are zero)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "gpu", "workers"))

import graph_workers  # noqa: E402


@pytest.mark.parametrize("mode", ["intranode", "low_latency_split", "low_latency_ragged"])
def test_graph_worker_passes_on_the_reference_backend(mode):
    res = graph_workers.graphed(mode, "1", "3", backend="reference")
    assert res["steps"] == 3 and res["ranks"] == 8
    assert res["host_runs"] == {"ungraphed": 0, "graphed": 0, "graphed_per_call": [0, 0, 0]}


def test_graph_worker_catches_a_wrong_step(monkeypatch):
    """A step that returns another step's result must fail the oracle check."""
    real = graph_workers._expected
    monkeypatch.setattr(graph_workers, "_expected",
                        lambda mode, n, xs, idxs, ws: real(mode, n, xs[::-1], idxs[::-1], ws))
    with pytest.raises(AssertionError):
        graph_workers.graphed("intranode", "1", "2", backend="reference")
    import jax_ep
    jax_ep.shutdown()
