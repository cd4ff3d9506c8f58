"""MkDocs hooks for the tinydiff site (``hooks:`` in mkdocs.yml).

* ``<!-- sampler-table -->`` in a page becomes the tables of registered samplers (method,
  NFE, spacing; then each sampler's options), built from `tinydiff.samplers` at build time,
  so the docs cannot drift from the registry. Five columns at most, so that the tables fit
  the text column.
* Math is rendered at build time: pymdownx.arithmatex marks formulas, and this hook turns
  each one into MathML with ``latex2mathml``, which every current browser displays
  natively. The site needs no MathJax download and renders offline.

The docstrings' reST (roles, ``:math:``, literal blocks) is translated by the Griffe
extension of ``rest_markdown.py``, which the sampler table reuses.
"""

from __future__ import annotations

import html
import importlib
import inspect
import re
import sys
import types
from pathlib import Path
from typing import Any

from latex2mathml.converter import convert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rest_markdown import Resolver, rest_to_markdown

_MARKER = "<!-- sampler-table -->"
_MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?P<open>\\\(|\\\[)(?P<tex>.*?)(?:\\\)|\\\])\s*</(?P=tag)>',
    re.S,
)
# the end of the first sentence: a full stop or colon before a capital or the end (not the
# full stop of "et al. 2020" or "Alg. 2")
_SENTENCE_END = re.compile(r"(?<=[.:])\s+(?=[A-Z])|(?<=[.:])$")


def _public(path: str) -> bool:
    return path.startswith("tinydiff.") and not any(p.startswith("_") for p in path.split("."))


def python_resolver(module: types.ModuleType) -> Resolver:
    """Resolve a reST role's target from ``module``'s namespace, as Python would, to the
    identifier of its API entry (None for names outside the public API)."""

    def resolve(name: str) -> str | None:
        head, _, rest = name.partition(".")
        obj = vars(module).get(head)
        if obj is None:
            try:
                obj = importlib.import_module(head)
            except ImportError:
                return None
        base = obj.__name__ if inspect.ismodule(obj) else None
        if base is None and hasattr(obj, "__qualname__"):
            base = f"{obj.__module__}.{obj.__qualname__}"
        if base is None:
            return None
        path = base + ("." + rest if rest else "")
        return path if _public(path) else None

    return resolve


def _summary(cls: type) -> str:
    """The first sentence of a class's docstring as one line of table-safe Markdown."""
    doc = inspect.getdoc(cls) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    first = _SENTENCE_END.split(first, maxsplit=1)[0].rstrip(":").rstrip()
    if not first.endswith("."):
        first += "."
    module = sys.modules[cls.__module__]
    return rest_to_markdown(first, python_resolver(module), short=True).replace("|", "\\|")


def sampler_table() -> str:
    """Markdown tables of every registered sampler: what it is, then its options."""
    from tinydiff import samplers

    rows = [
        "| sampler | method | NFE for S steps | stochastic | default spacing |",
        "|---|---|---|---|---|",
    ]
    options_rows = ["| sampler | options (keyword arguments and their defaults) |", "|---|---|"]
    for name in samplers.names():
        cls = samplers.get(name)
        path = f"{cls.__module__}.{cls.__qualname__}"
        label = f"[`{name}`][{path}]" if _public(path) else f"`{name}`"
        params = [
            p
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        inst = cls()
        nfe = inst.nfe(10)
        per = "S" if nfe == 10 else f"{nfe // 10}S" if nfe % 10 == 0 else f"nfe(10) = {nfe}"
        stochastic = "yes" if inst.is_stochastic else ("with options" if cls.stochastic else "no")
        rows.append(
            f"| {label} | {_summary(cls)} | {per} | {stochastic} | `{cls.default_spacing}` |"
        )
        options = ", ".join(f"`{p.name}={p.default!r}`" for p in params) or "none"
        options_rows.append(f"| `{name}` | {options} |")
    return "\n".join(rows) + "\n\n" + "\n".join(options_rows)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if _MARKER in markdown:
        markdown = markdown.replace(_MARKER, sampler_table())
    return markdown


def _to_mathml(match: re.Match[str]) -> str:
    tex = html.unescape(match.group("tex"))
    display = "block" if match.group("open") == "\\[" else "inline"
    return convert(tex.strip(), display=display)


def on_page_content(html_text: str, **kwargs: Any) -> str:
    return _MATH.sub(_to_mathml, html_text)
