"""One registry type for everything compactai looks up by name (timm's ``_registry.py``):
techniques, pruning importance criteria, distillation student builders, built-in examples.

``register`` refuses a second, different entry under a name already taken (DuplicateNameError),
so a plugin cannot silently replace a built-in; registering the same object again is a no-op
(a module imported twice). ``get`` of an unknown name lists the known ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from compactai.errors import DuplicateNameError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name, in registration order. ``kind`` names the entries in
    messages ("technique", "importance criterion")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Make ``entry`` known as ``name``; returns it (usable from a decorator)."""
        current = self._entries.get(name)
        if current is not None and current is not entry:
            raise DuplicateNameError(
                f"The {self.kind} name '{name}' is already taken{_by(current)}; register {_label(entry)} under "
                f"another name, or unregister('{name}') first."
            )
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Forget ``name`` (tests and plugins that register something temporarily)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name raises UnknownNameError listing the known ones."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(
                f"Unknown {self.kind} '{name}'; choose one of: {', '.join(self.names()) or 'none registered'}."
            ) from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


def _label(entry: object) -> str:
    name = getattr(entry, "__qualname__", None)
    return f"{getattr(entry, '__module__', '?')}.{name}" if name else f"this {type(entry).__name__}"


def _by(entry: object) -> str:
    return f" by {_label(entry)}" if getattr(entry, "__qualname__", None) else ""
