"""The house's floor plan (docs/architecture.md): the parts/never table that page shows is read
here and enforced on every import of the library, module-level or inside a function; the kernels
import nothing of ours at run time either; no library code names a module of ours in a string
(lazy imports are import statements a tool can follow); no library code builds a path into
benchmarks/; entry points are installed."""

from __future__ import annotations

import ast
import importlib
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest
from helpers import ROOT

LIBRARY = ("pallas_kernels", "dfsattn_jax", "models")
OURS = LIBRARY + ("benchmarks",)
TABLE_MARK = "<!-- parts: tests/test_architecture.py reads this table -->"


def read_parts(text: str) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """``{part: (modules, never)}`` from the Markdown table that follows ``TABLE_MARK``."""
    lines = text.split(TABLE_MARK, 1)[1].strip().splitlines()
    parts = {}
    for line in lines[2:]:  # header and rule
        if not line.startswith("|"):
            break
        part, modules, never = (cell.strip() for cell in line.strip("|").split("|"))
        names = lambda cell: tuple(re.findall(r"`([\w.]+)`", cell))  # noqa: E731
        parts[part] = (names(modules), names(never))
    return parts


PARTS = read_parts((ROOT / "docs" / "architecture.md").read_text())


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_files() -> list[pathlib.Path]:
    return sorted(p for pkg in LIBRARY for p in (ROOT / pkg).rglob("*.py"))


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module an ``import`` / ``from ... import`` of ``path`` names (:func:`imports_of`)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    return imports_of(path.read_text(), package)


def imports_of(source: str, package: str) -> set[str]:
    """Every module an ``import`` / ``from ... import`` of ``source`` (a module of ``package``)
    names, at any depth (relative imports resolved; ``from a import b`` counts ``a.b`` too, which
    may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def part_of(module: str) -> str | None:
    """The part whose listed module is the longest prefix of ``module``."""
    best, length = None, -1
    for part, (modules, _) in PARTS.items():
        for m in modules:
            if (module == m or module.startswith(m + ".")) and len(m) > length:
                best, length = part, len(m)
    return best


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_table_is_read_and_names_every_rule_of_the_issue():
    assert {"kernels", "method", "shared model pieces", "sampling", "evaluation"} <= set(PARTS)
    never = {part: set(n) for part, (_, n) in PARTS.items()}
    assert {"dfsattn_jax", "models", "benchmarks"} <= never["kernels"]
    assert {"models", "benchmarks"} <= never["method"]
    families = {m for part, (mods, _) in PARTS.items() if part.startswith("family") for m in mods}
    assert families == {"models.wan", "models.hunyuan_video"}
    assert families <= never["shared model pieces"] and families <= never["sampling"]
    assert {"models.generate", "models.cli_args", "models.demo", "models.io"} <= never["evaluation"]
    assert all("benchmarks" in n for part, n in never.items() if part != "benchmarks")


def test_every_library_module_belongs_to_one_part():
    unplaced = [module_name(p) for p in library_files() if part_of(module_name(p)) is None]
    assert not unplaced, f"modules in no part of docs/architecture.md's table: {unplaced}"


@pytest.mark.parametrize("part", sorted(PARTS))
def test_no_part_imports_what_the_table_forbids(part):
    offending = {}
    for path in library_files():
        module = module_name(path)
        if part_of(module) != part:
            continue
        bad = sorted(
            name for name in imported_modules(path) for never in PARTS[part][1] if within(name, never)
        )
        if bad:
            offending[str(path.relative_to(ROOT))] = bad
    assert not offending, f"{part} must never import {PARTS[part][1]}: {offending}"


def test_the_parser_sees_imports_inside_functions_and_relative_ones():
    source = "def f():\n    from models import generate\n    from .. import io\n    import benchmarks.harness\n"
    assert {"models.generate", "models.io", "benchmarks.harness"} <= imports_of(source, "models.evaluation")
    assert part_of("models.evaluation.quality") == "evaluation"
    assert part_of("models.common.files") == "shared model pieces"


def loaded_by(imports: str, packages: tuple[str, ...]) -> list[str]:
    """The modules of ``packages`` that a fresh interpreter holds after running ``imports``."""
    code = f"import sys\n{imports}\nprint(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {packages!r})))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return [m for m in done.stdout.strip().split(",") if m]


def test_kernels_load_nothing_of_ours():
    imports = (
        "import pallas_kernels.contract, pallas_kernels.block_sparse_triton, pallas_kernels.block_sparse_mosaic\n"
        "import pallas_kernels.block_scores_triton"
    )
    assert loaded_by(imports, ("dfsattn_jax", "models", "benchmarks")) == []


def test_importing_the_method_loads_no_model_code():
    imports = "import dfsattn_jax\nfrom dfsattn_jax import block_sparse_attention, token_order, block_scores"
    assert loaded_by(imports, ("models", "benchmarks")) == []


_DYNAMIC = {"import_module", "find_spec", "__import__"}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            out.add(id(body[0].value))
    return out


def test_no_module_of_ours_is_imported_by_a_string():
    """Implementations are chosen by dfsattn_jax.dispatch through module references; a module path in
    a string (importlib.import_module("pallas_kernels...")) is invisible to this test and to tools."""
    offending = []
    for path in library_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in _DYNAMIC:
                continue
            for arg in node.args[:1]:
                if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] in OURS:
                    offending.append(f"{path.relative_to(ROOT)}:{node.lineno} {arg.value}")
    assert not offending, offending


_BENCH_PATH = re.compile(r"^(\.\./)*benchmarks(/\S*)?$")


def test_no_library_module_builds_a_path_into_benchmarks():
    """Benchmarks pass their result paths in; the library never names a file under benchmarks/
    (descriptions in messages and docstrings may mention them)."""
    offending = []
    for path in library_files():
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                if _BENCH_PATH.match(node.value.strip()):
                    offending.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not offending, offending


def test_the_benchmark_path_rule_catches_paths():
    for path in ("benchmarks", "benchmarks/results/e2e.json", "../benchmarks/results"):
        assert _BENCH_PATH.match(path)
    for text in ("train it with python -m benchmarks.train_small", "see benchmarks/NOTES.md for why"):
        assert not _BENCH_PATH.match(text)


def test_model_families_are_subpackages():
    from models import wan

    assert (ROOT / "models" / "wan" / "__init__.py").is_file()
    assert wan.WanTransformer3DModel.__module__ == "models.wan.transformer"


@pytest.mark.parametrize("script", ["dfsattn-demo", "dfsattn-generate"])
def test_console_scripts_are_declared(script):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts[script].partition(":")
    assert callable(getattr(importlib.import_module(module), func))
