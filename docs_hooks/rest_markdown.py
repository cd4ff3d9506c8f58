"""Render the reST markup of older docstrings as the Markdown the site is built with.

The docstring convention of tinydiff is Markdown (Google-style sections, backticked names,
mkdocstrings cross-references ``[GaussianProcess][tinydiff.process.GaussianProcess]``,
``$...$`` and ``$$`` math). Docstrings written before that convention use reST; this module
translates them when the site is built, so the source does not have to change at once:

* ``:class:`X```, ``:meth:``, ``:func:``, ``:mod:``, ``:attr:``, ``:data:``, ``:exc:``,
  ``:obj:``, ``:const:`` become cross-reference links when the target is a documented
  object (``~`` shows only the last component, ``title <target>`` a given title) and
  code spans otherwise (``torch.compile``, private names);
* ``:math:`...``` becomes ``$...$`` and a ``.. math::`` block a ``$$`` block, which the
  site's arithmatex + MathML hook renders like the concept pages;
* a paragraph ending in ``::`` and the indented literal block after it become a fenced code
  block (``python`` when the block parses as Python, ``bash`` for shell commands).

Two users: :class:`RestToMarkdown`, a Griffe extension that rewrites every docstring of a
loaded package before mkdocstrings parses it (``extensions:`` in mkdocs.yml), so Google
sections keep their structure; and the sampler table of ``tinydiff_docs.py``.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Callable
from typing import Any

import griffe

Resolver = Callable[[str], "str | None"]

ROLES = ("class", "meth", "func", "mod", "attr", "data", "exc", "obj", "const")
_ROLE = re.compile(r":(?:py:)?(?P<role>" + "|".join(ROLES) + r"):`(?P<text>[^`]+)`")
_MATH_ROLE = re.compile(r":math:`(?P<tex>[^`]+)`")
_TITLED = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$")
_SHELL_WORDS = ("tinydiff", "pip", "python", "torchrun", "accelerate", "uv", "git", "$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block_end(lines: list[str], start: int, base: int) -> int:
    """Index after the last line of the block that starts at ``start``: lines indented
    more than ``base`` and blank lines, without the trailing blank ones."""
    end = start
    j = start
    while j < len(lines):
        if lines[j].strip():
            if _indent(lines[j]) <= base:
                break
            end = j + 1
        j += 1
    return end


def _language(code: str) -> str:
    first = code.lstrip().split(" ", 1)[0] if code.strip() else ""
    if first in _SHELL_WORDS:
        return "bash"
    try:
        ast.parse(code)
    except SyntaxError:
        return "text"
    return "python"


def _blank_around(out: list[str], block: list[str]) -> None:
    if out and out[-1].strip():
        out.append("")
    out.extend(block)
    out.append("")


def convert_blocks(text: str) -> str:
    """``.. math::`` directives to ``$$`` blocks and ``::`` literal blocks to fenced code."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        pad = " " * _indent(line)
        if stripped.startswith(".. math::"):
            first = stripped[len(".. math::") :].strip()
            j = i + 1
            while j < len(lines) and lines[j].strip().startswith(":") and not first:
                j += 1  # directive options (:label:, :nowrap:)
            end = _block_end(lines, j, _indent(line))
            body = textwrap.dedent("\n".join(lines[j:end])).strip("\n")
            tex = "\n".join(x for x in (first, body) if x)
            _blank_around(out, [pad + "$$", *(pad + x for x in tex.split("\n")), pad + "$$"])
            i = end
            while i < len(lines) and not lines[i].strip():
                i += 1
            continue
        if stripped.endswith("::") and not stripped.startswith(".."):
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j > i + 1 and j < len(lines) and _indent(lines[j]) > _indent(line):
                end = _block_end(lines, j, _indent(line))
                code = textwrap.dedent("\n".join(lines[j:end])).strip("\n")
                if stripped == "::":
                    lead = None
                elif stripped.endswith(" ::"):
                    lead = line.rstrip()[:-3].rstrip()
                else:
                    lead = line.rstrip()[:-1]
                if lead is not None:
                    out.append(lead)
                fence = [
                    pad + "```" + _language(code),
                    *(pad + x if x else x for x in code.split("\n")),
                ]
                _blank_around(out, [*fence, pad + "```"])
                i = end
                while i < len(lines) and not lines[i].strip():
                    i += 1
                continue
        out.append(line)
        i += 1
    return "\n".join(out).rstrip("\n") if not text.endswith("\n") else "\n".join(out)


def convert_inline(text: str, resolve: Resolver, *, short: bool = False) -> str:
    """Roles to links or code spans, ``:math:`` to ``$...$``; leaves code blocks alone.
    ``short`` shows every role's last component (as ``~`` does), for narrow table cells."""
    parts = re.split(r"(^[ \t]*```.*?^[ \t]*```[ \t]*$)", text, flags=re.M | re.S)
    for k in range(0, len(parts), 2):
        parts[k] = _MATH_ROLE.sub(lambda m: "$" + m["tex"].strip() + "$", parts[k])
        parts[k] = _ROLE.sub(lambda m: _role(m["text"], resolve, short), parts[k])
    return "".join(parts)


def _role(text: str, resolve: Resolver, short: bool = False) -> str:
    text = text.strip()
    title = None
    if m := _TITLED.match(text):
        title, text = m["title"], m["target"].strip()
    if text.startswith("!"):
        return f"`{title or text[1:]}`"
    short = short or text.startswith("~")
    target = text.lstrip("~").lstrip(".")
    if title is None:
        title = target.rsplit(".", 1)[-1] if short else target
    identifier = resolve(target)
    return f"[`{title}`][{identifier}]" if identifier else f"`{title}`"


_ARGS_TITLE = re.compile(
    r"^(?P<pad> *)(?:Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$"
)
_GROUPED = re.compile(r"^(?P<pad> +)(?P<names>\*{0,2}\w+(?:, *\*{0,2}\w+)+): (?P<desc>.*)$")


def split_grouped_args(text: str) -> str:
    """``a, b, c: description`` in an Args section becomes one entry per name (Google
    style documents one parameter per entry; mkdocstrings would see a parameter named
    ``a, b, c``)."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    section: int | None = None
    while i < len(lines):
        line = lines[i]
        if m := _ARGS_TITLE.match(line):
            section = len(m["pad"])
        elif section is not None and line.strip() and _indent(line) <= section:
            section = None
        m = _GROUPED.match(line) if section is not None else None
        if m is None:
            out.append(line)
            i += 1
            continue
        end = _block_end(lines, i + 1, len(m["pad"]))
        more = lines[i + 1 : end]
        for name in m["names"].split(","):
            out.append(f"{m['pad']}{name.strip()}: {m['desc']}")
            out.extend(more)
        i = end
    return "\n".join(out)


def rest_to_markdown(text: str, resolve: Resolver, *, short: bool = False) -> str:
    """The whole translation of one docstring (``short``: see `convert_inline`)."""
    return convert_inline(convert_blocks(split_grouped_args(text)), resolve, short=short)


# ----------------------------------------------------------------------------- Griffe


def _documented(obj: Any) -> bool:
    """Whether mkdocstrings renders ``obj``: a public path, and a docstring or a module."""
    if any(part.startswith("_") for part in obj.path.split(".")):
        return False
    try:
        target = obj.final_target if obj.is_alias else obj
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return bool(target.is_module or target.docstring)


def doc_comment(lines: list[str], lineno: int) -> str | None:
    """The Sphinx-style ``#:`` comment of the assignment at ``lineno`` (1-based): the
    ``#:`` lines right above it, or a ``#:`` comment on the line itself."""
    block = []
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith("#:"):
        block.append(lines[i].strip()[2:].strip())
        i -= 1
    if block:
        return "\n".join(reversed(block))
    _, sep, after = lines[lineno - 1].partition("#: ")
    return after.strip() if sep and after.strip() else None


def runtime_doc(module_path: str, name: str) -> str | None:
    """The docstring a public module attribute inherits at run time: the function's for a
    function or bound method (``get = REGISTRY.get``), the class's for an instance of a
    class of the same package (``REGISTRY = Registry(...)``); None otherwise."""
    import importlib
    import inspect

    try:
        value = getattr(importlib.import_module(module_path), name)
    except Exception:
        return None
    if inspect.isroutine(value):
        return inspect.getdoc(value)
    cls = type(value)
    if cls.__module__.split(".")[0] == module_path.split(".")[0] and cls.__doc__:
        first = inspect.cleandoc(cls.__doc__).split("\n\n")[0]
        return f"A `{cls.__qualname__}`: {first[:1].lower()}{first[1:]}"
    return None


def _set_doc(obj: griffe.Object, text: str, loader: griffe.GriffeLoader) -> None:
    # a borrowed function docstring documents parameters the attribute has no signature for
    options = {
        **loader.docstring_options,
        "warn_unknown_params": False,
        "warn_missing_types": False,
    }
    obj.docstring = griffe.Docstring(
        text,
        lineno=obj.lineno,
        endlineno=obj.lineno,
        parent=obj,
        parser=loader.docstring_parser,
        parser_options=options,  # type: ignore[arg-type]
    )


class RestToMarkdown(griffe.Extension):
    """Griffe extension: every docstring of a loaded package, reST to Markdown.

    Runs once the package is loaded (names resolve in each object's scope, as in Python)
    and before mkdocstrings parses the Google sections. Attributes without a docstring get
    their ``#:`` comment as one (the Sphinx convention older modules use), and every name of
    a module's ``__all__`` gets an entry: a bound method or a package class's instance its
    run-time docstring, a constant a line that names it public.
    """

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        collection = loader.modules_collection

        def resolver(obj: griffe.Object) -> Resolver:
            def resolve(name: str) -> str | None:
                head, _, rest = name.partition(".")
                try:
                    full = obj.resolve(head) + ("." + rest if rest else "")
                except griffe.NameResolutionError:
                    full = name
                try:
                    found = collection[full]
                except (KeyError, ValueError, griffe.AliasResolutionError):
                    return None
                return full if _documented(found) else None

            return resolve

        objects: list[griffe.Object] = []
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            objects.append(obj)
            stack.extend(m for m in obj.members.values() if not m.is_alias)  # type: ignore[misc]

        for obj in objects:
            if obj.is_attribute and not obj.docstring and obj.lineno:
                if comment := doc_comment(obj.module.lines, obj.lineno):
                    _set_doc(obj, comment, loader)
        for obj in objects:
            if not obj.is_module or not obj.exports:
                continue
            for name in map(str, obj.exports):
                member = obj.members.get(name)
                if member is None or member.is_alias or not member.is_attribute:
                    continue
                if not member.docstring:
                    text = runtime_doc(obj.path, name) or f"Public constant of `{obj.path}`."
                    _set_doc(member, text, loader)  # type: ignore[arg-type]

        for obj in objects:
            if obj.docstring is not None:
                obj.docstring.value = rest_to_markdown(obj.docstring.value, resolver(obj))

    on_package_loaded = on_package  # the same event in Griffe 1
