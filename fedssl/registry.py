"""Name -> object registries, for everything a recipe chooses by name."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Callable, Generic, Iterator, TypeVar

from fedssl.errors import UserError

T = TypeVar("T")


def closest(name: str, candidates: list[str]) -> str | None:
    """The candidate most similar to `name`, if any is reasonably close."""
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: list[str]) -> str:
    """' (did you mean X?)' when a close candidate exists, else ''."""
    match = closest(name, candidates)
    return f" (did you mean {match!r}?)" if match else ""


class Registry(Generic[T]):
    """A mapping from names to objects; registering a name twice raises.

    Entries register themselves when their module is imported. The registry imports
    them itself, so that no list of modules is kept by hand: the modules it is told
    to `imports` (every module of a package, e.g. `fedssl.algorithms`), and the modules
    other packages declare in the Python entry point group `entry_points` (e.g.
    `[project.entry-points."fedssl.algorithms"] mine = "my_pkg.my_algorithm"`),
    when a name is not found or the names are listed.

    Example:
        ALGORITHMS = Registry("algorithm")

        @ALGORITHMS.register("fedavg")
        def fedavg(...): ...
    """

    def __init__(self, kind: str, entry_points: str | None = None, imports: tuple[str, ...] = ()):
        self.kind = kind
        self.group = entry_points
        self.imports = imports
        self._entries: dict[str, T] = {}
        self._loaded: set[str] = set()  # modules and entry points imported so far

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def load_plugins(self) -> None:
        """Import the modules that register entries and were not imported yet: those of
        `imports` (a package: all its modules), and those other packages declare in
        the entry point group."""
        for name in self.imports:
            if name not in self._loaded:
                self._loaded.add(name)
                module = importlib.import_module(name)
                for inner in pkgutil.iter_modules(getattr(module, "__path__", [])):
                    importlib.import_module(f"{name}.{inner.name}")
        if self.group is None:
            return
        for point in entry_points(group=self.group):
            if point.value not in self._loaded:
                self._loaded.add(point.value)
                point.load()

    def get(self, name: str, key: str | None = None) -> T:
        """The entry called `name`; a `UserError` naming `key` if there is none."""
        if name not in self._entries:
            self.load_plugins()
        if name not in self._entries:
            where = f"{key}: " if key else ""
            raise UserError(
                f"{where}unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; "
                f"choose one of {', '.join(self.names())}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
