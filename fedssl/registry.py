"""Name -> object registries, for everything a recipe chooses by name."""

from __future__ import annotations

import difflib
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

    Other packages add entries through the Python entry point group `entry_points`
    (e.g. `[project.entry-points."fedssl.thresholds"] mine = "my_pkg.thresholds"`):
    each is imported when a name is not found or the names are listed, and
    registers its entries with the same decorator.

    Example:
        ALGORITHMS = Registry("algorithm")

        @ALGORITHMS.register("fedavg")
        def fedavg(...): ...
    """

    def __init__(self, kind: str, entry_points: str | None = None):
        self.kind = kind
        self.group = entry_points
        self._entries: dict[str, T] = {}
        self._loaded: set[str] = set()  # entry points imported so far

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def load_plugins(self) -> None:
        """Import the modules other packages declare in this registry's entry point
        group, those not imported yet."""
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
