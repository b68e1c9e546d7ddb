"""Typed, path-aware readers for the manifest schema, and :class:`ManifestError`.

Every manifest error message starts with the field path and names the bad value, e.g.
``peers[2].port: 70000 is out of range 1..65535``. :class:`Section` reads one mapping of the
manifest: it rejects unknown keys (suggesting close matches), and each getter checks the type
(a YAML ``true`` is not an integer), range and choices of one field.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MISSING: Any = object()


class ManifestError(ValueError):
    """An invalid manifest. The message names the field path and the offending value."""


def describe(value: Any) -> str:
    """Short description of a value for error messages (type and repr, truncated)."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = {type(None): "null", bool: "boolean", str: "string", int: "integer", float: "number"}
    if isinstance(value, Mapping):
        return f"a mapping {text}"
    if isinstance(value, list | tuple):
        return f"a list {text}"
    return f"{kind.get(type(value), type(value).__name__)} {text}"


def suggest(key: str, known: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for a close match of ``key`` among ``known``, else ``""``."""
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def join_path(path: str, key: str | int) -> str:
    """``join_path("peers", 2) == "peers[2]"``, ``join_path("training", "lr") == "training.lr"``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


class Section:
    """Reader for one mapping of the manifest at ``path``.

    Args:
        data: the raw value (must be a mapping; ``None`` is read as an empty mapping).
        path: field path for error messages (``""`` for the top level).
        known: the keys allowed in this mapping.
    """

    def __init__(self, data: Any, path: str, known: Sequence[str]) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            where = path or "manifest"
            raise ManifestError(f"{where}: expected a mapping, got {describe(data)}")
        self.path = path
        self.data = data
        for key in data:
            if not isinstance(key, str):
                raise ManifestError(f"{join_path(path, str(key))}: keys must be strings")
            if key not in known:
                raise ManifestError(
                    f"{join_path(path, key)}: unknown key{suggest(key, known)}; "
                    f"known keys: {', '.join(known)}"
                )

    def at(self, key: str) -> str:
        """Field path of ``key`` in this section."""
        return join_path(self.path, key)

    def has(self, key: str) -> bool:
        """Whether ``key`` is present (even as null)."""
        return key in self.data

    def raw(self, key: str, default: Any = MISSING) -> Any:
        """The unchecked value of ``key`` (``default`` if absent; required if no default)."""
        if key not in self.data:
            if default is MISSING:
                raise ManifestError(f"{self.at(key)}: required field is missing")
            return default
        return self.data[key]

    def integer(
        self,
        key: str,
        default: Any = MISSING,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
        nullable: bool = False,
    ) -> Any:
        """An integer field (booleans rejected), optionally range-checked or null."""
        value = self.raw(key, default)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(f"{self.at(key)}: expected an integer, got {describe(value)}")
        check_range(self.at(key), value, minimum, maximum)
        return value

    def number(
        self,
        key: str,
        default: Any = MISSING,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive_minimum: bool = False,
        exclusive_maximum: bool = False,
    ) -> float:
        """A real-number field (integers accepted, booleans and NaN/inf rejected)."""
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ManifestError(f"{self.at(key)}: expected a number, got {describe(value)}")
        if not math.isfinite(value):
            raise ManifestError(f"{self.at(key)}: {value} is not a finite number")
        low_bad = minimum is not None and (
            value <= minimum if exclusive_minimum else value < minimum
        )
        high_bad = maximum is not None and (
            value >= maximum if exclusive_maximum else value > maximum
        )
        if low_bad or high_bad:
            if maximum is None:
                op = ">" if exclusive_minimum else ">="
                raise ManifestError(f"{self.at(key)}: must be {op} {minimum:g}, got {value}")
            lo = "(" if exclusive_minimum else "["
            hi = ")" if exclusive_maximum else "]"
            low = "-inf" if minimum is None else f"{minimum:g}"
            raise ManifestError(
                f"{self.at(key)}: {value} is out of range {lo}{low}, {maximum:g}{hi}"
            )
        return float(value)

    def string(
        self,
        key: str,
        default: Any = MISSING,
        *,
        choices: Sequence[str] | None = None,
        nullable: bool = False,
    ) -> Any:
        """A non-empty string field, optionally one of ``choices``."""
        value = self.raw(key, default)
        if value is None and nullable:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ManifestError(
                f"{self.at(key)}: expected a non-empty string, got {describe(value)}"
            )
        if choices is not None and value not in choices:
            raise ManifestError(
                f"{self.at(key)}: {value!r} is not one of {', '.join(choices)}"
                f"{suggest(value, choices)}"
            )
        return value

    def boolean(self, key: str, default: Any = MISSING) -> bool:
        """A boolean field (``true``/``false``; integers rejected)."""
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise ManifestError(f"{self.at(key)}: expected true or false, got {describe(value)}")
        return value

    def mapping(self, key: str, default: Any = MISSING) -> dict[str, Any]:
        """A free-form mapping field (keys must be strings), returned as a new dict."""
        value = self.raw(key, default)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ManifestError(f"{self.at(key)}: expected a mapping, got {describe(value)}")
        for k in value:
            if not isinstance(k, str):
                raise ManifestError(f"{self.at(key)}: keys must be strings, got {describe(k)}")
        return dict(value)

    def sequence(self, key: str, default: Any = MISSING, *, nullable: bool = False) -> Any:
        """A list field."""
        value = self.raw(key, default)
        if value is None and nullable:
            return None
        if not isinstance(value, list | tuple):
            raise ManifestError(f"{self.at(key)}: expected a list, got {describe(value)}")
        return list(value)

    def path_field(self, key: str, base_dir: Path | None, check_files: bool) -> Path | None:
        """A file path (relative to ``base_dir``) that must exist if ``check_files``; or null."""
        value = self.string(key, None, nullable=True)
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if check_files and not path.is_file():
            raise ManifestError(f"{self.at(key)}: file not found: {path}")
        return path


def check_range(path: str, value: int, minimum: int | None, maximum: int | None) -> None:
    """Raise ``path: V is out of range lo..hi`` (or ``must be >= lo``) if out of bounds."""
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if maximum is None:
            raise ManifestError(f"{path}: {value} is out of range (must be >= {minimum})")
        raise ManifestError(f"{path}: {value} is out of range {minimum}..{maximum}")
