"""Named choices: one registry per kind (quantizers, clip rules, codecs, eval modes, ...).

A registry maps the name a params.yaml value uses to its implementation. Adding a choice is adding
one function with `@REGISTRY.register("name")`; params naming an unknown choice are refused when
they load (see `config.py`), with the valid names in the message.
"""

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .errors import PgolfError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            self.add(name, entry)
            return entry
        return add

    def add(self, name: str, entry: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __contains__(self, name: Any) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        return self._entries.items()

    def lookup(self, name: str, key: str) -> T:
        """The entry for `name`, or a one-line error naming the param `key` and the valid names."""
        if name not in self._entries:
            raise PgolfError(f"{key}: {name!r}; expected one of {', '.join(self._entries)}")
        return self._entries[name]
