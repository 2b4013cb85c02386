"""The layout's rules, checked on the source: no import cycles (function-local imports
counted), the serving path never imports the lab, the kernels never import the comm
layer, no module over 600 lines, and no dispatch by ``hasattr`` in the comm layer."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVING = ("megatron_lite.parallel_state", "megatron_lite.tensor_parallel",
           "megatron_lite.models", "megatron_lite.checkpoint", "megatron_lite.comm",
           "megatron_lite.kernels", "megatron_lite.inference")


def _modules():
    """{module name: path} of the package, the kernels under their installed name."""
    mods = {}
    for p in sorted((REPO / "megatron_lite").rglob("*.py")) + sorted((REPO / "kernels").glob("*.py")):
        rel = p.relative_to(REPO)
        if rel.parts[:2] == ("megatron_lite", "kernels"):
            continue                        # the link to kernels/, listed below it
        parts = list(rel.with_suffix("").parts)
        if parts[0] == "kernels":
            parts = ["megatron_lite"] + parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def _resolve(name):
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod, path):
    """Every module of ours that ``mod`` imports, anywhere in its body."""
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {_resolve(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg
                for _ in range(node.level - 1):
                    up = up.rpartition(".")[0]
                base = up + ("." + base if base else "")
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(_resolve(full) if full in MODULES else _resolve(base))
    out.discard(None)
    out.discard(mod)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_no_import_cycles():
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))
    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, cycles


@pytest.mark.parametrize("serving", SERVING)
def test_serving_path_never_imports_the_lab(serving):
    bad = {m: sorted(d for d in deps if d.startswith(("megatron_lite.lab", "megatron_lite.cli")))
           for m, deps in GRAPH.items() if m == serving or m.startswith(serving + ".")}
    assert not {m: d for m, d in bad.items() if d}


def test_nothing_imports_the_cli():
    """megatron_lite.cli sits on top: the library and the lab never import it."""
    bad = {m: sorted(d for d in deps if d.startswith("megatron_lite.cli"))
           for m, deps in GRAPH.items() if not m.startswith("megatron_lite.cli")}
    assert not {m: d for m, d in bad.items() if d}
    assert any(m.startswith("megatron_lite.cli.") for m in GRAPH)   # the walk sees it


def test_kernels_never_import_the_comm_layer():
    bad = {m: sorted(d for d in deps if d.startswith("megatron_lite.comm"))
           for m, deps in GRAPH.items() if m.startswith("megatron_lite.kernels")}
    assert not {m: d for m, d in bad.items() if d}


def test_no_module_over_600_lines():
    paths = list(MODULES.values()) + sorted((REPO / "tools").glob("*.py"))
    long = {str(p.relative_to(REPO)): n for p in paths
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long


def test_the_comm_layer_dispatches_on_declared_interfaces():
    """No ``hasattr`` in the comm layer or the kernels: what a codec can do is declared
    by the Scheme protocol (comm/codecs/base.py), not probed."""
    hits = [f"{p.relative_to(REPO)}:{n.lineno}" for m, p in MODULES.items()
            if m.startswith(("megatron_lite.comm", "megatron_lite.kernels"))
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "hasattr"
            and "symm_mem" not in ast.unparse(n)]   # a torch version probe, not a codec
    assert not hits


def test_every_codec_family_registers_itself():
    from megatron_lite.comm.codecs import names
    from megatron_lite.comm.codecs.registry import entry
    families = {entry(n).family for n in names()}
    modules = {p.stem for p in (REPO / "megatron_lite" / "comm" / "codecs").glob("*.py")
               if p.stem not in ("__init__", "base", "registry")}
    assert families == modules
