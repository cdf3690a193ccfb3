"""The package's shape: no import circle, no import deferred into a function to dodge one,
and exactly one reader of the JAX_EP_LL_* switches (Python), none in C++."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jax_ep"


def _module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module, node, is_package):
    """The jax_ep modules an import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("jax_ep")]
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("jax_ep"):
        return []
    # `from . import cuda` names the submodule; `from .x import f` names module x
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in _MODULES else target
            for a in node.names]


_MODULES = {_module_name(p) for p in PACKAGE.rglob("*.py")}


def _imports():
    """{module: (module-level jax_ep imports, function-level jax_ep imports)}."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        tree = ast.parse(path.read_text())
        top, nested = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = _resolve(name, node, path.name == "__init__.py")
                (top if node.col_offset == 0 else nested).update(names)
        modules[name] = (top, nested)
    known = set(modules)
    return {m: ({t for t in top if t in known}, {t for t in nested if t in known})
            for m, (top, nested) in modules.items()}


def test_no_import_circle():
    # A module's parent packages are always imported before it, so an edge to
    # one of them closes no circle of its own; every other edge counts.
    graph = {m: {t for t in top if not m.startswith(t + ".")}
             for m, (top, _) in _imports().items()}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if n == m:
                continue
            if state.get(n) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack + [m, n]))
            if n not in state:
                visit(n, stack + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_cuda_backend_does_not_import_the_orchestration():
    for m, (top, nested) in _imports().items():
        if m.startswith("jax_ep.cuda"):
            for banned in ("jax_ep._runtime", "jax_ep._backend", "jax_ep._ops",
                           "jax_ep._overlap", "jax_ep"):
                assert banned not in top | nested, f"{m} imports {banned}"


def test_no_function_local_imports_of_jax_ep_modules():
    # The worker module defers on purpose: `python -m` must not import the
    # package's launcher machinery before it has joined the job.
    allowed = {"jax_ep.testing._worker"}
    offenders = {m: sorted(nested) for m, (_, nested) in _imports().items()
                 if nested and m not in allowed}
    assert offenders == {}


def test_the_switches_are_read_in_one_python_function_and_nowhere_in_cpp():
    readers = [p for p in PACKAGE.rglob("*.py") if re.search(r"JAX_EP_LL_", p.read_text())]
    assert [p.name for p in readers] == ["options.py"], readers
    cpp = [p for p in (ROOT / "ffi").rglob("*") if p.is_file()
           and re.search(r"\bgetenv\s*\(", p.read_text(errors="replace"))]
    assert cpp == [], cpp
