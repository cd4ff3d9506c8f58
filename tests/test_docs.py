"""The documentation's code runs, and the package ships its typing marker and version.

Every fenced ``python`` block of ``docs/*.md`` and ``README.md`` is executed: the blocks of
one file in order, in one fresh namespace, with a temporary working directory. A block is
skipped when the line before its opening fence is ``<!-- skip-test -->`` (used for calls
that need the network, such as the Hub, or a launcher such as ``torchrun``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
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
    registries += [tinydiff.samplers, tinydiff.spacings]
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
