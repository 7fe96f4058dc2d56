"""The floors, enforced from the imports (docs/architecture.md): data flows models -> convert -> parity -> cli.

Every import statement of a package's files is read, function-level (lazy) imports included, and
resolved to an absolute module name, so a forbidden import fails here whichever way it is spelled.
"""
from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_PACKAGES = ("ldm", "transformers", "diffusers", "open_clip")
FLOORS = ("models", "convert", "parity")


def _module_of(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return "sdport" if rel == "__init__" else "sdport." + rel.removesuffix(".__init__")


def _files(top: str) -> list[str]:
    if top.endswith(".py"):
        return [os.path.join(REPO, top)]
    out = []
    for root, _, names in os.walk(os.path.join(REPO, top)):
        out += [os.path.join(root, n) for n in names if n.endswith(".py")]
    return sorted(out)


def imports(path: str) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    module = _module_of(path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)  # `from . import convert` names a module
    return out


def _offenders(tops, forbidden) -> list[str]:
    bad = []
    for top in tops:
        for f in _files(top):
            for name in imports(f):
                if any(name == p or name.startswith(p + ".") for p in forbidden):
                    bad.append(f"{os.path.relpath(f, REPO)} imports {name}")
    return sorted(bad)


def test_the_resolver_sees_relative_and_lazy_imports():
    got = imports(os.path.join(REPO, "parity", "harness.py"))
    assert "sdport.models.storage.layout" in got and "sdport.convert.convert" in got  # the latter is lazy


def test_models_import_nothing_above_them():
    assert _offenders(["models"], ["sdport.convert", "sdport.parity", "sdport.cli", "sdport.fixtures"]) == []


def test_convert_imports_neither_parity_nor_cli():
    assert _offenders(["convert"], ["sdport.parity", "sdport.cli", "sdport.fixtures"]) == []


def test_parity_never_imports_the_test_data_package():
    assert _offenders(["parity"], ["sdport.cli", "sdport.fixtures"]) == []


@pytest.mark.parametrize("top", ["models", "convert", "cli.py", "__init__.py", "__main__.py"])
def test_only_parity_imports_the_reference_packages(top):
    assert _offenders([top], REFERENCE_PACKAGES) == []


def test_storage_knows_no_model():
    """The layout's reader needs the error types and the component names, nothing else of models/."""
    allowed = ("sdport.models.storage", "sdport.models.errors", "sdport.models.components")
    bad = [b for b in _offenders([os.path.join("models", "storage")], ["sdport.models"])
           if not any(b.endswith(f" imports {a}") or f" imports {a}." in b for a in allowed)]
    assert bad == []


def test_the_command_lines_dtype_names_are_the_libraries():
    """cli.py names the dtypes itself (building the command line imports no torch): the same names."""
    from sdport import cli
    from sdport.models.devices import DTYPES
    from sdport.parity.metrics import DEFAULT_TOLERANCES

    from sdport.models.unet import ATTENTION_PRECISIONS

    assert cli.DTYPES == tuple(DTYPES)
    assert set(cli.GATES) == set(DEFAULT_TOLERANCES)
    assert cli.ATTENTION_PRECISIONS == ATTENTION_PRECISIONS
    assert cli.COMPONENT_NAMES == tuple(__import__("sdport.models.components", fromlist=["NAMES"]).NAMES)


def test_building_the_command_line_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, sdport.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
