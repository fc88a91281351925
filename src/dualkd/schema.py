"""Base class for every typed config: unknown keys and wrong types are errors, never ignored.

Config classes live next to the code they configure (each objective owns its config in `methods/`);
`config.py` assembles them into the run config.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
import urllib.parse
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, SerializeAsAny, ValidationError


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown keys and re-validates on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def _expand_home(value: str) -> str:
    return os.path.expanduser(value) if value.startswith("~") else value


HomePath = Annotated[str, AfterValidator(_expand_home)]
"""A path in a config: a leading `~` is the user's home folder."""


def server_root(url: str) -> str:
    """`url` as a server's root address (no trailing slash), or ValueError saying what is wrong with it: no
    http(s) scheme, an OpenAI client's `.../v1` base, a query, a malformed port."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"{url!r} is not an http(s) address; write it as http://HOST:PORT (e.g. "
                         "http://127.0.0.1:8080)")
    if parsed.path.rstrip("/").endswith("/v1"):
        raise ValueError(f"{url!r} ends in /v1, an OpenAI client's base URL; give the server's root "
                         f"({url.rstrip('/')[:-3]}): dualkd calls both /v1/completions and /extras/tokenize")
    if parsed.query or parsed.fragment:
        raise ValueError(f"{url!r} has a query or fragment; write it as http://HOST:PORT")
    try:
        parsed.port  # noqa: B018 (raises on a malformed port)
    except ValueError as e:
        raise ValueError(f"{url!r}: {e}") from None
    return url.rstrip("/")


ServerURL = Annotated[str, AfterValidator(server_root)]


def _on_off(value: Any) -> Any:
    return {True: "on", False: "off"}[value] if isinstance(value, bool) else value


class ByKind(StrictModel):
    """A config section whose class one of its keys (`tag`: `kind`, an objective's `name`) chooses from a registry
    that can grow (teachers/kinds.py, methods/__init__.py), where a static discriminated union could not.
    Subclasses set `kinds` (tag -> class), `tag`, and declare the tag's field; `default_kind` names the class of
    a section that says none. `of_kind(Base)` is the field type that validates a mapping into the class its tag
    names and keeps that class when the config is written back."""

    kinds: ClassVar[Mapping[str, type[ByKind]]]
    tag: ClassVar[str] = "kind"
    noun: ClassVar[str] = "kind"
    """What one entry of the registry is called in messages ("unknown objective 'x'")."""

    @classmethod
    def default_kind(cls, data: dict[str, Any]) -> str:
        """The kind of a section that names none (ValueError: it must name one)."""
        raise ValueError(f"is missing; choose from {sorted(cls.kinds)}")


def of_kind(base: type[ByKind]) -> Any:
    """The field type of a `ByKind` section: a mapping becomes the class its tag names. Errors keep their place
    (a kind's own errors are located under its tag value, as a discriminated union's are, so that
    `format_validation_error` names the key and suggests the kind's own fields)."""

    def refuse(message: str, value: Any) -> ValidationError:
        return ValidationError.from_exception_data(base.__name__, [  # type: ignore[list-item]
            {"type": "value_error", "loc": (base.tag,), "input": value, "ctx": {"error": ValueError(message)}}])

    def parse(value: Any) -> Any:
        if not isinstance(value, dict):
            return value  # an instance already, or pydantic's own type error
        try:
            kind = value.get(base.tag) or base.default_kind(value)
        except ValueError as e:
            raise refuse(str(e), value) from None
        if kind not in base.kinds:
            raise refuse(f"unknown {base.noun} {kind!r}; choose from {sorted(base.kinds)}", value)
        try:
            return base.kinds[kind].model_validate({**value, base.tag: kind})
        except ValidationError as e:
            errors = [{**{k: err[k] for k in ("type", "input", "ctx") if k in err}, "loc": (kind, *err["loc"])}
                      for err in e.errors(include_url=False)]
            raise ValidationError.from_exception_data(e.title, errors) from None  # type: ignore[arg-type]

    return Annotated[SerializeAsAny[base], BeforeValidator(parse)]


AutoOnOff = Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)]
"""`auto`, `on` or `off`; YAML reads an unquoted on/off as true/false, which mean the same here."""
"""The root address of an inference server (see `server_root`)."""


def format_validation_error(err: ValidationError, source: str, root: type[BaseModel]) -> str:
    """One line per problem of a config of class `root`: the dotted key, what was expected, what was given."""
    lines = [f"invalid config ({source}):"]
    for e in err.errors(include_url=False):
        keys, owners = _walk(e["loc"], root)
        key = ".".join(str(k) for k in keys) or "<top level>"
        kind = e["type"]
        if kind == "extra_forbidden":
            owner = owners[-1] if owners else None
            hint = ""
            if owner is not None:
                close = difflib.get_close_matches(str(keys[-1]), list(owner.model_fields), n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else f"; allowed: {', '.join(owner.model_fields)}"
            lines.append(f"  {key}: unknown key{hint}")
        elif kind == "missing":
            lines.append(f"  {key}: required key is missing")
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            tag = str(e["ctx"]["discriminator"]).strip("'")
            given = e["input"].get(tag) if isinstance(e["input"], dict) else None
            problem = "is missing" if given is None else f"unknown {keys[-1] if keys else 'kind'} {given!r}"
            owner = owners[-1] if owners else None
            field = owner.model_fields.get(keys[-1]) if owner is not None else None
            choices = sorted(_variants(field.annotation, field.discriminator)) if field is not None else []
            lines.append(f"  {key}.{tag}: {problem}; choose from {choices}")
        elif kind == "value_error":
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            owner = owners[-1] if owners else None
            field = owner.model_fields.get(keys[-1]) if owner is not None else None
            got = e.get("input")
            got_text = "a mapping" if isinstance(got, dict) else f"{got!r} ({type(got).__name__})"
            expected = f"expected {_type_name(field.annotation)}, " if field is not None else ""
            lines.append(f"  {key}: {expected}got {got_text}: {e['msg']}")
    return "\n".join(lines)


def _walk(loc: tuple[Any, ...], root: type[BaseModel]) -> tuple[list[Any], list[type[BaseModel] | None]]:
    """Follow a pydantic error location through the config classes.

    Returns the user-facing key path (union tags and validator names removed) and, for each key, the
    config class that owns it (None where the path leaves the typed classes, e.g. inside `arch`).
    """
    keys: list[Any] = []
    owners: list[type[BaseModel] | None] = []
    model: Any = root
    variants: dict[str, type[BaseModel]] = {}
    for part in loc:
        if isinstance(part, str) and (part.startswith("function-") or "[" in part):
            continue
        if part in variants:
            model, variants = variants[part], {}  # a discriminated union's tag: follow that variant
            continue
        is_model = isinstance(model, type) and issubclass(model, BaseModel)
        keys.append(part)
        owners.append(model if is_model else None)
        field = model.model_fields.get(part) if is_model else None
        variants = _variants(field.annotation, field.discriminator) if field is not None else {}
        model = _inner_model(field.annotation) if field is not None else None
    return keys, owners


def _variants(annotation: Any, tag: Any) -> dict[str, type[BaseModel]]:
    """A discriminated union's classes by their tag (the default of their `tag` field), else {}."""
    inner = _inner_model(annotation)
    if isinstance(inner, type) and issubclass(inner, ByKind):
        return dict(inner.kinds)
    if not isinstance(tag, str):
        return {}
    return {cls.model_fields[tag].default: cls for cls in typing.get_args(annotation)
            if isinstance(cls, type) and issubclass(cls, BaseModel)}


def _inner_model(annotation: Any) -> Any:
    """The config class inside `X | None` or `Annotated[...]`, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))
