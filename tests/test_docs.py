"""The documentation's code runs, and the package ships its typing marker and version.

Every fenced ``python`` block of ``docs/*.md`` and ``README.md`` is executed: the blocks of
one file in order, in one fresh namespace, with a temporary working directory. A block is
skipped when the line before its opening fence is ``<!-- skip-test -->`` (used for calls
that need the network, such as the Hub, or a launcher such as ``torchrun``).
"""

from __future__ import annotations

import html
import importlib.metadata
import importlib.resources
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import tinydiff

ROOT = Path(__file__).resolve().parents[1]
SKIP_MARK = "<!-- skip-test -->"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def doc_files() -> list[Path]:
    files = sorted((ROOT / "docs").glob("*.md"))
    readme = ROOT / "README.md"
    if readme.exists():
        files.append(readme)
    return files


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(first line number, source, skipped) of each fenced python block, in order."""
    lines = text.splitlines()
    blocks: list[tuple[int, str, bool]] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, indent = m["fence"], m["indent"]
        lang = m["info"].strip().split(" ")[0].strip("{}.").lower() if m["info"].strip() else ""
        j = i + 1
        body: list[str] = []
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        if lang in ("python", "py"):
            prev = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
            blocks.append((i + 2, "\n".join(body) + "\n", prev == SKIP_MARK))
        i = j + 1
    return blocks


def test_python_blocks_parser() -> None:
    text = "x\n<!-- skip-test -->\n```python\na = 1\n```\n\n```py\nb = 2\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(4, "a = 1\n", True), (8, "b = 2\n", False)]


def _unregister_new(registries: list[Any], before: list[set[str]]) -> None:
    """Remove what a page registered, so that other tests see the built-in registries."""
    for registry, names in zip(registries, before, strict=True):
        for name in set(registry.names()) - names:
            registry.REGISTRY.unregister(name)


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_doc_code_runs(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    runnable = [(line, src) for line, src, skipped in blocks if not skipped]
    if not runnable:
        pytest.skip(f"{path.name} has no runnable python blocks")
    monkeypatch.chdir(tmp_path)
    registries = [tinydiff.schedules, tinydiff.targets, tinydiff.variances, tinydiff.losses]
    registries += [tinydiff.samplers, tinydiff.spacings, tinydiff.objectives]
    before = [set(r.names()) for r in registries]
    request.addfinalizer(lambda: _unregister_new(registries, before))
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    for line, src in runnable:
        code = compile(src, f"{path.relative_to(ROOT)}:{line}", "exec")
        try:
            exec(code, namespace)
        except Exception as err:
            raise AssertionError(
                f"the python block at {path.relative_to(ROOT)} line {line} failed: "
                f"{type(err).__name__}: {err}"
            ) from err


def test_skip_marks_are_sparing() -> None:
    """Skipping is for blocks that cannot run offline; most documented code must run."""
    blocks = [b for path in doc_files() for b in python_blocks(path.read_text(encoding="utf-8"))]
    skipped = sum(1 for *_, s in blocks if s)
    assert skipped <= max(3, len(blocks) // 4), f"{skipped} of {len(blocks)} blocks skipped"


def test_py_typed_is_shipped() -> None:
    assert importlib.resources.files("tinydiff").joinpath("py.typed").is_file()


def test_version_matches_distribution() -> None:
    try:
        installed = importlib.metadata.version("tinydiff")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the tinydiff distribution is not installed")
    assert tinydiff.__version__ == installed


# ----------------------------------------------------------------------------- the built site
#
# One strict mkdocs build per session (about 6 s on 2 cores) serves the tests below. They
# keep the API reference clean: reST that the build failed to translate, math that did not
# render, or a public name without an entry fails here.

RAW_REST = re.compile(
    r":(?:py:)?(?:class|meth|func|mod|attr|data|exc|obj|const|math|ref|term):"  # a role
    r"|::\s*</p>"  # a paragraph that announced a literal block
    r"|\.\. [a-z-]+::"  # a directive (.. math::, .. note::)
)
CODE_OR_PRE = re.compile(r"<(pre|code)\b.*?</\1>", re.S)


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built with ``mkdocs build --strict`` from this checkout's sources."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("latex2mathml")
    import os
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def html_pages(site: Path) -> list[Path]:
    skip = {"404.html"}
    return [
        p
        for p in sorted(site.rglob("*.html"))
        if p.name not in skip and not {"assets", "search"} & set(p.relative_to(site).parts)
    ]


def prose(page_html: str) -> str:
    """The page without its code spans and code blocks (which may show reST on purpose)."""
    return CODE_OR_PRE.sub("", page_html)


def test_built_pages_have_no_raw_rest(site: Path) -> None:
    found = []
    for page in html_pages(site):
        text = prose(page.read_text(encoding="utf-8"))
        for m in RAW_REST.finditer(text):
            context = re.sub(r"<[^>]+>", "", text[max(0, m.start() - 80) : m.end() + 40])
            found.append(f"{page.relative_to(site)}: {' '.join(context.split())!r}")
    assert not found, "raw reST in the built site (write Markdown, see plugins.md):\n" + (
        "\n".join(found[:30])
    )


def test_built_math_is_rendered(site: Path) -> None:
    """Every formula became MathML (a formula latex2mathml cannot parse fails the build)."""
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert api.count("<math") > 100, "the API reference's formulas were not rendered"
    assert 'display="block"' in api
    for page in html_pages(site):
        text = page.read_text(encoding="utf-8")
        assert 'class="arithmatex"' not in text, f"unrendered math on {page.relative_to(site)}"
        assert "$" not in re.sub(r"<(pre|code|script)\b.*?</\1>", "", prose(text), flags=re.S), (
            f"a stray $ (math that was not recognised) on {page.relative_to(site)}"
        )


def test_api_cross_references_are_links(site: Path) -> None:
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    # a reST role of a docstring (tinydiff/model.py: :class:`tinydiff.process.GaussianProcess`)
    assert re.search(
        r'<a class="autorefs autorefs-internal"[^>]*href="#tinydiff\.process\.'
        r'GaussianProcess"[^>]*><code>',
        api,
    )
    assert len(re.findall(r'class="autorefs autorefs-internal"', api)) > 200


def inventory(site: Path) -> set[str]:
    """The identifiers of the API reference (Sphinx inventory written by mkdocstrings)."""
    import zlib

    data = (site / "objects.inv").read_bytes()
    body = zlib.decompress(data.split(b"\n", 4)[4]).decode()
    return {line.split(" ", 1)[0] for line in body.splitlines() if line.strip()}


def public_modules() -> list[str]:
    import pkgutil

    names = ["tinydiff"]
    for info in pkgutil.walk_packages(tinydiff.__path__, "tinydiff."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def test_every_public_name_is_in_the_api_reference(site: Path) -> None:
    import importlib

    documented = inventory(site)
    missing = []
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            if name.startswith("__"):
                continue  # __version__
            obj = getattr(module, name)
            where = {f"{module_name}.{name}"}
            if inspect.ismodule(obj):
                where.add(obj.__name__)
            elif hasattr(obj, "__qualname__") and hasattr(obj, "__module__"):
                where.add(f"{obj.__module__}.{obj.__qualname__}")
            if not where & documented:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"public names without an API entry (add them to docs/api.md): {missing}"


def test_diffusers_interop_is_documented(site: Path) -> None:
    documented = inventory(site)
    for name in (
        "tinydiff.DiffusionModel.from_diffusers",
        "tinydiff.DiffusionModel.to_diffusers",
        "tinydiff.diffusers_compat.DiffusersUNet",
    ):
        assert name in documented, name


def test_sampler_tables_fit_the_column(site: Path) -> None:
    """At most five columns, and no cell holds an unbreakable run long enough to force the
    browser to wrap a neighbouring column character by character."""
    page = (site / "samplers" / "index.html").read_text(encoding="utf-8")
    tables = re.findall(r"<table>.*?</table>", page, re.S)
    assert tables
    registered = tinydiff.samplers.names()
    generated = [t for t in tables if all(f"<code>{n}</code>" in t for n in registered)]
    assert len(generated) == 2, "expected the method table and the options table"
    for table in generated:
        assert len(re.findall(r"<th[ >]", table)) <= 5, "too many columns for the text column"
        for cell in re.findall(r"<td[^>]*>(.*?)</td>", table, re.S):
            text = re.sub(r"<[^>]+>", "", re.sub(r"<math\b.*?</math>", " x ", cell, flags=re.S))
            longest = max((len(w) for w in html.unescape(text).split()), default=0)
            assert longest <= 32, f"a cell with a {longest}-character word: {text!r}"


# ----------------------------------------------------------------------------- reST -> Markdown


@pytest.fixture(scope="module")
def rest() -> Any:
    pytest.importorskip("griffe")
    import sys

    sys.path.insert(0, str(ROOT / "docs_hooks"))
    try:
        import rest_markdown
    finally:
        sys.path.remove(str(ROOT / "docs_hooks"))
    return rest_markdown


def test_rest_roles_become_links_or_code(rest: Any) -> None:
    known = {"GaussianProcess": "tinydiff.process.GaussianProcess", "tinydiff.nn": "tinydiff.nn"}
    text = (
        ":class:`GaussianProcess`, :meth:`~tinydiff.ema.EMA.update`, :mod:`tinydiff.nn`, "
        ":func:`torch.compile`, :class:`the process <GaussianProcess>`, :math:`\\alpha_t^2`"
    )
    out = rest.rest_to_markdown(text, known.get)
    assert out == (
        "[`GaussianProcess`][tinydiff.process.GaussianProcess], `update`, "
        "[`tinydiff.nn`][tinydiff.nn], `torch.compile`, "
        "[`the process`][tinydiff.process.GaussianProcess], $\\alpha_t^2$"
    )


def test_rest_blocks_become_fences_and_display_math(rest: Any) -> None:
    text = (
        "Intro.\n\n.. math::\n    a = b\n    + c\n\nExample::\n\n    x = f(1)\n    y = 2\n\n"
        "Shell ::\n\n    tinydiff demo --steps 10\n\nNot a literal:: in the middle.\n\n::\n\n"
        "    f_k = p^(-k/h) for k < h\n\nEnd."
    )
    assert rest.convert_blocks(text) == (
        "Intro.\n\n$$\na = b\n+ c\n$$\n\nExample:\n\n```python\nx = f(1)\ny = 2\n```\n\n"
        "Shell\n\n```bash\ntinydiff demo --steps 10\n```\n\nNot a literal:: in the middle.\n\n"
        "```text\nf_k = p^(-k/h) for k < h\n```\n\nEnd."
    )


def test_rest_grouped_args_are_split(rest: Any) -> None:
    text = "Args:\n    a, b: shared text\n        more.\n    c: own.\n\nReturns:\n    x, y: kept."
    assert rest.split_grouped_args(text) == (
        "Args:\n    a: shared text\n        more.\n    b: shared text\n        more.\n"
        "    c: own.\n\nReturns:\n    x, y: kept."
    )


def test_rest_doc_comments(rest: Any) -> None:
    lines = ["#: first", "#: second", "X = 1", "Y = 2  #: inline", "Z = 3"]
    assert rest.doc_comment(lines, 3) == "first\nsecond"
    assert rest.doc_comment(lines, 4) == "inline"
    assert rest.doc_comment(lines, 5) is None


#: reST roles and directives in src when Markdown became the docstring convention
#: (docs/plugins.md#docstrings). Lower it when converting old docstrings; never raise it.
REST_IN_SRC_CEILING = 455
REST_IN_SRC = re.compile(
    r":(?:py:)?(?:class|meth|func|mod|attr|data|exc|obj|const|math):`|^\s*\.\. math::", re.M
)


def test_new_docstrings_use_markdown() -> None:
    counts = {
        str(p.relative_to(ROOT)): len(REST_IN_SRC.findall(p.read_text(encoding="utf-8")))
        for p in sorted((ROOT / "src").rglob("*.py"))
    }
    total = sum(counts.values())
    worst = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    assert total <= REST_IN_SRC_CEILING, (
        f"src holds {total} reST roles/directives, more than the {REST_IN_SRC_CEILING} left from "
        f"before the Markdown convention: write new docstrings in Markdown (`name`, "
        f"[`Name`][tinydiff.module.Name], $math$; see docs/plugins.md#docstrings). Most: {worst}"
    )


def test_install_steps_agree_and_cpu_note_comes_first() -> None:
    """README and the docs home page give the same install command, and the CPU-only hint
    comes before it (the command alone downloads PyTorch with its CUDA libraries)."""
    commands = {}
    for path in (ROOT / "README.md", ROOT / "docs" / "index.md"):
        text = path.read_text(encoding="utf-8")
        install = re.search(r"^```bash\n(?P<cmd>[^\n]*pip install -e [^\n]*)\n```", text, re.M)
        assert install, f"{path.name}: no install command"
        commands[path.name] = install["cmd"]
        cpu = text.find("download.pytorch.org/whl/cpu")
        assert 0 <= cpu < install.start(), f"{path.name}: the CPU-wheel note must come first"
    assert len(set(commands.values())) == 1, commands
