"""The index arithmetic between the padded and ragged low-latency layouts
(jax_ep._ragged), which the CUDA backend wraps around its padded kernels,
against numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_ep import _ragged

L, RM, N, H = 4, 6, 12, 3


def padded_rows(counts, seed):
    """[L, RM, H] with distinct values (row id + 1) in the valid rows, -7 elsewhere."""
    rng = np.random.default_rng(seed)
    out = np.full((L, RM, H), -7.0, np.float32)
    for l, c in enumerate(counts):
        out[l, :c] = rng.standard_normal((c, H)).astype(np.float32) + 10 * (l + 1)
    return out


COUNTS = [[2, 0, 5, 1], [0, 0, 0, 0], [6, 6, 0, 0], [0, 3, 0, 6]]


@pytest.mark.parametrize("counts", COUNTS, ids=["mixed", "empty", "front", "back"])
def test_to_ragged_concatenates_the_valid_rows(counts):
    padded = padded_rows(counts, 1)
    ragged = np.asarray(jax.jit(_ragged.to_ragged, static_argnums=2)(
        padded, jnp.asarray(counts, jnp.int32), N))
    want = np.zeros((N, H), np.float32)
    i = 0
    for l, c in enumerate(counts):
        for p in range(c):
            want[i] = padded[l, p]
            i += 1
    np.testing.assert_array_equal(ragged, want)
    back = np.asarray(_ragged.to_padded(jnp.asarray(ragged), jnp.asarray(counts, jnp.int32), RM))
    mask = np.arange(RM)[None, :] < np.asarray(counts)[:, None]
    np.testing.assert_array_equal(back[mask], padded[mask])
    assert not back[~mask].any()


def test_without_zero_tail_the_valid_rows_are_the_same():
    counts = jnp.asarray(COUNTS[0], jnp.int32)
    padded = padded_rows(COUNTS[0], 2)
    zeroed = np.asarray(_ragged.to_ragged(padded, counts, N))
    loose = np.asarray(_ragged.to_ragged(padded, counts, N, zero_tail=False))
    used = sum(COUNTS[0])
    np.testing.assert_array_equal(loose[:used], zeroed[:used])


def test_flat_padded_rows_map_to_ragged_rows():
    counts = np.array([2, 0, 5, 1])
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    flat = np.array([[0, 1, -1], [2 * RM + 4, 3 * RM, 2 * RM]])
    want = np.where(flat >= 0, start[np.maximum(flat, 0) // RM] + flat % RM, -1)
    got = _ragged.ragged_of_flat(jnp.asarray(flat), jnp.asarray(counts, jnp.int32), RM)
    np.testing.assert_array_equal(np.asarray(got), want)

