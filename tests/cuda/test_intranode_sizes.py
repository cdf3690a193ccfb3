"""The intranode buffer sizing: `buffer_size` covers every call it promises to, and
the Python formula is the one the handlers enforce at run time (the C++ bound)."""

import pytest

import jax_ep
from jax_ep.cuda import extension, intranode


def test_buffer_size_covers_dispatch_and_combine():
    r, m, h, k = 8, 4096, 7168, 8
    size = jax_ep.buffer_size(r, m, h, top_k=k, dtype="bfloat16")
    assert size >= r * m * (h * 2 + 8 * k)  # dispatch of bf16 rows + ids + weights
    assert size >= r * m * h * 2  # combine of bf16 rows
    assert size >= r * m * (h + 4 * h // 128 + 8 * k)  # dispatch of the FP8 pair
    assert jax_ep.buffer_size(r, m, h, top_k=k, dtype="float32") > size
    assert jax_ep.buffer_size(r, m, h, top_k=k, capacity=2 * m) < size


@pytest.mark.skipif(not extension.cuda_available(), reason="jax_ep built without CUDA ops")
@pytest.mark.parametrize("capacity, rows", [(1, [16]), (4096, [14336, 32, 32]),
                                            (32768, [7168, 224, 32, 32])])
def test_dispatch_bytes_match_the_handlers_bound(capacity, rows):
    mod = extension.cuda_module()
    assert intranode.dispatch_bytes(capacity, rows) == mod.intranode_dispatch_bytes(capacity, rows)


@pytest.mark.skipif(not extension.cuda_available(), reason="jax_ep built without CUDA ops")
@pytest.mark.parametrize("ranks, tokens, row", [(1, 1, 16), (8, 4096, 14336), (64, 128, 28672)])
def test_combine_bytes_match_the_handlers_bound(ranks, tokens, row):
    mod = extension.cuda_module()
    assert intranode.combine_bytes(ranks, tokens, row) == mod.intranode_combine_bytes(
        ranks, tokens, row)
