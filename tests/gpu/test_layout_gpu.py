"""The CUDA layout kernel against an inline numpy computation, on a real GPU.

Skipped unless JAX's default backend is a GPU and the CUDA ops are built.
tests/conftest.py defaults JAX_PLATFORMS to cpu; run these with
``JAX_EP_GPU_TESTS=1 python -m pytest tests/gpu``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ep.cuda import extension, layout

pytestmark = pytest.mark.skipif(not extension.cuda_available(), reason="jax_ep built without CUDA ops")


@pytest.fixture(autouse=True)
def _needs_gpu():
    # Checked when a test runs, not at collection: starting JAX's GPU backend in
    # this process earlier would hold a CUDA context while MPS clients run.
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")


def numpy_layout(idx: np.ndarray, num_experts: int, num_ranks: int):
    """(num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank) by plain numpy."""
    per_rank_experts = num_experts // num_ranks
    valid = (idx >= 0) & (idx < num_experts)
    per_expert = np.bincount(idx[valid], minlength=num_experts).astype(np.int32)
    in_rank = np.zeros((idx.shape[0], num_ranks), dtype=bool)
    t, k = np.nonzero(valid)
    in_rank[t, idx[t, k] // per_rank_experts] = True
    return in_rank.sum(0).astype(np.int32), per_expert, in_rank


def random_topk(rng, num_tokens, num_topk, num_experts, invalid_fraction=0.1):
    """Distinct experts per token (as a router gives), some -1 and out-of-range ids."""
    scores = rng.random((num_tokens, num_experts))
    idx = np.argsort(scores, axis=1)[:, :num_topk].astype(np.int32)
    noise = rng.random(idx.shape)
    idx[noise < invalid_fraction / 2] = -1
    junk = rng.choice(np.array([-7, -2, num_experts, num_experts + 5, 2**31 - 1, -(2**31)]), idx.shape)
    odd = (noise >= invalid_fraction / 2) & (noise < invalid_fraction)
    idx[odd] = junk[odd].astype(np.int32)
    return idx


_layout = jax.jit(layout.get_dispatch_layout_ffi, static_argnames=("num_experts", "num_ranks"))


def _check(idx, num_experts, num_ranks):
    got = _layout(jnp.asarray(idx), num_experts=num_experts, num_ranks=num_ranks)
    want = numpy_layout(idx, num_experts, num_ranks)
    for name, g, w in zip(("per_rank", "per_expert", "in_rank"), got, want):
        g = np.asarray(g)
        assert g.dtype == w.dtype and g.shape == w.shape, name
        np.testing.assert_array_equal(g, w, err_msg=name)
    return got


@pytest.mark.parametrize("num_tokens", [0, 1, 1000])
@pytest.mark.parametrize(
    "num_experts, num_ranks, num_topk",
    [(16, 4, 4), (8, 8, 2), (64, 1, 6), (256, 8, 8), (1024, 64, 32), (7, 7, 7), (4096, 4096, 8),
     (4096, 1, 9)],
)
def test_layout_matches_numpy(num_tokens, num_experts, num_ranks, num_topk):
    rng = np.random.default_rng(num_tokens * 7919 + num_experts * 31 + num_topk)
    idx = random_topk(rng, num_tokens, num_topk, num_experts)
    _check(idx, num_experts, num_ranks)


@pytest.mark.parametrize("num_experts, num_ranks, num_topk", [(16, 4, 8), (1024, 64, 32)])
def test_layout_with_repeated_and_junk_ids(num_experts, num_ranks, num_topk):
    # Ids drawn with replacement: the same expert twice in a row, several
    # experts of one rank, -1, and ids just past either end.
    rng = np.random.default_rng(num_experts)
    idx = rng.integers(-2, num_experts + 2, size=(1000, num_topk), dtype=np.int32)
    _check(idx, num_experts, num_ranks)


def test_repeated_experts_count_once_per_rank():
    # Token 0 uses experts 0 and 1 (both on rank 0) and 0 again: rank 0 counts once.
    idx = np.array([[0, 1, 0, 5], [-1, -1, -1, -1], [7, 6, 99, -3]], dtype=np.int32)
    per_rank, per_expert, in_rank = _check(idx, 8, 4)
    assert np.asarray(per_rank).tolist() == [1, 0, 1, 1]
    assert np.asarray(per_expert)[0] == 2


def test_large_and_deterministic():
    rng = np.random.default_rng(0)
    idx = random_topk(rng, 65536, 32, 1024, invalid_fraction=0.01)
    first = _check(idx, 1024, 64)
    again = _layout(jnp.asarray(idx), num_experts=1024, num_ranks=64)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_deepep_setting_inside_shard_map():
    # 4096 tokens, top-8 of 256 experts, under jit + shard_map on one GPU.
    mesh = jax.make_mesh((1,), ("ep",), devices=jax.devices()[:1])
    rng = np.random.default_rng(1)
    idx = random_topk(rng, 4096, 8, 256, invalid_fraction=0.0)
    P = jax.sharding.PartitionSpec

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
    def f(t):
        outs = layout.get_dispatch_layout_ffi(t, num_experts=256, num_ranks=8)
        return tuple(o[None] for o in outs)

    x = jax.device_put(idx, jax.NamedSharding(mesh, P("ep")))
    got = [np.asarray(o)[0] for o in f(x)]
    for g, w in zip(got, numpy_layout(idx, 256, 8)):
        np.testing.assert_array_equal(g, w)


def _raw_layout_call(idx, num_experts, num_ranks, result_shapes):
    """The custom call with caller-chosen result shapes (bypasses the wrapper's checks)."""
    extension.register_targets()
    types = [jax.ShapeDtypeStruct(s, d) for s, d in zip(result_shapes, (jnp.int32, jnp.int32, jnp.bool_))]
    call = jax.ffi.ffi_call(layout.GET_DISPATCH_LAYOUT, types)
    return jax.block_until_ready(
        call(jnp.asarray(idx), num_experts=np.int64(num_experts), num_ranks=np.int64(num_ranks))
    )


@pytest.mark.parametrize("num_tokens", [0, 5])
def test_handler_rejects_bad_arguments(num_tokens):
    idx = np.zeros((num_tokens, 2), np.int32)
    # Result shapes that disagree with the attributes.
    with pytest.raises(Exception, match="do not match topk_idx"):
        _raw_layout_call(idx, 16, 4, [(4,), (8,), (num_tokens, 4)])
    # More experts than the kernel supports (also proves T=0 reaches the handler).
    with pytest.raises(Exception, match="num_experts must be in"):
        _raw_layout_call(idx, 8192, 4, [(4,), (8192,), (num_tokens, 4)])
    with pytest.raises(Exception, match="divide num_experts"):
        _raw_layout_call(idx, 16, 3, [(3,), (16,), (num_tokens, 3)])


def numpy_route(idx: np.ndarray, num_experts: int, num_ranks: int):
    """(slot [T, R], sent [R]): position of t among the tokens going to r, or -1."""
    in_rank = numpy_layout(idx, num_experts, num_ranks)[2]
    before = np.cumsum(in_rank, axis=0) - in_rank
    return np.where(in_rank, before, -1).astype(np.int32), in_rank.sum(0).astype(np.int32)


_route = jax.jit(layout.route_ffi, static_argnames=("num_experts", "num_ranks"))


@pytest.mark.parametrize("num_tokens", [0, 1, 1023, 1024, 4096, 5000])
@pytest.mark.parametrize("num_experts, num_ranks, num_topk",
                         [(256, 1, 8), (256, 8, 8), (1024, 64, 32), (7, 7, 3)])
def test_route_matches_numpy(num_tokens, num_experts, num_ranks, num_topk):
    rng = np.random.default_rng(num_tokens + num_ranks)
    idx = random_topk(rng, num_tokens, num_topk, num_experts)
    idx[: num_tokens // 3] = rng.integers(-2, num_experts + 2, (num_tokens // 3, num_topk))
    slot, sent = _route(jnp.asarray(idx), num_experts=num_experts, num_ranks=num_ranks)
    want_slot, want_sent = numpy_route(idx, num_experts, num_ranks)
    np.testing.assert_array_equal(np.asarray(slot), want_slot)
    np.testing.assert_array_equal(np.asarray(sent), want_sent)
