"""The package's layers import one way, checked on the source (``ast``), not by convention.

public op modules -> ``_glue`` -> ``_reference`` and ``backends/<name>``; a backend never imports a
public module, the glue or another backend (shared CUDA helpers live in ``backends/_cuda``); the
registry and the op table sit below everything they dispatch to.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import arrayattn as aa

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "arrayattn"
BACKENDS = ROOT / "backends"

#: Public modules: one per mechanism family (re-exported by the package), and the namespaces
#: reached as ``arrayattn.<name>`` (adapters, distribution).
NAMESPACES = ("torch", "jax", "dask", "distributed")
PUBLIC = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_"))
FAMILIES = sorted(set(PUBLIC) - set(NAMESPACES))


def _module_name(path: pathlib.Path) -> str:
    if path.is_relative_to(BACKENDS):
        rel = path.relative_to(BACKENDS).with_suffix("")
        return ".".join(("arrayattn", "backends", *rel.parts)).removesuffix(".__init__")
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute names of every module ``path`` imports (any depth, incl. function-level)."""
    name = _module_name(path)
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: no import at run time
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def _files(folder: pathlib.Path, pattern: str = "*.py") -> list[pathlib.Path]:
    return sorted(folder.rglob(pattern))


def _violations(files, forbidden) -> list[str]:
    bad = []
    for path in files:
        for mod in sorted(_imports(path)):
            if any(mod == f or mod.startswith(f + ".") for f in forbidden(path)):
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    return bad


def test_public_modules_are_found():
    assert "attention" in PUBLIC
    assert "neighborhood" in PUBLIC


def test_reference_imports_no_higher_layer():
    forbidden = [f"arrayattn.{m}" for m in PUBLIC] + [
        "arrayattn._glue", "arrayattn._op", "arrayattn._registry", "arrayattn.backends",
    ]  # fmt: skip
    assert _violations(_files(PACKAGE / "_reference"), lambda p: forbidden) == []


def test_glue_imports_no_public_module_and_no_backend():
    forbidden = [f"arrayattn.{m}" for m in PUBLIC] + ["arrayattn.backends", "arrayattn._op"]
    assert _violations(_files(PACKAGE / "_glue"), lambda p: forbidden) == []


def test_backends_import_no_public_module_no_glue_no_other_backend():
    names = sorted(p.name for p in BACKENDS.iterdir() if p.is_dir() and not p.name.startswith("_"))

    def forbidden(path):
        own = path.relative_to(BACKENDS).parts[0]
        others = [f"arrayattn.backends.{n}" for n in names if n != own]
        return [f"arrayattn.{m}" for m in PUBLIC] + ["arrayattn._glue", "arrayattn._op"] + others

    assert _violations(_files(BACKENDS), forbidden) == []


def test_core_has_no_cycles():
    """``_registry`` (the op table and the backends) imports neither the op class nor the
    setting; ``_bench`` does not import the command line that runs it."""
    checks = {
        PACKAGE / "_registry.py": ["arrayattn._op", "arrayattn._config"],
        PACKAGE / "_kernel.py": ["arrayattn._op", "arrayattn._registry", "arrayattn._config"],
        **{p: ["arrayattn.__main__"] for p in _files(PACKAGE / "_bench")},
    }
    bad = _violations(checks, lambda p: checks[p] + [f"arrayattn.{m}" for m in PUBLIC])
    assert bad == []


@pytest.mark.parametrize("module", FAMILIES)
def test_public_modules_export_only_their_all(module):
    """Every name a public module defines without an underscore is in its ``__all__`` (a
    literal list), and every name in ``__all__`` is re-exported by the package."""
    mod = __import__(f"arrayattn.{module}", fromlist=["__all__"])
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    literal = [
        n for n in tree.body
        if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets)
    ]  # fmt: skip
    assert literal, f"{module}: no __all__"
    assert isinstance(literal[0].value, ast.List), f"{module}: __all__ is not a literal list"
    defined = {
        n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
    } | {
        t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
        if isinstance(t, ast.Name)
    }  # fmt: skip
    public = {n for n in defined if not n.startswith("_")}
    assert public <= set(mod.__all__), (
        f"{module}: public but not exported: {public - set(mod.__all__)}"
    )
    assert set(mod.__all__) <= set(aa.__all__)


def test_every_registered_op_is_exported():
    """The package's re-export list is kept by hand (explicit imports, a literal ``__all__``);
    forgetting an op there fails here."""
    assert set(aa.registered_ops()) <= set(aa.__all__)
