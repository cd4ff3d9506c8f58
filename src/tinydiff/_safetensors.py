"""Reading untrusted safetensors and JSON files with bounded cost.

What tinydiff adds around :func:`safetensors.safe_open` (which already validates the
header: its JSON, dtypes, shapes, byte offsets against the file size, the 100 MB cap):

* only regular files are opened (a FIFO would block forever, a device or a directory
  fails with an obscure ``OSError``);
* the header length is compared with a caller's cap *before* safetensors parses it, so a
  21 MB header of 300k empty tensors costs nothing when a model expects 40 tensors;
* the names, dtypes and shapes of the tensors are returned without reading their data, so
  they can be compared with what a model expects before anything is allocated;
* JSON documents (config.json, checkpoint metadata) are parsed with a size and nesting
  bound, refusing NaN / Infinity literals.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

__all__ = [
    "MAX_JSON_DEPTH",
    "SafetensorsFile",
    "SerializationError",
    "check_regular_file",
    "read_regular_file",
]

#: nesting deeper than this in a JSON document is refused (tinydiff writes at most ~8)
MAX_JSON_DEPTH = 64

#: safetensors dtype names -> torch dtypes (the ones torch can hold)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SerializationError(ValueError):
    """A saved model's files are malformed, inconsistent with the model, or refused (pickle)."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_regular_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """``path`` as a Path if it is a regular file (symlinks followed).

    Raises:
        FileNotFoundError: nothing there.
        SerializationError: a directory, FIFO, device or socket; a symlink loop.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise
    except OSError as err:  # a symlink loop (ELOOP), a name too long ...
        raise SerializationError(
            f"{what} {path} cannot be opened ({err.strerror or err}); pass the path of a file "
            "written by tinydiff"
        ) from None
    if not stat.S_ISREG(mode):
        raise SerializationError(
            f"{what} {path} is {_kind(mode)}, not a regular file; pass the path of a file "
            "written by tinydiff"
        )
    return path


def _open_regular(path: str | os.PathLike[str], what: str) -> tuple[Path, int]:
    """``(path, fd)``: ``path`` opened read-only, checked to be a regular file on the open
    descriptor itself (so a file swapped after the check is still refused)."""
    path = check_regular_file(path, what)
    # O_NONBLOCK: should the path have been swapped for a FIFO since the check, do not hang
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise
    except OSError as err:
        raise SerializationError(f"{what} {path} cannot be opened ({err})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SerializationError(f"{what} {path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return path, fd


def _pread(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes at ``offset`` (fewer at the end of the file)."""
    if hasattr(os, "pread"):
        out = b""
        while len(out) < n:
            chunk = os.pread(fd, n - len(out), offset + len(out))
            if not chunk:
                break
            out += chunk
        return out
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - Windows
    return os.read(fd, n)  # pragma: no cover


def read_regular_file(path: str | os.PathLike[str], max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a small regular file, read through one open descriptor.

    Raises:
        FileNotFoundError: nothing there.
        SerializationError: not a regular file, or larger than ``max_bytes``.
    """
    path, fd = _open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise SerializationError(
                f"{what} {path} is {size} bytes, more than the {max_bytes} allowed; the file is "
                "not the one expected"
            )
        data = _pread(fd, max_bytes + 1, 0)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise SerializationError(f"{what} {path} grew beyond {max_bytes} bytes while read")
    return data


def _fd_alias(fd: int, path: Path) -> str:
    """A name that opens the very file behind ``fd``, whatever happened to ``path`` since.

    safetensors opens its argument by name (a header mmap, then the tensor storage); through
    ``/proc/self/fd/N`` (Linux) or ``/dev/fd/N`` (macOS, BSD) every such open reaches the
    inode ``fd`` holds, so an ``os.replace`` of ``path`` meanwhile cannot mix two versions.
    Elsewhere (Windows) a file that is open cannot be replaced at all.
    """
    for base in ("/proc/self/fd", "/dev/fd"):
        alias = f"{base}/{fd}"
        if os.path.isdir(base) and os.path.exists(alias):
            return alias
    return str(path)  # pragma: no cover - Windows


class SafetensorsFile:
    """A safetensors file opened for validation first, reading second.

    ``entries`` maps each tensor name to ``(dtype name, shape)`` and ``metadata`` is the
    header's ``__metadata__`` (str -> str), both known before any tensor data is read;
    :meth:`get` reads one tensor.

    Args:
        path: the file.
        max_header_bytes: refuse a header longer than this before parsing it.
        what: how to call the file in messages.
        device: where :meth:`get` puts tensors.

    Raises:
        SerializationError: not a regular file, a header over the cap, or anything
            safetensors refuses (truncated file, bad JSON, offsets, dtypes ...).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_header_bytes: int,
        what: str = "file",
        device: str = "cpu",
    ) -> None:
        self.path, self._fd = _open_regular(path, what)
        try:
            self._open(max_header_bytes, what, device)
        except BaseException:
            os.close(self._fd)
            raise
        self.what = what

    def _open(self, max_header_bytes: int, what: str, device: str) -> None:
        head = _pread(self._fd, 8, 0)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is not None and n > max_header_bytes:
            raise SerializationError(
                f"{what} {self.path}: its safetensors header claims {n} bytes, more than the "
                f"{max_header_bytes} bytes that the tensors expected here need; the file is "
                "corrupt or is not the one expected"
            )
        try:
            self._handle = safe_open(_fd_alias(self._fd, self.path), framework="pt", device=device)
            self._file = self._handle.__enter__()
            self.metadata: dict[str, str] = self._file.metadata() or {}
            self.entries: dict[str, tuple[str, tuple[int, ...]]] = {}
            for key in self._file.keys():
                piece = self._file.get_slice(key)
                self.entries[key] = (piece.get_dtype(), tuple(piece.get_shape()))
        except SafetensorError as err:
            raise SerializationError(
                f"{what} {self.path} is not a valid safetensors file ({err}); it is truncated "
                "or corrupt: save it again"
            ) from None

    def dtype(self, key: str) -> torch.dtype | None:
        """The torch dtype of tensor ``key`` (None for a dtype torch cannot hold)."""
        return ST_DTYPES.get(self.entries[key][0])

    def get(self, key: str) -> Tensor:
        try:
            tensor: Tensor = self._file.get_tensor(key)
        except (SafetensorError, RuntimeError) as err:
            raise SerializationError(
                f"{self.what} {self.path}: cannot read tensor {key!r} ({err})"
            ) from None
        return tensor

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self._handle.__exit__(None, None, None)
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (NaN and Infinity are refused)")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:40]} overflows a float")
    return value


def _depth(doc: Any) -> int:
    """Nesting depth of a parsed JSON document, computed without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_JSON_DEPTH:
                return depth
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"the key {dup!r:.80} appears twice in one object")
    return doc


def _infinity(name: str) -> Any:
    if name == "NaN":
        return _refuse_constant(name)
    return float(name.replace("Infinity", "inf"))


def load_json(text: str | bytes, where: str, *, allow_infinity: bool = False) -> Any:
    """Parse JSON from an untrusted source; every failure is a SerializationError.

    Refuses nesting deeper than `MAX_JSON_DEPTH`, NaN / Infinity literals (Infinity
    and -Infinity are read with ``allow_infinity``: diffusers writes them in its scheduler
    configs), integers too long for Python to parse, and a key repeated in one object (where
    JSON parsers disagree on which value wins).
    """
    try:
        doc = json.loads(
            text,
            parse_constant=_infinity if allow_infinity else _refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except RecursionError:
        raise SerializationError(
            f"{where} is nested too deeply (more than {MAX_JSON_DEPTH} levels)"
        ) from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise SerializationError(f"{where} is not valid JSON: {err}") from None
    if _depth(doc) > MAX_JSON_DEPTH:
        raise SerializationError(
            f"{where} is nested too deeply (more than {MAX_JSON_DEPTH} levels)"
        )
    return doc


def _key_list(keys: list[str], limit: int = 12) -> str:
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_entries(
    expected: Mapping[str, Tensor],
    file: SafetensorsFile,
    keys: Mapping[str, str],
    *,
    what: str,
    strict: bool = True,
    exact_dtype: bool = True,
    hint: str = "",
) -> None:
    """Compare a file's tensors with the state a model expects, before reading any data.

    Args:
        expected: name -> tensor (any device, the meta device included) of the receiver.
        file: the opened file.
        keys: receiver name -> tensor name in the file, for the tensors of this section.
        what: the receiver, for the message ("model", "EMA").
        strict: missing or unexpected names are an error.
        exact_dtype: the dtypes must be equal; otherwise only of the same kind (a float
            tensor may load into a float tensor of another precision, never an int).
        hint: the advice that ends the message.

    Raises:
        SerializationError: one message listing every problem.
    """
    problems = []
    if strict:
        missing = sorted(set(expected) - set(keys))
        unexpected = sorted(set(keys) - set(expected))
        if missing:
            problems.append(f"missing keys: {_key_list(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_key_list(unexpected)}")
    for name in sorted(set(expected) & set(keys)):
        want = expected[name]
        st_dtype, shape = file.entries[keys[name]]
        got = ST_DTYPES.get(st_dtype)
        if tuple(want.shape) != shape:
            problems.append(f"{name}: shape {shape} in the file, {tuple(want.shape)} expected")
        elif got is None:
            problems.append(f"{name}: dtype {st_dtype} in the file, {want.dtype} expected")
        elif got != want.dtype and (
            exact_dtype
            or got.is_floating_point != want.dtype.is_floating_point
            or got == torch.bool
        ):
            problems.append(f"{name}: dtype {got} in the file, {want.dtype} expected")
    if problems:
        raise SerializationError(
            f"{file.what} {file.path} does not match the {what}: "
            + "; ".join(problems)
            + (f". {hint}" if hint else "")
        )


def check_count(file: SafetensorsFile, key: str, low: int) -> None:
    """A counter tensor (an EMA's ``n_averaged``, ``num_calls``): an integer scalar >= low."""
    dtype, shape = file.entries[key]
    value = file.get(key) if dtype in ("I64", "I32") and len(shape) <= 1 else None
    if value is None or value.numel() != 1 or int(value.reshape(())) < low:
        shown = "?" if value is None or value.numel() != 1 else int(value.reshape(()))
        raise SerializationError(
            f"{file.what} {file.path}: {key} must be an integer >= {low}, got {shown} "
            f"({dtype} {list(shape)}); the file is corrupt"
        )
