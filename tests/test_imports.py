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
