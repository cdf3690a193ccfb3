"""One launcher worker: ``python -m jax_ep.testing._worker pkg.mod:fn [args...]``.

Joins the job (:func:`init_distributed_from_env`), imports ``pkg.mod``, calls
``fn(*args)`` (args are strings), prints ``JAX_EP_RESULT:<json>`` when the
return value is JSON-serialisable and not None, and exits 0.  On an
exception it prints the traceback and exits 1.  A ``pytest.skip`` inside the
function prints ``JAX_EP_SKIP:<reason>`` and exits 0.  In every case it
shuts jax.distributed down under a time limit and then leaves with
``os._exit`` so that no lingering thread can hang the exit (after a failure
it waits at most 5 s for the shutdown barrier).

``SIGUSR1`` dumps every thread's Python stack to stderr (the launcher sends
it to workers it is about to kill on a timeout).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import traceback

from jax_ep.testing._protocol import RESULT_MARKER, SKIP_MARKER, resolve_target


def _is_skip(exc: BaseException) -> bool:
    # pytest.skip raises _pytest.outcomes.Skipped; unittest.SkipTest too
    name = type(exc).__name__
    return name in ("Skipped", "SkipTest")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    faulthandler.enable()
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    code = 1
    joined = False
    try:
        if not argv:
            raise SystemExit("usage: python -m jax_ep.testing._worker pkg.mod:fn [args...]")
        target, args = argv[0], argv[1:]
        from jax_ep.testing.distributed import init_distributed_from_env

        init_distributed_from_env()
        joined = True
        fn = resolve_target(target)
        result = fn(*args)
        if result is not None:
            try:
                line = json.dumps(result)
            except (TypeError, ValueError):
                line = None
            if line is not None:
                sys.stdout.write(f"\n{RESULT_MARKER}{line}\n")
        code = 0
    except SystemExit as e:
        if e.code is None or e.code == 0:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException as e:  # noqa: BLE001 - a worker reports everything
        if _is_skip(e):
            msg = str(getattr(e, "msg", "") or e).replace("\n", " ")
            sys.stdout.write(f"\n{SKIP_MARKER}{msg}\n")
            code = 0
        else:
            traceback.print_exc()
            code = 1
    finally:
        try:
            if joined:
                from jax_ep.testing.distributed import shutdown_distributed

                # After a failure, peers may be stuck waiting for this process
                # (in a collective): do not sit in the shutdown barrier for
                # long, exit so that the launcher sees the failure.
                if not shutdown_distributed(None if code == 0 else 5.0):
                    print("jax_ep worker: jax.distributed.shutdown() timed out",
                          file=sys.stderr)
        except BaseException:  # noqa: BLE001
            print("jax_ep worker: jax.distributed.shutdown() failed:", file=sys.stderr)
            traceback.print_exc()
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


if __name__ == "__main__":
    main()
