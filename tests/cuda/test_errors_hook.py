"""A kernel's recorded message ends the text of JAX's runtime error (jax_ep.cuda.errors).

The record itself needs a GPU (tests/gpu: the timeout and disagreement
tests check the message in the raised error); here the hook is checked with
the recorded message replaced.
"""

import jax
import jax.numpy as jnp
import pytest

from jax_ep.cuda import errors


def _runtime_error():
    def fail(x):
        raise ValueError("boom")
    try:
        jax.jit(lambda x: jax.pure_callback(fail, x, x))(jnp.ones(2)).block_until_ready()
    except jax.errors.JaxRuntimeError as err:
        return err
    pytest.fail("no JaxRuntimeError")


def test_the_recorded_message_ends_the_error_text(monkeypatch):
    errors.install()
    monkeypatch.setattr(errors, "recorded_message", lambda: None)
    err = _runtime_error()
    assert "jax_ep: rank" not in str(err)
    message = "jax_ep: rank 0 of EP group 0 timed out after 3.0 s in dispatch waiting for ..."
    monkeypatch.setattr(errors, "recorded_message", lambda: message)
    assert str(err).endswith("\n" + message)
    assert "boom" in str(err)


def test_a_failing_lookup_never_hides_the_error(monkeypatch):
    errors.install()
    def broken():
        raise RuntimeError("no extension")
    monkeypatch.setattr(errors, "recorded_message", broken)
    assert "boom" in str(_runtime_error())
