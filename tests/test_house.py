"""The house rules, checked on the source (an AST walk over preflexor_core; nothing is imported).

- The top level reads as the layers, and the pipeline flows one way: a module imports only rooms of
  its own layer or of earlier ones (``LAYERS``); evaluation, the last stage, is imported by nothing else.
- No import cycle between modules.
- A function-level import is only for an optional heavy dependency (``LAZY_OK``), with a comment on
  its line that names it.
- Environment variables are read in ``infra/env.py`` only.
- No product file is over 400 lines.

Run: ``python -m pytest -q tests/test_house.py``.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "preflexor_core"

# The layers, first to last: the shared core, then the pipeline stages in the order data flows.
LAYERS = ["infra", "text", "thinking", "tokenization", "kernels", "llm", "losses",
          "retrieval", "sampler", "teachers", "datagen", "rewards", "train", "reasoning", "evaluation"]
# Entry points at the top of the package: they may import any room.
ENTRY = {"preflexor_core", "preflexor_core.convert"}
# Optional heavy dependencies: absent on some machines (hnswlib, gguf, triton on a CPU-only build, a torch
# built without distributed support) or slow to import and needed only to draw (matplotlib).
LAZY_OK = ("triton", "gguf", "hnswlib", "matplotlib", "torch.distributed", "torch.nn.parallel")
MAX_LINES = 400


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (p, is_pkg)
    return out


MODULES = _modules()


def _show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _room(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _in_function(node, parents) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
    return False


def _imports(mod: str):
    """(target module, line, in a function, node) for every import in ``mod`` of the project or a library."""
    path, is_pkg = MODULES[mod]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, _in_function(node, parents), node
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target + "." + a.name for a in node.names
                     if node.module is None or target + "." + a.name in MODULES]
            for t in names or [target]:
                yield t, node.lineno, _in_function(node, parents), node


def _project(target: str) -> str | None:
    """The project module an import target names (a module, or the package holding a name); None for
    the compiled extension."""
    if target == "preflexor_core._C":
        return None
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _edges(function_level: bool = True) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for t, _, in_fn, _ in _imports(m):
            if in_fn and not function_level:
                continue
            pt = _project(t) if t.startswith("preflexor_core") else None
            if pt and pt != m:
                edges[m].add(pt)
    return edges


def test_every_room_is_a_layer():
    rooms = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    loose = {p.stem for p in PKG.glob("*.py")} - {"__init__", "convert"}
    assert rooms - {"corpus"} == set(LAYERS), f"rooms that are not in LAYERS: {sorted(rooms - set(LAYERS))}"
    assert not loose, f"loose modules beside the layers: {sorted(loose)}"


def test_the_pipeline_flows_one_way():
    back = []
    for m, targets in _edges().items():
        a = _room(m)
        if m in ENTRY or a is None:
            continue
        for t in targets:
            b = _room(t)
            if b is not None and LAYERS.index(b) > LAYERS.index(a):
                back.append(f"{m} -> {t} ({a} imports the later {b})")
    assert not back, "imports that run back up the layers:\n" + "\n".join(sorted(back))


def test_no_import_cycle():
    edges = _edges()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _lazy_dependency(target: str) -> str | None:
    """The optional heavy dependency a function-level import stands for: the library itself, or one
    that a project module imports at its top level (e.g. the Triton kernels)."""
    lib = next((d for d in LAZY_OK if target == d or target.startswith(d + ".")), None)
    mod = _project(target) if target.startswith("preflexor_core") else None
    if lib is None and mod is not None:
        tops = [t for t, _, in_fn, _ in _imports(mod) if not in_fn]
        lib = next((d for d in LAZY_OK for t in tops if t == d or t.startswith(d + ".")), None)
    return lib


def test_function_level_imports_are_optional_heavy_dependencies_with_a_comment():
    bad = []
    for m, (path, _) in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for t, line, in_fn, node in _imports(m):
            if not in_fn:
                continue
            text = " ".join(lines[node.lineno - 1:node.end_lineno])
            lib = _lazy_dependency(t)
            if lib is None:
                bad.append(f"{_show(path)}:{line}: {t} (not an optional heavy dependency: import it at the top)")
            elif "#" not in text or lib.split(".")[0] not in text.split("#", 1)[1]:
                bad.append(f"{_show(path)}:{line}: {t} (say in a comment why it is imported here)")
    assert not bad, "function-level imports:\n" + "\n".join(sorted(set(bad)))


def test_environment_variables_are_read_in_infra_env_only():
    readers = []
    for m, (path, _) in MODULES.items():
        if m == "preflexor_core.infra.env":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") and \
                    isinstance(node.value, ast.Name) and node.value.id == "os":
                readers.append(f"{_show(path)}:{node.lineno}")
    assert not readers, "environment read outside infra/env.py: " + ", ".join(readers)


@pytest.mark.parametrize("top", ["train.py", "infer.py"])
def test_top_level_clis_read_no_environment(top):
    assert "os.environ" not in (ROOT / top).read_text(encoding="utf-8")


def test_no_product_file_over_400_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in sorted(PKG.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    long += [f"{f}: {n}" for f in ("train.py", "infer.py")
             if (n := len((ROOT / f).read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines: " + ", ".join(long)


def test_the_rules_catch_a_back_edge(tmp_path, monkeypatch):
    """The walk sees a relative import of a later stage inside a function (the rule is not vacuous)."""
    fake = tmp_path / "preflexor_core" / "retrieval"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "x.py").write_text("def f():\n    from ..evaluation import runner\n")
    (tmp_path / "preflexor_core" / "evaluation").mkdir()
    (tmp_path / "preflexor_core" / "evaluation" / "__init__.py").write_text("")
    (tmp_path / "preflexor_core" / "evaluation" / "runner.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {
        "preflexor_core.retrieval": (fake / "__init__.py", True),
        "preflexor_core.retrieval.x": (fake / "x.py", False),
        "preflexor_core.evaluation": (tmp_path / "preflexor_core/evaluation/__init__.py", True),
        "preflexor_core.evaluation.runner": (tmp_path / "preflexor_core/evaluation/runner.py", False)})
    edges = _edges()
    assert edges["preflexor_core.retrieval.x"] == {"preflexor_core.evaluation.runner"}
    with pytest.raises(AssertionError, match="retrieval imports the later evaluation"):
        test_the_pipeline_flows_one_way()
    with pytest.raises(AssertionError, match="not an optional heavy dependency"):
        test_function_level_imports_are_optional_heavy_dependencies_with_a_comment()
