"""The intranode custom calls lower for CUDA on a CPU-only machine: operands
(the EP axis index first, which the kernels check against initialize's rank),
attributes and result types. Needs the CUDA ops compiled in, not a GPU."""

import jax.numpy as jnp
import pytest

from lowering import custom_call, lower_for_cuda

from jax_ep.cuda import calls, intranode

pytestmark = pytest.mark.skipif(not intranode.compiled(),
                                reason="jax_ep built without the CUDA intranode ops")

R, T, H, CAP = 4, 8, 256, 20


def _lower(body, *shapes):
    return lower_for_cuda(body, R, *shapes)


def test_dispatch_takes_the_axis_index_first():
    def body(slot, sent, x):
        counts, recv = intranode.dispatch_call(calls.axis_index("ep"), slot, sent[0], [x],
                                               capacity=CAP)
        return recv
    text = _lower(body, ((T, R), jnp.int32), ((1, R), jnp.int32), ((T, H), jnp.bfloat16))
    call = custom_call(text, "jax_ep_intranode_dispatch")
    assert f"(tensor<i32>, tensor<{T}x{R}xi32>, tensor<{R}xi32>, tensor<{T}x{H}xbf16>)" in call
    assert f"-> (tensor<{R}x{R}xi32>, tensor<{CAP}x{H}xbf16>)" in call
    assert f"capacity = {CAP} : i64" in call


def test_cached_dispatch_and_combine_take_the_axis_index_first():
    def body(slot, counts, x, y):
        idx = calls.axis_index("ep")
        (recv,) = intranode.dispatch_cached_call(idx, slot, counts[0], [x], capacity=CAP)
        out = intranode.combine_call(idx, y, slot, counts[0])
        return recv, out
    text = _lower(body, ((T, R), jnp.int32), ((1, R, R), jnp.int32), ((T, H), jnp.float32),
                  ((CAP, H), jnp.bfloat16))
    cached = custom_call(text, "jax_ep_intranode_dispatch_cached")
    assert f"(tensor<i32>, tensor<{T}x{R}xi32>, tensor<{R}x{R}xi32>, tensor<{T}x{H}xf32>)" in cached
    combine = custom_call(text, "jax_ep_intranode_combine")
    assert (f"(tensor<i32>, tensor<{CAP}x{H}xbf16>, tensor<{T}x{R}xi32>, tensor<{R}x{R}xi32>)"
            f" -> tensor<{T}x{H}xbf16>") in combine
