"""The architecture as checks: import-linter's contracts in pyproject.toml (floors, no rewards -> decoding, no
cycles between files), every module on a floor, and the house limits (600 lines a module, 40 a docstring)."""

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("alignment", "rewards", "decoding")
LINT = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")


def modules() -> list[str]:
    return sorted(f"{p}.{f.stem}" for p in PACKAGES for f in (ROOT / p).glob("*.py") if f.stem != "__init__")


def lint(root: Path) -> subprocess.CompletedProcess:
    # The checked tree first on the path, so a copy is analysed instead of the installed packages.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def copy_tree(tmp_path: Path) -> Path:
    for p in PACKAGES:
        shutil.copytree(ROOT / p, tmp_path / p, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_contracts_hold():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("alignment/stats.py", "import alignment.dpo", "floors"),  # core -> recipe
    ("rewards/user_weights.py", "import decoding.combiners", "rewards never imports decoding"),
    ("alignment/files.py", "import alignment.config", "no import cycles"),  # config imports files
    ("rewards/apc.py", "def f():\n    import rewards.apc_eval", "no import cycles"),  # lazy imports count too
])
def test_a_forbidden_import_breaks_them(tmp_path, module, line, broken):
    root = copy_tree(tmp_path)
    with open(root / module, "a") as f:
        f.write(f"\n{line}\n")
    result = lint(root)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout and "BROKEN" in result.stdout


def test_every_module_is_on_a_floor():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    placed = [m.strip().strip("()") for layer in layers for m in layer.split(":")]
    assert sorted(placed) == modules(), "a module missing from (or named twice in) the floors of pyproject.toml"
    assert all("ignore_imports" not in c for c in contracts)


def test_modules_and_docstrings_stay_short():
    files = [f for p in (*PACKAGES, "bench") for f in sorted((ROOT / p).glob("*.py"))]
    long_modules = {f.name: n for f in files if (n := len(f.read_text().splitlines())) > 600}
    assert not long_modules, f"modules over 600 lines: {long_modules}"
    long_docs = {}
    for f in files:
        tree = ast.parse(f.read_text())
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                doc = ast.get_docstring(node, clean=False)
                if doc and len(doc.splitlines()) > 40:
                    long_docs[f"{f.relative_to(ROOT)}:{getattr(node, 'name', '<module>')}"] = len(doc.splitlines())
    assert not long_docs, f"docstrings over 40 lines: {long_docs}"
