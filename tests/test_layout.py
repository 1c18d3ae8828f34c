"""The package's layering, read from the import statements: nothing imports upward.

The op and its backends (``fastpeft.ops``, the Triton kernels in ``fastpeft_kernels``) know nothing of transformers integration, adapters, serving or
the command line; serving uses the library, never the command line; only ``python -m fastpeft`` reaches the CLI."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastpeft"

# module prefix -> the fastpeft subpackages/modules it must never import
FORBIDDEN = {
    "fastpeft.ops": ("integration", "adapters", "bank", "multi", "serve", "cli", "bench", "loading"),
    "fastpeft.integration": ("bank", "multi", "serve", "cli", "bench"),
    "fastpeft.serve": ("cli", "bench"),
    "fastpeft.bench": ("cli", "serve"),
    "fastpeft.bank": ("serve", "cli", "bench", "multi"),
    "fastpeft.bank_seq2seq": ("serve", "cli", "bench", "multi"),
    "fastpeft.multi": ("serve", "cli", "bench", "bank", "bank_seq2seq"),
    "fastpeft.multi_seq2seq": ("serve", "cli", "bench", "bank", "bank_seq2seq"),
    # adapter files in PEFT's format know nothing of models, kernels or their users
    "fastpeft.adapters": ("ops", "integration", "bank", "multi", "serve", "cli", "bench", "backbone"),
    # the shared core under the bank, the trainer and the engine
    "fastpeft.backbone": ("bank", "multi", "serve", "cli", "bench"),
    "fastpeft.prefix_tables": ("bank", "multi", "serve", "cli", "bench"),
    "fastpeft.sampling": ("integration", "bank", "multi", "serve", "cli", "bench"),
    # the one training loop (the trainer, the CLI and the benchmarks step through it) and the shared data path
    "fastpeft.training_loop": ("ops", "integration", "adapters", "bank", "multi", "serve", "cli", "bench",
                               "backbone", "prefix_tables", "data"),
    "fastpeft.data": ("ops", "integration", "adapters", "bank", "multi", "serve", "cli", "bench", "backbone",
                      "prefix_tables", "training_loop"),
}


def _module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path):
    """Every fastpeft module ``path`` imports (``from .x import y`` counts as ``x`` and ``x.y``), resolved to
    absolute names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            imported.add(module)
            imported.update(f"{module}.{alias.name}" for alias in node.names)
    return {module for module in imported if module.startswith("fastpeft")}


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_the_scan_sees_the_package():
    # A broken scan (no files, no imports found) would make the layering tests below pass vacuously.
    modules = {_module_name(path): _imported_modules(path) for path in _sources()}
    assert "fastpeft.serve.model_kinds" in modules and "fastpeft.bank_seq2seq" in modules["fastpeft.serve.model_kinds"]
    assert "fastpeft.cli" in modules["fastpeft.__main__"]


@pytest.mark.parametrize("owner", sorted(FORBIDDEN))
def test_nothing_imports_upward(owner):
    violations = []
    for path in _sources():
        name = _module_name(path)
        if name != owner and not name.startswith(owner + "."):
            continue
        for module in _imported_modules(path):
            top = module.split(".")[1] if "." in module else ""
            if top in FORBIDDEN[owner]:
                violations.append(f"{name} imports {module}")
    assert not violations, "\n".join(violations)


def test_the_triton_kernels_import_nothing_of_fastpeft():
    kernels = PACKAGE.parent / "fastpeft_kernels"
    sources = sorted(kernels.glob("*.py"))
    assert sources
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(name.split(".")[0] == "fastpeft" for name in names), f"{path.name} imports {names}"


def test_only_the_entry_point_imports_the_cli():
    importers = sorted(_module_name(path) for path in _sources()
                       if not _module_name(path).startswith("fastpeft.cli")
                       and any(m == "fastpeft.cli" or m.startswith("fastpeft.cli.") for m in _imported_modules(path)))
    assert importers == ["fastpeft.__main__"]


def _unit(module):
    """The part of the tree a module belongs to: ``fastpeft.<top>`` (a subpackage or a top-level module)."""
    return ".".join(module.split(".")[:2])


def test_no_module_imports_another_units_private_names():
    """Each subpackage or top-level module talks to the others through public names only: no ``from x import _y``
    and no ``x._y`` module path across them (inside one subpackage, private helpers are shared freely)."""
    violations = []
    for path in _sources():
        name = _module_name(path)
        for module in _imported_modules(path):
            if _unit(module) == _unit(name):
                continue
            private = [part for part in module.split(".")[1:] if part.startswith("_") and not part.startswith("__")]
            if private:
                violations.append(f"{name} imports {module}")
    assert not violations, "\n".join(violations)
