"""What the launcher and its workers agree on (kept out of ``_worker`` so that
importing the package never imports the module ``python -m`` runs)."""

from __future__ import annotations

import importlib

RESULT_MARKER = "JAX_EP_RESULT:"   # stdout line: the function's JSON result
SKIP_MARKER = "JAX_EP_SKIP:"       # stdout line: the function called pytest.skip


def resolve_target(target: str):
    """``"pkg.mod:fn"`` (or ``"pkg.mod:Class.method"``) -> the callable."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"target must look like 'package.module:function', got {target!r}")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj
