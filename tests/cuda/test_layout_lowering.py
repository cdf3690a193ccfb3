"""The layout custom call lowers for CUDA on a CPU-only machine.

Checks the StableHLO that jax_ep.cuda.layout.get_dispatch_layout_ffi emits (target
name, attributes, operand and result types), the result types under
shard_map and vmap, and the Python-side argument checks. Needs the CUDA ops
compiled in, not a GPU.
"""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_ep.cuda import extension, layout

pytestmark = pytest.mark.skipif(
    not extension.cuda_available(), reason="jax_ep built without CUDA ops (JAX_EP_CUDA=OFF or no nvcc)"
)


def _layout(t, e=16, r=4):
    return layout.get_dispatch_layout_ffi(t, num_experts=e, num_ranks=r)


def _cuda_hlo(fn, *shapes):
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def test_custom_call_in_cuda_lowering():
    text = _cuda_hlo(_layout, jax.ShapeDtypeStruct((32, 4), jnp.int32))
    calls = [line for line in text.splitlines() if "custom_call @jax_ep_get_dispatch_layout" in line]
    assert len(calls) == 1, text
    call = calls[0]
    assert "num_experts = 16 : i64" in call
    assert "num_ranks = 4 : i64" in call
    assert "(tensor<32x4xi32>) -> (tensor<4xi32>, tensor<16xi32>, tensor<32x4xi1>)" in call
    assert "has_side_effect" not in call


def test_result_shapes_and_dtypes():
    out = jax.eval_shape(lambda t: _layout(t, 256, 8), jax.ShapeDtypeStruct((100, 8), jnp.int32))
    assert [(o.shape, o.dtype) for o in out] == [
        ((8,), jnp.int32),
        ((256,), jnp.int32),
        ((100, 8), jnp.bool_),
    ]


def test_single_token_and_single_rank():
    text = _cuda_hlo(lambda t: _layout(t, 8, 1), jax.ShapeDtypeStruct((1, 2), jnp.int32))
    assert "(tensor<1x2xi32>) -> (tensor<1xi32>, tensor<8xi32>, tensor<1x1xi1>)" in text


def test_shard_map_keeps_varying_axis():
    mesh = jax.make_mesh((len(jax.devices()),), ("ep",))
    n = mesh.shape["ep"]

    @jax.shard_map(mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
    def f(t):
        outs = _layout(t)
        for o in outs:
            assert "ep" in jax.typeof(o).manual_axis_type.varying, jax.typeof(o)
        return tuple(o[None] for o in outs)

    x = jax.device_put(np.zeros((8 * n, 4), np.int32), jax.NamedSharding(mesh, P("ep")))
    info = jax.jit(f).trace(x).out_info
    assert [o.shape for o in info] == [(n, 4), (n, 16), (n, 8, 4)]


def test_vmap_is_sequential():
    text = _cuda_hlo(jax.vmap(_layout), jax.ShapeDtypeStruct((3, 32, 4), jnp.int32))
    assert "stablehlo.while" in text
    assert re.search(r"custom_call @jax_ep_get_dispatch_layout\(.*\(tensor<32x4xi32>\)", text)


@pytest.mark.parametrize(
    "shape, dtype, e, r, err",
    [
        ((32,), jnp.int32, 16, 4, TypeError),
        ((32, 4), jnp.int64, 16, 4, TypeError),
        ((32, 4), jnp.int32, 16, 3, ValueError),
        ((32, 4), jnp.int32, 16, 0, ValueError),
    ],
)
def test_bad_arguments(shape, dtype, e, r, err):
    with jax.enable_x64(True) if dtype == jnp.int64 else contextlib.nullcontext():
        with pytest.raises(err):
            jax.eval_shape(lambda t: _layout(t, e, r), jax.ShapeDtypeStruct(shape, dtype))



def test_route_custom_call_in_cuda_lowering():
    text = _cuda_hlo(lambda t: layout.route_ffi(t, num_experts=256, num_ranks=8),
                     jax.ShapeDtypeStruct((4096, 8), jnp.int32))
    calls = [line for line in text.splitlines() if "custom_call @jax_ep_route" in line]
    assert len(calls) == 1, text
    call = calls[0]
    assert "num_experts = 256 : i64" in call and "num_ranks = 8 : i64" in call
    # The third result is the kernels' per-chunk counts (4 chunks of 1024
    # tokens x 8 ranks): XLA-owned memory instead of a scratch allocation,
    # which a CUDA graph's replays would not see.
    assert "(tensor<4096x8xi32>) -> (tensor<4096x8xi32>, tensor<8xi32>, tensor<32xi32>)" in call
