"""Crash-safe writes: one file atomically, or a folder of files as one save.

**One file** (`atomic_write`, `atomic_write_safetensors`): the data goes to a
temporary file in the same directory, is flushed and fsync-ed, and is ``os.replace``-d onto the
target; the directory is fsync-ed after the rename. A crash leaves the old file or the new one,
never a torn one. Files get the permissions of an ordinary ``open(path, "w")`` under the
process umask (0644 under umask 022), like diffusers and safetensors write them.

**A folder** (`FolderWriter`): ``rename`` cannot replace a non-empty directory, so the
files of one save are tied together instead. Every save draws a *save id*; each safetensors
file carries it in its header metadata and each JSON document under the key
`SAVE_ID_KEY`. All files are first written to temporary files, then renamed onto their
names in a burst, and a manifest (`MANIFEST_NAME`) naming the save id and the files is
renamed into place last. A reader (`read_manifest` then `SaveManifest.check`)
compares the id found in each file's header with the manifest's, without hashing any weights.
After a crash at any point a load therefore sees exactly the old save, exactly the new one, or
raises `MixedSaveError`; never a mix.

Files are only ever deleted when tinydiff wrote them: its own temporary files (recognised by
name, and only once their writer is gone) and the files that an earlier manifest in the same
folder listed and the new save no longer has.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

from torch import Tensor

from tinydiff._safetensors import (
    SafetensorsFile,
    SerializationError,
    load_json,
    read_regular_file,
)

__all__ = [
    "MANIFEST_NAME",
    "SAVE_ID_KEY",
    "FolderWriter",
    "MixedSaveError",
    "SaveManifest",
    "atomic_write",
    "atomic_write_safetensors",
    "check_save_id",
    "folder_lock",
    "open_safetensors_member",
    "read_json_member",
    "read_manifest",
]

#: the key of the save id in safetensors header metadata and in JSON documents
SAVE_ID_KEY = "_tinydiff_save_id"
#: the manifest of a folder save, written last
MANIFEST_NAME = "tinydiff_manifest.json"
MANIFEST_FORMAT = "tinydiff-save"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 1 << 20
#: how a file's save id is found: header metadata, a JSON key, or not at all (README.md)
KINDS = ("safetensors", "json", "bytes")
#: a temporary file of another machine (shared file system) is left alone this long
_FOREIGN_TMP_AGE_S = 3600.0
_TMP_SUFFIX = ".tinydiff-tmp"
_SAVE_ID = re.compile(r"[0-9a-f]{32}")


class MixedSaveError(SerializationError):
    """The files of a saved folder belong to different saves: a save was interrupted (or
    the folder changed while it was read). Save the model again (or retry the read)."""


# -- temporary files ------------------------------------------------------------------------------
def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _tmp_name(name: str) -> str:
    return f".{name}.{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{_TMP_SUFFIX}"


def _tmp_pattern(name: str) -> re.Pattern[str]:
    # ours: .NAME.HOST-PID-RAND.tinydiff-tmp; tinydiff <= 0.2: .NAME.XXXXXXXX.tmp (mkstemp)
    return re.compile(
        rf"\.{re.escape(name)}\.(?:([0-9a-f]{{8}})-(\d+)-[0-9a-f]{{8}}{re.escape(_TMP_SUFFIX)}"
        r"|[a-z0-9_]{8}\.tmp)"
    )


def _process_alive(pid: int) -> bool:
    if sys.platform == "win32":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale_temporaries(directory: Path, name: str) -> list[Path]:
    """Delete the temporary files that an interrupted write of ``directory / name`` left.

    Only files named like tinydiff's temporaries of ``name`` are considered, and of those only
    the ones whose writer is gone: a process of this machine that no longer runs, or (for
    another machine's, or an older tinydiff's) one untouched for an hour. A concurrent writer's
    temporary file is never removed.

    Returns:
        the files deleted.
    """
    pattern = _tmp_pattern(name)
    removed: list[Path] = []
    try:
        candidates = [e for e in os.scandir(directory) if pattern.fullmatch(e.name)]
    except OSError:
        return removed
    host, me = _host_tag(), os.getpid()
    for entry in candidates:
        match = pattern.fullmatch(entry.name)
        assert match is not None
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if match.group(1) == host:
                pid = int(match.group(2))
                stale = pid != me and not _process_alive(pid)
            else:
                age = time.time() - entry.stat(follow_symlinks=False).st_mtime
                stale = age > _FOREIGN_TMP_AGE_S
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def _fsync_dir(directory: Path) -> None:
    if sys.platform == "win32":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _new_temporary(path: Path) -> Path:
    """Create an empty temporary file beside ``path`` with the umask's permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / _tmp_name(path.name)
        try:
            # mode 0o666: the kernel applies the umask, as for open(path, "w")
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temporary(path: Path, write: Callable[[Path], None]) -> Path:
    """A complete, fsync-ed temporary file beside ``path``; removed again on any error."""
    tmp = _new_temporary(path)
    try:
        write(tmp)
        _fsync_file(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _bytes_writer(data: bytes) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return write


def _safetensors_writer(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None
) -> Callable[[Path], None]:
    # serialised in memory and written through our own file: safetensors' save_file makes its
    # own temporary file with mode 0600 (and leaves it behind when killed)
    from safetensors.torch import save

    return _bytes_writer(save(dict(tensors), metadata=dict(metadata) if metadata else None))


def _atomic(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    path = Path(path)
    clean_stale_temporaries(path.parent, path.name)
    tmp = _write_temporary(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (module docstring); parent folders are created.

    Stale temporary files of earlier interrupted writes of the same path are removed first.
    """
    _atomic(path, _bytes_writer(data))


def atomic_write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file atomically.

    Args:
        path: the target file; parent folders are created.
        tensors: name -> contiguous CPU tensor, no two sharing storage (as safetensors needs).
        metadata: the header's ``__metadata__`` (str -> str).
    """
    _atomic(path, _safetensors_writer(tensors, metadata))


# -- folder saves ---------------------------------------------------------------------------------
def _check_name(name: str) -> str:
    """A relative POSIX path inside the folder (``"unet/config.json"``), else ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a file name must be a non-empty str, got {name!r}")
    p = PurePosixPath(name)
    if p.is_absolute() or "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(
            f"file name {name!r:.80} must be a relative path inside the folder (no '..', no "
            "leading '/', '/' as the separator)"
        )
    if p.name == MANIFEST_NAME or p.name.endswith(_TMP_SUFFIX):
        raise ValueError(f"file name {name!r:.80} is reserved by tinydiff")
    return name


@dataclass
class _Staged:
    kind: str
    tmp: Path


class FolderWriter:
    """Write the files of one save into a folder so that they replace the previous save as
    a unit (module docstring).

    Use as a context manager; the save is committed when the block ends without an error
    (nothing is replaced if it raises)::

        with FolderWriter(folder) as save:
            save.write_safetensors("model.safetensors", state)
            save.write_json("config.json", config)     # gets SAVE_ID_KEY
            save.write_bytes("README.md", card.encode())

    Args:
        folder: the target folder (created if missing).

    Attributes:
        folder: the folder.
        save_id: this save's id (32 hex digits).
        previous: the manifest of the save being replaced, or None.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(
                f"{self.folder} is a file; a folder save needs a directory (or a path that "
                "does not exist yet)"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.save_id = secrets.token_hex(16)
        try:
            self.previous = read_manifest(self.folder)
        except SerializationError:  # a corrupt manifest: it is replaced, its files are kept
            self.previous = None
        self._staged: dict[str, _Staged] = {}
        self._discard: set[str] = set()
        self._done = False
        self._cleaned: set[tuple[Path, str]] = set()

    # each write stages a complete temporary file; commit() renames them
    def _stage(self, name: str, kind: str, write: Callable[[Path], None]) -> None:
        if self._done:
            raise RuntimeError("this FolderWriter was already committed or aborted")
        name = _check_name(name)
        if name in self._staged:
            raise ValueError(f"{name!r} was already written in this save")
        target = self.folder / name
        if target.is_dir():
            raise IsADirectoryError(f"{target} is a directory; cannot write the file {name!r}")
        key = (target.parent, target.name)
        if key not in self._cleaned:
            clean_stale_temporaries(target.parent, target.name)
            self._cleaned.add(key)
        self._staged[name] = _Staged(kind, _write_temporary(target, write))

    def write_safetensors(
        self,
        name: str,
        tensors: Mapping[str, Tensor],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Stage a safetensors file; `SAVE_ID_KEY` is added to its metadata."""
        meta = {**(metadata or {}), SAVE_ID_KEY: self.save_id}
        self._stage(name, "safetensors", _safetensors_writer(tensors, meta))

    def write_json(self, name: str, doc: Mapping[str, Any], *, indent: int | None = 2) -> None:
        """Stage a JSON object; `SAVE_ID_KEY` is added to it (diffusers, like tinydiff,
        ignores keys that start with ``_`` when it reads a config)."""
        if not isinstance(doc, Mapping):
            raise TypeError(f"write_json needs a JSON object (a dict), got {type(doc).__name__}")
        text = json.dumps({**doc, SAVE_ID_KEY: self.save_id}, indent=indent) + "\n"
        self._stage(name, "json", _bytes_writer(text.encode()))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Stage a file that carries no save id (a README): it is not checked on load."""
        self._stage(name, "bytes", _bytes_writer(data))

    def copy_file(self, name: str, source: str | os.PathLike[str]) -> None:
        """Stage a copy of an existing file (e.g. one that diffusers wrote into a scratch
        folder): ``*.safetensors`` is re-streamed with the save id in its metadata (no
        tensor is loaded), ``*.json`` holding an object gets the key, anything else is copied
        unchecked."""
        source = Path(source)
        if name.endswith(".safetensors"):
            self._stage(name, "safetensors", lambda tmp: _restream(source, tmp, self.save_id))
            return
        data = read_regular_file(source, MAX_MANIFEST_BYTES * 64, what="file")
        if name.endswith(".json"):
            doc = load_json(data, f"{source}")
            if isinstance(doc, dict):
                self.write_json(name, doc)
                return
        self.write_bytes(name, data)

    def discard(self, name: str) -> None:
        """Delete ``name`` after the commit unless this save writes it: for a file that an
        earlier tinydiff wrote (before manifests existed) and the new save replaces by
        nothing (e.g. the EMA weights of a model saved again without EMA)."""
        self._discard.add(_check_name(name))

    def commit(self) -> None:
        """Rename the staged files into place, then the manifest; then delete the files of
        the previous save that this one no longer has. Commits of concurrent saves into one
        folder (processes of one machine) run one after the other."""
        if self._done:
            raise RuntimeError("this FolderWriter was already committed or aborted")
        self._done = True
        with folder_lock(self.folder):
            with contextlib.suppress(SerializationError):  # a save committed meanwhile
                self.previous = read_manifest(self.folder) or self.previous
            self._commit()

    def _commit(self) -> None:
        try:
            for name, staged in self._staged.items():
                os.replace(staged.tmp, self.folder / name)
        except BaseException:
            self._unlink_temporaries()
            raise
        for directory in {(self.folder / n).parent for n in self._staged}:
            _fsync_dir(directory)
        old = (
            set()
            if self.previous is None
            else set(self.previous.files) | set(self.previous.obsolete)
        )
        obsolete = sorted((old | self._discard) - set(self._staged))
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "save_id": self.save_id,
            "files": {name: s.kind for name, s in self._staged.items()},
            "obsolete": obsolete,
        }
        atomic_write(self.folder / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
        for name in obsolete:  # listed by an earlier tinydiff save (or discard()): ours
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                os.unlink(self.folder / name)

    def abort(self) -> None:
        """Drop the staged files; the folder keeps the previous save."""
        self._done = True
        self._unlink_temporaries()

    def _unlink_temporaries(self) -> None:
        for staged in self._staged.values():
            with contextlib.suppress(OSError):
                os.unlink(staged.tmp)

    def __enter__(self) -> FolderWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], *, shared: bool = False) -> Iterator[None]:
    """A ``flock`` on the folder itself (no lock file): exclusive for a commit, so that two
    processes' commits never interleave (one could otherwise delete, as obsolete, a file the
    other's manifest lists); shared for a reader, so that no commit runs while it reads.
    Where flock is missing or refused (Windows, some network file systems) nothing is
    locked, and readers rely on the save ids alone."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _restream(source: Path, tmp: Path, save_id: str) -> None:
    """Copy a safetensors file with ``SAVE_ID_KEY`` added to its header metadata, streaming
    the data section through one open file (no tensor is materialised)."""
    with open(source, "rb") as src:
        head = src.read(8)
        if len(head) != 8:
            raise SerializationError(f"{source} is not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(head, "little")
        if n > 100 * 1024 * 1024:
            raise SerializationError(f"{source}: a safetensors header of {n} bytes is refused")
        header = load_json(src.read(n), f"the safetensors header of {source}")
        if not isinstance(header, dict):
            raise SerializationError(f"{source}: the safetensors header is not a JSON object")
        meta = header.get("__metadata__") or {}
        header["__metadata__"] = {**meta, SAVE_ID_KEY: save_id}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        with open(tmp, "wb") as dst:
            dst.write(len(raw).to_bytes(8, "little"))
            dst.write(raw)
            while chunk := src.read(1 << 24):
                dst.write(chunk)


# -- reading --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SaveManifest:
    """The manifest of a folder save.

    Attributes:
        folder: the folder.
        save_id: the id every checked file of the save carries.
        files: file name (relative, ``/``-separated) -> kind (``"safetensors"``, ``"json"``
            or ``"bytes"``, the last unchecked).
        obsolete: files of earlier saves that this one dropped (deleted after the commit).
    """

    folder: Path
    save_id: str
    files: dict[str, str] = field(default_factory=dict)
    obsolete: tuple[str, ...] = ()

    def __contains__(self, name: object) -> bool:
        return name in self.files

    def check(self, name: str, found: str | None) -> None:
        """Check the save id ``found`` in file ``name`` (from its safetensors metadata:
        ``metadata.get(SAVE_ID_KEY)``, or its JSON document: ``doc.get(SAVE_ID_KEY)``).

        Raises:
            MixedSaveError: the file is not part of this save, or carries another id.
        """
        check_save_id(self, self.folder, name, found)


def check_save_id(
    manifest: SaveManifest | None, folder: str | os.PathLike[str], name: str, found: Any
) -> None:
    """The check of `SaveManifest.check`, also for a folder without a manifest
    (``manifest=None``): a file there must carry no save id (a folder written before
    manifests existed), since a save id without a manifest means an interrupted first save.

    Raises:
        MixedSaveError: with what was found and what to do.
    """
    where = f"{Path(folder) / name}"
    if manifest is None:
        if found is not None:
            raise MixedSaveError(
                f"{where} belongs to a save that did not finish (it carries a save id but "
                f"{Path(folder) / MANIFEST_NAME} is missing): the folder mixes files of two "
                "saves. Save the model into it again."
            )
        return
    if name not in manifest.files:
        raise MixedSaveError(
            f"{where} is not part of the save that {Path(folder) / MANIFEST_NAME} describes "
            f"(it lists: {', '.join(sorted(manifest.files))}); save the model again"
        )
    if manifest.files[name] == "bytes":
        return
    if found != manifest.save_id:
        got = "no save id" if found is None else f"save id {str(found)[:40]}"
        raise MixedSaveError(
            f"{where} has {got}, but the folder's manifest names save {manifest.save_id}: "
            "the folder mixes files of two saves (a save was interrupted, or the folder was "
            "written while it was read). Save the model again, or retry the load."
        )


def read_manifest(folder: str | os.PathLike[str]) -> SaveManifest | None:
    """The manifest of the save in ``folder``, or None when it has none (a folder saved
    before manifests existed, or not by tinydiff).

    Raises:
        SerializationError: a manifest that is not a regular file or is malformed.
    """
    path = Path(folder) / MANIFEST_NAME
    if not os.path.lexists(path):
        return None
    raw = read_regular_file(path, MAX_MANIFEST_BYTES, what="save manifest")
    doc = load_json(raw, f"save manifest {path}")
    where = f"save manifest {path}"
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise SerializationError(f"{where} is not a tinydiff save manifest; save the model again")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SerializationError(f"{where}: version must be a positive int, got {version!r:.40}")
    if version > MANIFEST_VERSION:
        raise SerializationError(
            f"{where} has version {version}, newer than this tinydiff's {MANIFEST_VERSION}: "
            "upgrade tinydiff (pip install -U tinydiff) to load it"
        )
    save_id, files, obsolete = doc.get("save_id"), doc.get("files"), doc.get("obsolete", [])
    if not isinstance(save_id, str) or not _SAVE_ID.fullmatch(save_id):
        raise SerializationError(f"{where}: save_id must be 32 hex digits, got {save_id!r:.40}")
    if not isinstance(files, dict) or not isinstance(obsolete, list):
        raise SerializationError(f"{where}: files must be an object and obsolete a list")
    try:
        for name, kind in files.items():
            _check_name(name)
            if kind not in KINDS:
                raise ValueError(
                    f"file {name!r:.80} has kind {kind!r:.40}, expected one of {KINDS}"
                )
        for name in obsolete:
            _check_name(name)
    except ValueError as err:
        raise SerializationError(f"{where}: {err}") from None
    return SaveManifest(Path(folder), save_id, dict(files), tuple(obsolete))


def read_json_member(
    folder: str | os.PathLike[str],
    name: str,
    manifest: SaveManifest | None,
    *,
    max_bytes: int = MAX_MANIFEST_BYTES,
    what: str | None = None,
) -> Any:
    """Read the JSON file ``name`` of a saved folder (one open) and check its save id
    against ``manifest`` (`read_manifest`; None for a folder without one).

    Returns:
        the document, without `SAVE_ID_KEY`.

    Raises:
        FileNotFoundError: no such file.
        SerializationError: not a regular file, too large, not JSON.
        MixedSaveError: the file belongs to another save than the manifest's.
    """
    path = Path(folder) / name
    doc = load_json(read_regular_file(path, max_bytes, what=what or name), f"{what or name} {path}")
    found = doc.pop(SAVE_ID_KEY, None) if isinstance(doc, dict) else None
    check_save_id(manifest, folder, name, found)
    return doc


def open_safetensors_member(
    folder: str | os.PathLike[str],
    name: str,
    manifest: SaveManifest | None,
    *,
    max_header_bytes: int,
    what: str | None = None,
    device: str = "cpu",
) -> SafetensorsFile:
    """Open the safetensors file ``name`` of a saved folder and check the save id in its
    header against ``manifest``; the tensors read from the returned file are then the ones
    of that save, whatever happens to the folder meanwhile (one open per read).

    Raises:
        FileNotFoundError: no such file.
        SerializationError: see `tinydiff._safetensors.SafetensorsFile`.
        MixedSaveError: the file belongs to another save than the manifest's.
    """
    file = SafetensorsFile(
        Path(folder) / name, max_header_bytes=max_header_bytes, what=what or name, device=device
    )
    try:
        check_save_id(manifest, folder, name, file.metadata.get(SAVE_ID_KEY))
    except BaseException:
        file.close()
        raise
    return file


def iter_temporaries(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """tinydiff's temporary files anywhere under ``folder`` (for tests and tools)."""
    for root, _, names in os.walk(folder):
        for name in names:
            if name.startswith(".") and name.endswith(_TMP_SUFFIX):
                yield Path(root) / name
