"""One generic name -> object registry, and lazy loading of third-party plugins.

Every pluggable kind of component in tinydiff (noise schedules, prediction targets, variance
types, losses, samplers, timestep spacings) has one :class:`Registry` instance living in its
own module, which re-exports ``register``, ``get`` and ``names``.

Third-party packages plug in through the entry-point group ``tinydiff.plugins``: each entry
point names a module whose import registers entries. Plugins are imported lazily, the first
time any registry is queried; one that fails to import produces a warning, never a crash.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.metadata
import inspect
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar, overload

__all__ = ["ENTRY_POINT_GROUP", "Registry", "check_kwargs", "load_plugins", "normalize_name"]

ENTRY_POINT_GROUP = "tinydiff.plugins"

T = TypeVar("T")

_plugins_lock = threading.RLock()
_plugins_loaded = False


def normalize_name(name: str) -> str:
    """Normalise a registry name: strip, lower-case, and map ``-``, ``.`` and spaces to ``_``.

    The same function is used at registration and at lookup, so ``"Pred-X-0"`` finds
    ``"pred_x_0"``.
    """
    if not isinstance(name, str):
        raise TypeError(f"registry names must be strings, got {type(name).__name__}: {name!r}")
    out = name.strip().lower()
    for ch in "-. ":
        out = out.replace(ch, "_")
    if not out:
        raise ValueError("registry names must be non-empty")
    return out


def load_plugins(*, reload: bool = False) -> None:
    """Import every module advertised under the ``tinydiff.plugins`` entry-point group.

    Called automatically the first time a registry is queried. A plugin that fails to import
    emits a :class:`RuntimeWarning` naming it and the error; the others still load.

    Args:
        reload: import the entry points again even if plugins were already loaded (useful
            after installing a plugin into a running interpreter).
    """
    global _plugins_loaded
    with _plugins_lock:
        if _plugins_loaded and not reload:
            return
        _plugins_loaded = True  # set first: a plugin that queries a registry must not recurse
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()
            except Exception as err:  # a broken plugin must never take tinydiff down
                warnings.warn(
                    f"tinydiff plugin {ep.name!r} ({ep.value}) failed to load and was skipped: "
                    f"{type(err).__name__}: {err}",
                    RuntimeWarning,
                    stacklevel=2,
                )


def check_kwargs(kind: str, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Raise ``TypeError`` if ``fn(*args, **kwargs)`` would not bind (unknown or missing option).

    Used to check the component options in a config when it is built, rather than deep inside
    training. The message names the component and its accepted options.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: nothing to check
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as err:
        params = [
            p.name
            for p in sig.parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ][len(args) :]
        raise TypeError(
            f"invalid options {kwargs} for {kind} {name!r}: {err}. "
            f"Accepted options: {', '.join(params) or 'none'}"
        ) from err


def instantiate(
    cls: type, options: Mapping[str, Any], what: str, *, also: tuple[str, ...] = ()
) -> Any:
    """``cls(**options)``, with an unknown option turned into a ``TypeError`` that names
    ``what`` (e.g. ``"sampler_kwargs ... for sampler DDIM"``) and lists the accepted options
    (``cls``'s, and ``also``: options the caller handles itself)."""
    try:
        return cls(**dict(options))
    except TypeError as err:
        accepted = [
            p.name
            for p in inspect.signature(cls.__init__).parameters.values()  # type: ignore[misc]
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        accepted += also
        raise TypeError(
            f"invalid {what}: {err}. Accepted options: {', '.join(accepted) or 'none'}"
        ) from err


def class_check(
    contract: str, *, methods: tuple[str, ...] = (), base: type | None = None
) -> Callable[[Any], None]:
    """A registry's check: the object must be a class (a subclass of ``base``, with callable
    ``methods``), else a ``TypeError`` stating the ``contract``."""

    def check(obj: Any) -> None:
        ok = isinstance(obj, type) and (base is None or issubclass(obj, base))
        if not ok or not all(callable(getattr(obj, m, None)) for m in methods):
            raise TypeError(f"{contract}; got {obj!r}")

    return check


class Registry(Generic[T]):
    """A typed mapping from normalised names to components of one kind.

    Args:
        kind: human-readable name of the kind, used in error messages ("noise schedule").
        check: optional validator called on every registered object; it raises ``TypeError``
            when the object does not follow the kind's contract.
    """

    def __init__(self, kind: str, check: Callable[[Any], None] | None = None) -> None:
        self.kind = kind
        self._check = check
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._adapters: list[Callable[[Any], Any]] = []

    def add_adapter(self, adapter: Callable[[Any], Any]) -> None:
        """Install ``adapter``, applied to every entry (those registered already and those to
        come) after its contract check: it returns the object to store, e.g. a wrapper
        around a component written for an older contract (`tinydiff.compat`). The object a
        ``register`` call returns to its caller is never the wrapper. Installing the same
        adapter twice does nothing."""
        if adapter in self._adapters:
            return
        self._adapters.append(adapter)
        self._entries = {k: adapter(v) for k, v in self._entries.items()}

    # -- registration ----------------------------------------------------------------------
    @overload
    def register(
        self,
        name: str | None = None,
        obj: None = None,
        *,
        aliases: Iterable[str] = (),
        override: bool = False,
    ) -> Callable[[T], T]: ...

    @overload
    def register(
        self, name: str | None, obj: T, *, aliases: Iterable[str] = (), override: bool = False
    ) -> T: ...

    def register(
        self,
        name: Any = None,
        obj: Any = None,
        *,
        aliases: Iterable[str] = (),
        override: bool = False,
    ) -> Any:
        """Register an entry, as a decorator or as a plain call.

        Forms::

            @registry.register               # name taken from obj.__name__
            @registry.register("my_name", aliases=("alt",))
            registry.register("my_name", obj)  # plain call, returns obj

        Args:
            name: the entry's name (normalised with :func:`normalize_name`); defaults to the
                object's ``__name__``.
            obj: the object to register now; omit to get a decorator.
            aliases: further names that resolve to the same entry.
            override: replace an existing entry of the same name instead of raising.

        Raises:
            ValueError: the name (or an alias) is already taken and ``override`` is False.
            TypeError: the object does not follow the kind's contract.
        """
        if callable(name) and not isinstance(name, str) and obj is None:
            return self._add(None, name, tuple(aliases), override)

        def decorator(target: T) -> T:
            return self._add(name, target, tuple(aliases), override)

        return decorator if obj is None else decorator(obj)

    def _add(self, name: str | None, obj: T, aliases: tuple[str, ...], override: bool) -> T:
        if name is None:
            name = getattr(obj, "__name__", None)
            if name is None:
                raise TypeError(f"cannot infer a {self.kind} name from {obj!r}; pass name=")
        if self._check is not None:
            self._check(obj)
        key = normalize_name(name)
        alias_keys = [normalize_name(a) for a in aliases]
        if not override:
            for k in [key, *alias_keys]:
                if k in self._entries or k in self._aliases:
                    raise ValueError(
                        f"a {self.kind} named {k!r} is already registered; pass override=True "
                        "to replace it"
                    )
        self._aliases = {a: t for a, t in self._aliases.items() if a != key}
        stored = obj
        for adapter in self._adapters:
            stored = adapter(stored)
        self._entries[key] = stored
        for a in alias_keys:
            self._entries.pop(a, None)
            self._aliases[a] = key
        return obj

    def unregister(self, name: str) -> None:
        """Remove an entry and its aliases (mainly for tests)."""
        key = self.canonical(name)
        del self._entries[key]
        self._aliases = {a: t for a, t in self._aliases.items() if t != key}

    # -- lookup ------------------------------------------------------------------------------
    def _resolve(self, name: str) -> str | None:
        key = normalize_name(name)
        key = self._aliases.get(key, key)
        return key if key in self._entries else None

    def canonical(self, name: str) -> str:
        """Return the canonical (normalised, de-aliased) name, or raise ``ValueError``."""
        key = self._resolve(name)
        if key is None:
            load_plugins()
            key = self._resolve(name)
        if key is None:
            raise ValueError(self.unknown_message(name))
        return key

    def get(self, name: str) -> T:
        """Return the entry registered under ``name`` (or one of its aliases).

        Raises:
            ValueError: no such entry; the message lists close matches and every name.
        """
        return self._entries[self.canonical(name)]

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted canonical names, optionally filtered by an ``fnmatch`` pattern."""
        load_plugins()
        out = sorted(self._entries)
        if pattern is not None:
            pat = pattern.lower()
            out = [n for n in out if fnmatch.fnmatchcase(n, pat)]
        return out

    def name_of(self, obj: object) -> str | None:
        """The canonical name under which ``obj`` is registered, or None."""
        return next((k for k, v in self._entries.items() if v is obj), None)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.canonical(name)
        except ValueError:
            return False
        return True

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def unknown_message(self, name: object) -> str:
        """The error text for an unknown name: kind, bad value, close matches, all names."""
        available = self.names()
        candidates = available + sorted(self._aliases)
        close = difflib.get_close_matches(
            normalize_name(name) if isinstance(name, str) and name.strip() else str(name),
            candidates,
            n=3,
            cutoff=0.5,
        )
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return (
            f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(available)}. "
            f"A plugin registered under the entry-point group {ENTRY_POINT_GROUP!r} "
            "may provide it."
        )

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={sorted(self._entries)})"
