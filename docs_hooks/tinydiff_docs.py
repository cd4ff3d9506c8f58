"""MkDocs hooks for the tinydiff site (``hooks:`` in mkdocs.yml).

* ``<!-- sampler-table -->`` in a page becomes the table of registered samplers, built from
  :mod:`tinydiff.samplers` at build time, so the docs cannot drift from the registry.
* Math is rendered at build time: pymdownx.arithmatex marks formulas, and this hook turns
  each one into MathML with ``latex2mathml``, which every current browser displays
  natively. The site needs no MathJax download and renders offline.
"""

from __future__ import annotations

import html
import inspect
import re
import sys
from pathlib import Path
from typing import Any

from latex2mathml.converter import convert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

_MARKER = "<!-- sampler-table -->"
_MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?P<open>\\\(|\\\[)(?P<tex>.*?)(?:\\\)|\\\])\s*</(?P=tag)>',
    re.S,
)


def sampler_table() -> str:
    """Markdown table of every registered sampler (name, method, NFE, options)."""
    from tinydiff import samplers

    rows = [
        "| name | method | NFE for S steps | stochastic | default spacing | options |",
        "|---|---|---|---|---|---|",
    ]
    for name in samplers.names():
        cls = samplers.get(name)
        doc = inspect.getdoc(cls) or ""
        first = " ".join(doc.split("\n\n")[0].split()).replace("|", "\\|")
        first = re.sub(r":math:`([^`]*)`", r"\\(\1\\)", first)
        first = first.replace("``", "`").rstrip(":")
        params = [
            p
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        options = ", ".join(f"`{p.name}={p.default!r}`" for p in params) or "—"
        inst = cls()
        nfe = inst.nfe(10)
        per = "S" if nfe == 10 else f"{nfe // 10}S" if nfe % 10 == 0 else f"nfe(10) = {nfe}"
        stochastic = "yes" if inst.is_stochastic else ("with options" if cls.stochastic else "no")
        rows.append(
            f"| `{name}` | {first} | {per} | {stochastic} | `{cls.default_spacing}` | {options} |"
        )
    return "\n".join(rows)


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
