"""jax_ep's own message in the errors JAX raises after a kernel stopped.

A kernel that times out, or finds that the ranks disagree, leaves a record
(rank, op, what it waited for or how the calls differ) in host memory and
traps; XLA then raises its generic `jax.errors.JaxRuntimeError` ("unspecified
launch failure"). `install` makes the text of that error end with the
message jax_ep's runtime formatted from the record, so the Python exception
says what happened. Installed once, by the CUDA setup; the text of errors
raised while no jax_ep record exists is unchanged.
"""

from __future__ import annotations

import threading

import jax

from . import extension

_lock = threading.Lock()
_installed = False


def recorded_message() -> str | None:
    """The first timeout / disagreement message of this process's kernels, if any."""
    for module, read in ((extension._cuda_module(), "last_error"),
                         (extension._nvshmem_module(), "ll_last_error"),
                         (extension._nvshmem_module(), "internode_last_error")):
        if module is not None and hasattr(module, read):
            message = getattr(module, read)()
            if message:
                return message
    return None


def install() -> None:
    """Append the recorded message to the text of every JaxRuntimeError (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        error = jax.errors.JaxRuntimeError
        plain = error.__str__

        def with_jax_ep_message(self):
            text = plain(self)
            try:
                message = recorded_message()
            except Exception:  # noqa: BLE001 - never hide the original error
                message = None
            if message and message not in text:
                text = f"{text}\n{message}"
            return text

        error.__str__ = with_jax_ep_message
        _installed = True
