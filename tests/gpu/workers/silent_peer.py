"""A peer that never calls: the helpers both timeout tests share.

`run_without_peer` runs in every worker process; `silent_peer_output` runs in
pytest and returns what the waiting process printed. Nothing here touches JAX
at import.
"""

import time


def run_without_peer(compiled, args, skipper, wait_s, last_error):
    """Every process has compiled the program (multi-process XLA compilation
    waits for all of them); `skipper` never runs it and keeps its buffers mapped
    while the others must time out. Returns what the waiting side saw."""
    import jax

    if jax.process_index() == int(skipper):
        time.sleep(float(wait_s))
        return {"skipped": True}
    start = time.time()
    try:
        jax.block_until_ready(compiled(*args))
        raised = None
    except Exception as err:  # noqa: BLE001 - the XLA error type varies
        raised = str(err)
    message = last_error()
    print("jax_ep timeout message:", message, flush=True)
    print("the call raised:", raised, flush=True)
    print("message in the exception:", bool(message) and raised is not None and message in raised,
          flush=True)
    return {"raised": raised is not None, "message": message, "seconds": time.time() - start}


def silent_peer_output(target, gpu_dir, args=()):
    """Launch `target(*args)` on 2 processes of the GPU; the first one's output and run time."""
    from jax_ep.testing import LaunchError, launch

    try:
        results = launch(target, 2, platform="gpu", timeout=120, env={"PYTHONPATH": gpu_dir},
                         args=tuple(args))
    except LaunchError as err:  # the trapped kernel may take the process down
        results = err.results
    return results[0].output, results[0].elapsed
