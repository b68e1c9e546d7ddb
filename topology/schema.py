"""The pydantic plumbing of the manifest schema: field types, :class:`ManifestError` and the
translation of pydantic's validation errors into one-line messages.

The sections of the manifest are pydantic dataclasses (:mod:`topology.manifest_specs`); their
fields use the types defined here (``StrictInt``/:data:`Number` with ``Field(ge=..., le=...)``,
:data:`NonEmptyStr`, ``Literal`` choices). Validators that need a message of their own raise
:func:`fail`. :func:`manifest_error` turns the first error pydantic reports into a
:class:`ManifestError` whose message starts with the field path and names the bad value, e.g.
``peers[2].port: 70000 is out of range 1..65535``; unknown keys get a close match (difflib).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, NoReturn, TypeVar

import annotated_types
from pydantic import AfterValidator, AllowInfNan, Field, Strict, ValidationError
from pydantic import StrictBool as StrictBool
from pydantic import StrictInt as StrictInt
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

logger = logging.getLogger(__name__)

_CUSTOM = "manifest"
_T = TypeVar("_T")


class ManifestError(ValueError):
    """An invalid manifest. The message names the field path and the offending value."""


def _check_non_empty(value: str) -> str:
    if not value.strip():
        fail(f"expected a non-empty string, got {describe(value)}")
    return value


#: A real number: integers accepted, booleans, strings, NaN and infinities rejected.
Number = Annotated[float, Strict(), AllowInfNan(False)]
#: A string with at least one non-blank character.
NonEmptyStr = Annotated[
    str,
    Strict(),
    AfterValidator(_check_non_empty),
    Field(json_schema_extra={"minLength": 1, "pattern": r"\S"}),
]


def fail(message: str, *at: str | int) -> NoReturn:
    """Reject a value from inside a validator with ``message``.

    Args:
        message: the message after the field path (name the bad value).
        *at: path of the offending field relative to the value being validated
            (``fail("...", "lr_schedule", "min_lr")`` from the ``training`` section).
    """
    raise PydanticCustomError(_CUSTOM, "{message}", {"message": message, "at": at})


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


def format_path(loc: Iterable[str | int]) -> str:
    """``("peers", 2, "port")`` -> ``"peers[2].port"``."""
    path = ""
    for part in loc:
        path = join_path(path, part)
    return path


def check_range(path: str, value: int, minimum: int | None, maximum: int | None) -> None:
    """Raise ``path: V is out of range lo..hi`` (or ``must be >= lo``) if out of bounds."""
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ManifestError(f"{path}: {int_range_message(value, minimum, maximum)}")


def int_range_message(value: Any, minimum: int | None, maximum: int | None) -> str:
    """``"V is out of range lo..hi"``, or ``(must be >= lo)`` / ``(must be <= hi)``."""
    if maximum is None:
        return f"{value} is out of range (must be >= {minimum})"
    if minimum is None:
        return f"{value} is out of range (must be <= {maximum})"
    return f"{value} is out of range {minimum}..{maximum}"


@dataclasses.dataclass
class _Bounds:
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    integer: bool = False


def _walk(annotation: Any, infos: list[Any], bounds: _Bounds) -> None:
    """Collect range constraints and int-ness from an annotation and its metadata."""
    if typing.get_origin(annotation) is Annotated:
        base, *metadata = typing.get_args(annotation)
        _walk(base, infos, bounds)
        infos.extend(metadata)
        return
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                _walk(arg, infos, bounds)
        return
    if annotation is int:
        bounds.integer = True


def _bounds(info: FieldInfo) -> _Bounds:
    bounds = _Bounds()
    metadata: list[Any] = list(info.metadata)
    _walk(info.annotation, metadata, bounds)
    for item in metadata:
        for constraint in item.metadata if isinstance(item, FieldInfo) else [item]:
            if isinstance(constraint, annotated_types.Ge):
                bounds.minimum = constraint.ge  # type: ignore[assignment]
            elif isinstance(constraint, annotated_types.Gt):
                bounds.minimum, bounds.exclusive_minimum = constraint.gt, True  # type: ignore[assignment]
            elif isinstance(constraint, annotated_types.Le):
                bounds.maximum = constraint.le  # type: ignore[assignment]
            elif isinstance(constraint, annotated_types.Lt):
                bounds.maximum, bounds.exclusive_maximum = constraint.lt, True  # type: ignore[assignment]
    return bounds


def _range_message(value: Any, b: _Bounds) -> str:
    if b.integer:
        low = None if b.minimum is None else int(b.minimum) + (1 if b.exclusive_minimum else 0)
        high = None if b.maximum is None else int(b.maximum) - (1 if b.exclusive_maximum else 0)
        return int_range_message(value, low, high)
    if b.maximum is None:
        return f"must be {'>' if b.exclusive_minimum else '>='} {b.minimum:g}, got {value}"
    if b.minimum is None:
        return f"must be {'<' if b.exclusive_maximum else '<='} {b.maximum:g}, got {value}"
    lo = "(" if b.exclusive_minimum else "["
    hi = ")" if b.exclusive_maximum else "]"
    return f"{value} is out of range {lo}{b.minimum:g}, {b.maximum:g}{hi}"


def _unwrap(annotation: Any) -> Any:
    """The dataclass or ``tuple[X, ...]`` item type behind Optional/Annotated wrappers."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _locate(root: Any, loc: Sequence[str | int]) -> tuple[Any, FieldInfo | None]:
    """The dataclass that holds the field at ``loc`` and that field's FieldInfo (or None)."""
    owner: Any = root
    info: FieldInfo | None = None
    for part in loc:
        if info is not None:
            inner = _unwrap(info.annotation)
            info = None
            if isinstance(part, int):  # an item of a tuple[X, ...] field
                args = typing.get_args(inner)
                owner = _unwrap(args[0]) if args else None
                continue
            owner = inner
        elif isinstance(part, int):
            return owner, None
        fields = getattr(owner, "__pydantic_fields__", None)
        if not fields or part not in fields:
            return owner, None
        info = fields[part]
    return owner, info


def _choices(info: FieldInfo | None) -> tuple[Any, ...]:
    annotation = _unwrap(info.annotation) if info is not None else None
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()


def error_message(error: Mapping[str, Any], root: Any) -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) as ``path: message``.

    Args:
        error: the error dict (``type``, ``loc``, ``input``, ``ctx``, ``msg``).
        root: the pydantic dataclass that was validated (to look fields up by path).
    """
    kind = error["type"]
    loc = list(error["loc"])
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "value_error" and isinstance(ctx.get("error"), ManifestError):
        return str(ctx["error"])  # raised with its full path
    if kind == _CUSTOM:
        loc += list(ctx.get("at", ()))
        return f"{format_path(loc) or 'manifest'}: {ctx['message']}"
    if "[key]" in loc:  # a mapping key that is not a string
        loc = loc[: loc.index("[key]") - 1]
        return f"{format_path(loc)}: keys must be strings, got {describe(value)}"
    path = format_path(loc) or "manifest"
    owner, info = _locate(root, loc)
    if kind in ("missing", "missing_argument"):
        message = "required field is missing"
    elif kind in ("unexpected_keyword_argument", "extra_forbidden"):
        known = list(getattr(owner, "__pydantic_fields__", {}))
        key = str(loc[-1])
        message = f"unknown key{suggest(key, known)}; known keys: {', '.join(known)}"
    elif kind == "invalid_key":
        path = format_path(loc[:-1]) or "manifest"
        message = f"keys must be strings, got {describe(loc[-1])}"
    elif kind in ("dataclass_type", "model_type", "dict_type", "model_attributes_type"):
        message = f"expected a mapping, got {describe(value)}"
    elif kind in ("list_type", "tuple_type"):
        message = f"expected a list, got {describe(value)}"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        message = f"expected an integer, got {describe(value)}"
    elif kind in ("float_type", "float_parsing"):
        message = f"expected a number, got {describe(value)}"
    elif kind == "finite_number":
        message = f"{value} is not a finite number"
    elif kind in ("bool_type", "bool_parsing"):
        message = f"expected true or false, got {describe(value)}"
    elif kind == "string_type":
        message = f"expected a non-empty string, got {describe(value)}"
    elif kind == "literal_error":
        names = [str(c) for c in _choices(info)] or [str(ctx.get("expected", ""))]
        if isinstance(value, str):
            message = f"{value!r} is not one of {', '.join(names)}{suggest(value, names)}"
        else:
            message = f"expected one of {', '.join(names)}, got {describe(value)}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and (
        info is not None
    ):
        message = _range_message(value, _bounds(info))
    else:
        message = f"{error['msg']}, got {describe(value)}"
    return f"{path}: {message}"


def manifest_error(
    exc: ValidationError, root: Any, prefix: Sequence[str | int] = ()
) -> ManifestError:
    """The first error of a pydantic ValidationError as a :class:`ManifestError`.

    Args:
        exc: the error.
        root: the dataclass its ``loc`` paths start from (after ``prefix``).
        prefix: path of that dataclass in the manifest (``("exchange",)``).
    """
    error = exc.errors(include_url=False)[0]
    loc = list(error["loc"])
    owner, _ = _locate(root, prefix)
    names = list(getattr(owner, "__pydantic_fields__", {}))
    if loc and isinstance(loc[0], int) and loc[0] < len(names):
        loc[0] = names[loc[0]]  # a positional constructor argument
    return ManifestError(error_message({**error, "loc": (*prefix, *loc)}, root))


def raise_manifest_errors(
    *prefix: str, root: Callable[[], Any] | None = None
) -> Callable[[_T], _T]:
    """Class decorator: constructing the pydantic dataclass directly (``ExchangeSpec(...)``,
    ``dataclasses.replace``) raises :class:`ManifestError` too, not pydantic's error.

    Args:
        *prefix: the section's path in the manifest, e.g. ``"training", "lr_schedule"``.
        root: returns the dataclass that ``prefix`` starts from (the manifest's); default:
            the decorated class, with no prefix.
    """

    def decorate(cls: _T) -> _T:
        init = cls.__init__  # type: ignore[misc]

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                raise manifest_error(exc, cls if root is None else root(), prefix) from None

        cls.__init__ = __init__  # type: ignore[misc]
        return cls

    return decorate
