"""Workers for tests/test_agreement.py: processes that disagree at initialize.

Each returns what its process saw (the error text, or None) so that the test
can check every process raised and what the message names. Nothing here
touches JAX at import.
"""

import time


def _mesh():
    import jax

    return jax.make_mesh((jax.device_count(),), ("ep",))


def _initialize(**kw):
    import jax_ep

    try:
        jax_ep.initialize(_mesh(), axis_name="ep", timeout_s=20, **kw)
    except Exception as err:  # noqa: BLE001 - the test inspects the type and message
        return {"type": type(err).__name__, "message": str(err)}
    finally:
        jax_ep.shutdown()
    return None


def differing_sizes():
    """Process i asks for max_tokens_per_rank 128 * (i + 1): both must refuse."""
    import jax

    return _initialize(max_tokens_per_rank=128 * (jax.process_index() + 1), hidden=256)


def differing_options():
    import jax

    import jax_ep

    return _initialize(options=jax_ep.Options(force_put=jax.process_index() == 1))


def same_config():
    return _initialize(max_tokens_per_rank=128, hidden=256, options=__import__(
        "jax_ep").Options())


def one_process_never_initializes(absent="1"):
    """Process `absent` sleeps instead; the others must fail within the timeout."""
    import jax

    import jax_ep

    if jax.process_index() == int(absent):
        time.sleep(8)
        return None
    start = time.time()
    try:
        jax_ep.initialize(_mesh(), axis_name="ep", timeout_s=3)
    except Exception as err:  # noqa: BLE001
        return {"type": type(err).__name__, "message": str(err),
                "seconds": time.time() - start}
    return None


def one_step_fails(failing="1"):
    """A setup step that fails on one process raises on every process."""
    import jax

    from jax_ep import _agreement

    def part():
        if jax.process_index() == int(failing):
            raise OSError("no such device")
        return "done"

    try:
        _agreement.step(_mesh(), "a test step", part, timeout_s=20)
    except Exception as err:  # noqa: BLE001
        cause = err.__cause__
        return {"type": type(err).__name__, "message": str(err),
                "cause": None if cause is None else type(cause).__name__}
    return None
