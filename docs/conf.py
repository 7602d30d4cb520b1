"""Sphinx configuration of the arrayattn documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``. The build needs no
network: there are no intersphinx mappings and the theme is Sphinx's builtin ``alabaster``.
"""

from __future__ import annotations

import os
import re

import arrayattn
from arrayattn._op import Op

# The gallery's examples import arrayattn from the installed (editable) package; keep matplotlib
# headless.
os.environ.setdefault("MPLBACKEND", "agg")

project = "arrayattn"
author = "the arrayattn developers"
copyright = "the arrayattn developers"
release = arrayattn.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path: list[str] = []
# examples/ holds the gallery sources (sphinx-gallery reads them and writes auto_examples/).
exclude_patterns = ["_build", "examples", "Thumbs.db", ".DS_Store"]
root_doc = "index"
html_theme = "alabaster"
html_static_path: list[str] = []
html_title = f"arrayattn {release}"

# -- autodoc / numpydoc ----------------------------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
numpydoc_show_class_members = False  # members are listed explicitly with :members:
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = False

# -- sphinx-gallery --------------------------------------------------------------------------------

sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": "plot_",  # execute every plot_*.py
    "ignore_pattern": r"__init__\.py",
    # Keep the build fast and offline: no backreference pages, no zip of all examples, no
    # memory profiling; examples run in file-name order. Every value is a string or number so
    # Sphinx can pickle the configuration (callables here produce a warning under -W).
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "show_memory": False,
    "show_signature": False,
    "remove_config_comments": True,
    "abort_on_example_error": False,
    "only_warn_on_example_error": False,
    "min_reported_time": 1,
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib",),
    "plot_gallery": "True",
}


# -- public ops: callable Op objects documented as functions ---------------------------------------
#
# A public op (``arrayattn.scaled_dot_product_attention``) is an :class:`arrayattn.Op` instance
# that ``functools.update_wrapper`` gave its *prepare* function's ``__doc__``, ``__name__``,
# ``__module__`` and ``__wrapped__``. ``.. autofunction::`` documents it as a function: the
# docstring is the prepare function's, and the signature comes from ``inspect.signature``, which
# follows ``__wrapped__``. One thing is wrong for readers: the prepare function's return annotation
# is the internal ``Call`` record, not what calling the op returns (the docstring's Returns
# section says that), so the hook below drops the return annotation of ops.

# Show the array annotations by their alias name, not as the ``Any`` they stand for.
autodoc_type_aliases = {"Array": "Array"}


# Sphinx 9 renders an aliased name inside a union or a generic as ``TypeAliasForwardRef('Array')``;
# show the bare alias name there too.
_ALIAS_REPR = re.compile(r"TypeAliasForwardRef\('([^']*)'\)")


def _process_signature(app, what, name, obj, options, signature, return_annotation):
    fix = lambda text: text and _ALIAS_REPR.sub(r"\1", text)  # noqa: E731
    if isinstance(obj, Op):
        return fix(signature), ""
    return fix(signature), fix(return_annotation)


# -- the op x backend support table of docs/backends.rst, from the kernels' declarations -----------


def _write_support_table(app):
    from arrayattn import _registry

    header, rows = _registry.support_table()
    out = os.path.join(app.srcdir, "api", "generated", "support_table.rst")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    lines = [".. list-table::", "   :header-rows: 1", "   :widths: auto", ""]
    for row in [header, *rows]:
        cells = [f"``{row[0]}``" if row is not header else row[0], *row[1:]]
        lines.append("   * - " + cells[0])
        lines.extend(f"     - {cell}" for cell in cells[1:])
    text = "\n".join(lines) + "\n"
    if not os.path.exists(out) or open(out).read() != text:  # unchanged: keep the cached build
        with open(out, "w") as f:
            f.write(text)


def setup(app):
    app.connect("autodoc-process-signature", _process_signature)
    app.connect("builder-inited", _write_support_table)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
