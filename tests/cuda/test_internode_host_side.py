"""The host side of the internode mode on a CPU-only machine: the custom calls
lower for CUDA with the operands (the EP axis index first), attributes and
result types the handlers (ffi/handlers/internode.cc) bind; the sizes Python
computes for the region equal the kernels' formula; the node map found from
the hosts. Needs the NVSHMEM build, not a GPU."""


import jax.numpy as jnp
import pytest

from jax_ep._handles import DispatchHandle
from lowering import custom_call, lower_for_cuda

from jax_ep.cuda import calls, extension, internode

pytestmark = pytest.mark.skipif(not extension.nvshmem_available() or not internode.compiled(),
                                reason="jax_ep built without the NVSHMEM (internode) kernels")

R, G, T, H, K, CAP = 4, 2, 8, 256, 4, 20
N = R // G


def _lower(body, *shapes):
    return lower_for_cuda(body, R, *shapes)


def test_dispatch_operands_and_results():
    def body(slot, node_slot, sent, node_sent, x):
        counts, pos, rows, recv = internode.dispatch_call(
            calls.axis_index("ep"), slot, node_slot, sent[0], node_sent[0], [x],
            capacity=CAP, ranks_per_node=G)
        return recv[0]
    text = _lower(body, ((T, R), jnp.int32), ((T, N), jnp.int32), ((1, R), jnp.int32),
                  ((1, N), jnp.int32), ((T, H), jnp.bfloat16))
    call = custom_call(text, "jax_ep_internode_dispatch")
    assert (f"(tensor<i32>, tensor<{T}x{R}xi32>, tensor<{T}x{N}xi32>, tensor<{R}xi32>, "
            f"tensor<{N}xi32>, tensor<{T}x{H}xbf16>)") in call
    assert (f"-> (tensor<{R}x{R}xi32>, tensor<{N}x{T}x{G}xi32>, tensor<{N}xi32>, "
            f"tensor<{CAP}x{H}xbf16>)") in call
    assert f"capacity = {CAP} : i64" in call


def _handle(slot, node_slot, counts, relay_pos, relay_rows):
    return DispatchHandle(
        num_recv_tokens=jnp.int32(0), num_recv_tokens_per_expert=jnp.zeros((1,), jnp.int32),
        num_dropped_tokens=jnp.int32(0), num_invalid_experts=jnp.int32(0), token_slot=slot,
        rank_counts=counts, num_experts=R, capacity=CAP, axis_name="ep", ranks_per_node=G,
        node_slot=node_slot, relay_pos=relay_pos, relay_rows=relay_rows)


def test_cached_dispatch_and_combine_operands():
    def body(slot, node_slot, counts, relay_pos, relay_rows, x, y):
        h = _handle(slot, node_slot, counts[0], relay_pos[0], relay_rows[0])
        idx = calls.axis_index("ep")
        (recv,) = internode.dispatch_cached_call(idx, h, [x])
        return recv, internode.combine_call(idx, y, h)
    text = _lower(body, ((T, R), jnp.int32), ((T, N), jnp.int32), ((1, R, R), jnp.int32),
                  ((1, N, T, G), jnp.int32), ((1, N), jnp.int32), ((T, H), jnp.float32),
                  ((CAP, H), jnp.bfloat16))
    cached = custom_call(text, "jax_ep_internode_dispatch_cached")
    assert (f"(tensor<i32>, tensor<{T}x{R}xi32>, tensor<{T}x{N}xi32>, tensor<{R}x{R}xi32>, "
            f"tensor<{N}xi32>, tensor<{T}x{H}xf32>) -> tensor<{CAP}x{H}xf32>") in cached
    combine = custom_call(text, "jax_ep_internode_combine")
    assert (f"(tensor<i32>, tensor<{CAP}x{H}xbf16>, tensor<{T}x{N}xi32>, tensor<{R}x{R}xi32>, "
            f"tensor<{N}x{T}x{G}xi32>, tensor<{N}xi32>) -> tensor<{T}x{H}xbf16>") in combine


@pytest.mark.parametrize("ranks_per_node", [1, 2, 4, 8])
@pytest.mark.parametrize("row_bytes", [[14336, 32, 32], [7168, 224, 32, 32], [24], [4]])
def test_python_message_size_is_the_kernels(ranks_per_node, row_bytes):
    mod = extension.nvshmem_module()
    assert internode.message_bytes(ranks_per_node, row_bytes) == \
        mod.internode_message_bytes(ranks_per_node, row_bytes)


def test_region_grows_with_the_maxima():
    small = internode.region_bytes(8, 4, 128, 1024, top_k=8, itemsize=2)
    assert internode.region_bytes(8, 4, 256, 1024, top_k=8, itemsize=2) > small
    assert internode.region_bytes(8, 4, 128, 2048, top_k=8, itemsize=2) > small
    # areas a, b ([N][M] rows each) and c ([R][M]) dominate
    M, stride = 128, internode._max_message(4, 1024, 2, 8)
    assert small >= (2 * 2 + 8) * M * stride


@pytest.mark.parametrize("hosts, size", [(["a"] * 8, 8), (["a"] * 4 + ["b"] * 4, 4),
                                         (["a", "a", "b", "b", "c", "c"], 2),
                                         (["a", "b", "c", "d"], 1)])
def test_nodes_of_hosts(hosts, size):
    assert internode.nodes_of_hosts(hosts, "ep") == size


@pytest.mark.parametrize("hosts", [["a", "b", "a", "b"], ["a", "a", "a", "b"],
                                   ["a", "a", "b", "b", "b", "b"]])
def test_hosts_that_do_not_form_equal_consecutive_nodes_are_refused(hosts):
    with pytest.raises(ValueError, match="consecutive and the same number"):
        internode.nodes_of_hosts(hosts, "ep")
