"""Ranks whose calls disagree stop with a message naming the difference, on the GPU.

Two processes sharing the GPU (MPS): another op, another capacity, another
top-k, or a mesh whose device order differs from initialize's. The kernels
compare the op signatures each rank leaves with its peers (intranode: in the
count exchange, before any row moves; low-latency: with the done signal) and
trap with the message; the test reads it from process 0's output and checks
it came well before the 20 s timeout.
"""

import pytest

from jax_ep.cuda import extension, intranode
from jax_ep.testing import LaunchError, external_launch, launch

from gpu_env import WORKERS_DIR, gpu_count, gpu_present

pytestmark = [
    pytest.mark.skipif(not gpu_present(), reason="needs an NVIDIA GPU and CUDA MPS"),
    pytest.mark.skipif(external_launch(), reason="needs to control what each rank calls"),
]


def _first_process(target, kind, platform="gpu"):
    try:
        results = launch(target, 2, platform=platform, timeout=120, args=(kind,),
                         env={"PYTHONPATH": WORKERS_DIR})
    except LaunchError as err:  # a trapped kernel may take the process down
        results = err.results
    return results[0].output


@pytest.mark.skipif(not intranode.compiled(), reason="no intranode kernels")
@pytest.mark.parametrize("kind, words", [
    ("op", ["ranks disagree on op #2", "dispatch (capacity", "combine (capacity"]),
    ("capacity", ["ranks disagree on op #1", "dispatch (capacity 64,", "dispatch (capacity 56,"]),
    pytest.param("order", ["put it at EP axis index", "the mesh given to jax_ep.initialize"],
                 marks=pytest.mark.skipif(
                     gpu_count() < 2,
                     reason="with 2 processes on one GPU XLA:GPU refuses this program's "
                            "non-IOTA device assignment (\"Failed to load in-memory CUBIN\") "
                            "before the kernels run; the same kernel-side check is exercised "
                            "by the low-latency order test; it runs with a GPU per process")),
])
def test_intranode_disagreement_is_named(mps, kind, words):
    # The mesh-order case on one GPU per process: XLA accepts that device assignment.
    platform = "gpu-per-process" if kind == "order" else "gpu"
    text = _first_process("disagreement_workers:intranode", kind, platform)
    for w in words:
        assert w in text, text[-3000:]
    assert "message in the exception: True" in text, text[-3000:]
    assert "timed out" not in text, text[-3000:]


@pytest.mark.skipif(not extension.nvshmem_available(), reason="no low-latency kernels")
@pytest.mark.parametrize("kind, words", [
    ("shape", ["PEs disagree on low-latency op #1", "top-4 of 16", "top-2 of 16"]),
    ("order", ["put it at EP axis index", "the mesh given to jax_ep.initialize"]),
])
def test_low_latency_disagreement_is_named(mps, kind, words):
    text = _first_process("disagreement_workers:low_latency", kind)
    for w in words:
        assert w in text, text[-3000:]
    assert "message in the exception: True" in text, text[-3000:]
    assert "timed out" not in text, text[-3000:]
