import subprocess
import sys


def test_pure_packages_import_neither_lightning_nor_hydra():
    code = (
        "import sys, ddpmlab.diffusion, ddpmlab.objectives, ddpmlab.samplers, ddpmlab.networks\n"
        "heavy = ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_nothing_outside_cli_imports_cli():
    """cli/ holds entry points only: the package, the notebooks and the benchmarks use the library itself."""
    import ast
    import json
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    package = repo / "src" / "ddpmlab"
    sources = {p: p.read_text() for p in package.rglob("*.py") if "cli" not in p.relative_to(package).parts}
    sources |= {p: p.read_text() for p in (repo / "bench").glob("*.py")}
    for nb in (repo / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        sources[nb] = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
    assert len(sources) > 30
    offenders = []
    for path, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "ddpmlab.cli" or n.startswith("ddpmlab.cli.") for n in names):
                offenders.append(str(path.relative_to(repo)))
    assert not offenders, f"these import ddpmlab.cli: {sorted(set(offenders))}"


def ddpmlab_imports(package) -> dict[str, set[str]]:
    """module -> the ddpmlab modules it imports anywhere in its text (a function's lazy import counts: it runs
    the other module as surely, only later). ``from ddpmlab.x import y`` is the submodule x.y where there is one."""
    import ast

    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}  # fmt: skip
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_inside_ddpmlab(tmp_path):
    from pathlib import Path

    # the check itself finds a cycle, lazy imports included (api <-> latent was one: latent imported api in a function)
    fake = tmp_path / "ddpmlab"
    (fake / "cli").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "api.py").write_text("from ddpmlab.latent import build\n")
    (fake / "latent.py").write_text("def build():\n    from ddpmlab.api import load_checkpoint\n")
    (fake / "cli" / "__init__.py").write_text("")
    (fake / "cli" / "evaluate.py").write_text("from ddpmlab.cli import evaluate_images\n")
    (fake / "cli" / "evaluate_images.py").write_text("from ddpmlab.cli.evaluate import EvalContext\n")
    assert cycles(ddpmlab_imports(fake)) == [
        ["ddpmlab.api", "ddpmlab.latent"],
        ["ddpmlab.cli.evaluate", "ddpmlab.cli.evaluate_images"],
    ]
    graph = ddpmlab_imports(Path(__file__).resolve().parents[1] / "src" / "ddpmlab")
    assert len(graph) > 60 and "ddpmlab.stages" in graph["ddpmlab.api"]
    assert cycles(graph) == []


def test_checkpoint_reading_imports_nothing_above_it():
    """ddpmlab.checkpoint is low level: the stages, the public API, training, the Lightning modules and the entry
    points all build on it, so it may import none of them (else the next change brings back a cycle)."""
    from pathlib import Path

    graph = ddpmlab_imports(Path(__file__).resolve().parents[1] / "src" / "ddpmlab")
    above = ("ddpmlab.stages", "ddpmlab.api", "ddpmlab.training", "ddpmlab.evaluation", "ddpmlab.sampling",
             "ddpmlab.lit", "ddpmlab.callbacks", "ddpmlab.cli")  # fmt: skip
    reached, todo = set(), ["ddpmlab.checkpoint"]
    while todo:  # everything checkpoint imports, directly or through another module
        for m in graph[todo.pop()] - reached:
            reached.add(m)
            todo.append(m)
    assert not [m for m in reached if m.startswith(above)], sorted(reached)
