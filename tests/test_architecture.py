"""The house's import direction (docs/architecture.md): the method never imports the models,
benchmarks or demo; kernels import no model code; entry points are installed."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest
from helpers import ROOT



def _imported_modules(package: str) -> dict[str, set[str]]:
    """Every module named in an ``import`` / ``from ... import`` of each file of ``package``."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("dfsattn_jax", ("models", "benchmarks")),
        ("pallas_kernels", ("models", "benchmarks")),
        ("models", ("benchmarks",)),
    ],
)
def test_import_direction(package, forbidden):
    offending = {
        path: sorted(n for n in names if n.split(".")[0] in forbidden)
        for path, names in _imported_modules(package).items()
    }
    offending = {path: names for path, names in offending.items() if names}
    assert not offending, f"{package} must not import {forbidden}: {offending}"


def test_importing_the_method_loads_no_model_code():
    code = (
        "import sys, dfsattn_jax\n"
        "from dfsattn_jax import block_sparse_attention, token_order, block_scores\n"
        "bad = sorted(m for m in sys.modules if m == 'models' or m.startswith(('models.', 'benchmarks')))\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "", f"importing dfsattn_jax loaded {done.stdout.strip()}"


def test_model_families_are_subpackages():
    from models import wan

    assert (ROOT / "models" / "wan" / "__init__.py").is_file()
    assert wan.WanTransformer3DModel.__module__ == "models.wan.transformer"


@pytest.mark.parametrize("script", ["dfsattn-demo", "dfsattn-generate"])
def test_console_scripts_are_declared(script):
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts[script].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), func))
