"""Every CUDA FFI handler declares that XLA may capture it into a CUDA graph
(command buffer), and nothing in the handlers' sources would make that a lie.

The trait is read the way XLA reads it (a metadata query of the compiled
handler, no GPU needed). The source rules cover what the trait promises:
a captured handler's host code runs when XLA records the graph, not on each
replay, so no handler may allocate (an XLA scratch allocation made while
recording is not the one the replays see), synchronise, or read device data
on the host. Whether the graphs really contain the kernels and give the
oracle's results on every replay is tests/gpu/test_graphs_gpu.py.
"""

import pathlib
import re

import pytest

from jax_ep.cuda import extension

FFI = pathlib.Path(__file__).resolve().parents[2] / "ffi"

pytestmark = pytest.mark.skipif(not extension.cuda_available(),
                                reason="jax_ep was built without its CUDA ops")


def test_every_target_is_registered_with_its_traits_known():
    traits = extension.handler_traits()
    assert set(traits) == set(extension._capsules()), "a target without a traits entry"
    assert "jax_ep_route" in traits and "jax_ep_intranode_combine" in traits
    if extension.nvshmem_available():
        assert {"jax_ep_ll_dispatch", "jax_ep_ll_combine_recv",
                "jax_ep_internode_dispatch"} <= set(traits)


def test_every_handler_declares_the_command_buffer_trait():
    missing = sorted(name for name, bits in extension.handler_traits().items()
                     if bits < 0 or not bits & extension.GRAPH_SAFE_TRAIT)
    assert not missing, (f"{missing} would split XLA's CUDA graphs: define them with "
                         f"XLA_FFI_DEFINE_HANDLER_SYMBOL(..., JAX_EP_GRAPH_SAFE)")


def _handler_definitions():
    """(file, text of one XLA_FFI_DEFINE_HANDLER_SYMBOL(...) call) for every handler."""
    out = []
    for path in sorted((FFI / "handlers").glob("*.cc")):
        text = path.read_text()
        for m in re.finditer(r"XLA_FFI_DEFINE_HANDLER_SYMBOL\(", text):
            depth, i = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            out.append((path.name, text[m.start():i]))
    return out


def test_every_handler_definition_in_the_sources_names_the_trait():
    defs = _handler_definitions()
    assert len(defs) == len(extension.handler_traits()) or not extension.nvshmem_available()
    for name, text in defs:
        assert text.rstrip(")").rstrip().endswith("JAX_EP_GRAPH_SAFE"), (name, text[:80])


# Host calls a graph-captured handler must not make (the replays would skip
# them, or they are illegal during stream capture).
FORBIDDEN = {
    "ScratchAllocator": "an XLA scratch allocation: make the memory a result of the call",
    "cudaMalloc": "device allocation",
    "cudaFree": "device free",
    "cudaMemcpy(": "a synchronous copy",
    "cudaStreamSynchronize": "host synchronisation",
    "cudaDeviceSynchronize": "host synchronisation",
    "cudaEventSynchronize": "host synchronisation",
    "cudaStreamWaitEvent": "a wait on another stream",
    "nvshmem_barrier": "a host-side NVSHMEM collective",
    "nvshmemx_barrier_all_on_stream": "an NVSHMEM collective launch",
}


def _per_call_sources():
    """Code that runs on every call: the handlers and the kernels' launch code
    (the runtime's set-up files run at initialize only)."""
    files = sorted((FFI / "handlers").glob("*.cc")) + sorted((FFI / "handlers").glob("*.h"))
    files += [p for p in sorted((FFI / "kernels").rglob("*"))
              if p.suffix in (".cu", ".cuh", ".h", ".cc")]
    return files


@pytest.mark.parametrize("call", sorted(FORBIDDEN))
def test_no_handler_or_launch_makes_host_calls_a_graph_would_skip(call):
    offenders = []
    for path in _per_call_sources():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//", 1)[0]
            if call in code:
                offenders.append(f"{path.relative_to(FFI)}:{n}")
    assert not offenders, f"{call} ({FORBIDDEN[call]}) in per-call code: {offenders}"
