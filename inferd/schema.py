"""One typed, checked value: the unit of config keys, runtime options and request params."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


def matches(value: Any, kind: type) -> bool:
    """Type check as TOML and msgpack mean it: bool is not an int, an int is a fine float."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


@dataclass(frozen=True)
class Param:
    kind: type
    expect: str
    check: Callable[[Any], bool] = lambda v: True

    def problem(self, value: Any) -> str | None:
        """None if ``value`` is acceptable, else what was expected and what came."""
        if matches(value, self.kind) and self.check(value):
            return None
        return f"expected {self.expect}, got {value!r}"
