"""Settings fields as command-line options, and the help's value types for every option.

``settings_options`` gives a command one ``--flag`` per ``Settings`` field, typed as the field
is (``INTEGER``, ``FLOAT``, ``PATH``, ``TEXT``, a choice list, ``--x/--no-x`` for a bool), with
the field's env var, default and range in its help. An option not given is None and is left out
of the settings, so ``BASTION_*`` variables (read by pydantic, not by the option) and the field
defaults keep their precedence; only pydantic judges a value's bounds (``build_settings``).

``plain_metavars`` names every other option's value the same way in ``--help``.
"""

from __future__ import annotations

import functools
import inspect
import re
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import typer
from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from bastion.settings import Settings

F = TypeVar("F", bound=Callable[..., Any])

_METAVARS: dict[type, str] = {int: "INTEGER", float: "FLOAT", str: "TEXT", Path: "PATH", SecretStr: "TEXT"}


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return f"BASTION_{field.upper()}"


def build_settings(overrides: dict[str, Any]) -> Settings:
    """Settings from the options given (None: not given), the environment and the defaults;
    an invalid value is ``error: invalid settings: ...`` and exit status 2."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        typer.echo(f"error: invalid settings: {problems}", err=True)
        raise typer.Exit(2) from exc


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def value_type(field: FieldInfo) -> tuple[Any, str | None]:
    """The option's Python type (always optional: None means not given) and its help metavar
    (None for a bool flag)."""
    inner = _unwrap(field.annotation)
    if inner is bool:
        return bool | None, None
    if get_origin(inner) is Literal:
        choices = [str(c) for c in get_args(inner)]
        return inner | None, "[" + "|".join(choices) + "]"
    for python, metavar in _METAVARS.items():
        if inner is python:
            return (str if python is SecretStr else python) | None, metavar
    return str | None, "TEXT"


def _shown(value: Any) -> str:
    if isinstance(value, Path):
        home = Path.home()
        return f"~/{value.relative_to(home)}" if value.is_relative_to(home) else str(value)
    if value == "":
        return '""'
    return str(value)


def default_text(name: str, field: FieldInfo) -> str | None:
    """What ``--help`` shows as the field's default: its ``default_text`` when it has one, else the
    default (or the factory's value), or "unset"; never a secret's value."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("default_text"), str):
        return str(extra["default_text"])
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if value is None or value is PydanticUndefined or isinstance(value, SecretStr):
        return "unset"  # the description says what unset means; a secret's value is never shown
    if isinstance(value, bool):
        return "true" if value else "false"  # as the env var is written
    return _shown(value)


def _bounds(field: FieldInfo) -> str | None:
    """The field's range as click writes one: ``0<=x<=65535``, ``x>=1024``, ``0<x<=1``."""
    found: dict[str, Any] = {}
    for item in field.metadata:
        for attr in ("ge", "gt", "le", "lt"):
            if getattr(item, attr, None) is not None:
                found[attr] = getattr(item, attr)
    lower = f"{found['ge']}<=" if "ge" in found else f"{found['gt']}<" if "gt" in found else ""
    upper = f"<={found['le']}" if "le" in found else f"<{found['lt']}" if "lt" in found else ""
    if lower and not upper:  # x>=1024 reads better than 1024<=x
        return "x" + (f">={found['ge']}" if "ge" in found else f">{found['gt']}")
    return f"{lower}x{upper}" if lower or upper else None


def help_text(name: str, field: FieldInfo) -> str:
    """The field's description, then ``[env var: ...; default: ...; range]``."""
    extra = [f"env var: {env_name(name)}"]
    default = default_text(name, field)
    if default is not None:
        extra.append(f"default: {default}")
    bounds = _bounds(field)
    if bounds:
        extra.append(bounds)
    return f"{field.description or ''}  [{'; '.join(extra)}]".strip()


def _option(name: str, field: FieldInfo) -> inspect.Parameter:
    annotation, metavar = value_type(field)
    flag = flag_name(name)
    option = typer.Option(
        None,
        f"{flag}/--no-{flag[2:]}" if metavar is None else flag,
        metavar=metavar,
        help=help_text(name, field),
        show_default=False,
        show_envvar=False,
    )
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def settings_options(fields: Iterable[str] | None = None) -> Callable[[F], F]:
    """Give the decorated command one option per settings field (all, or ``fields``); their values
    arrive in its ``**options``.

    Typer reads a command's parameters from its signature, so the settings fields are appended
    to the signature of the command function."""
    wanted = list(Settings.model_fields) if fields is None else list(fields)

    def decorate(func: F) -> F:
        hints = get_type_hints(func, include_extras=True)  # the command's own options, resolved where it lives
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(func).parameters.values()
            if p.kind is not p.VAR_KEYWORD
        ]
        extra = [_option(name, Settings.model_fields[name]) for name in wanted]

        @functools.wraps(func)
        def wrapper(**kwargs: Any) -> Any:
            return func(**kwargs)

        wrapper.__signature__ = inspect.Signature([*own, *extra])  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


_TYPE_NAMES = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "path": "PATH", "bool": "BOOLEAN"}


def _metavar(shown: str) -> str:
    """Typer's ``<int>``, ``<list[str]>``, ``<a|b>`` as ``INTEGER``, ``TEXT``, ``[a|b]``."""
    inner = shown.strip("<>")
    listed = re.fullmatch(r"list\[(.*)\]", inner)
    if listed:
        inner = listed.group(1)
    if "|" in inner:
        return f"[{inner}]"
    return _TYPE_NAMES.get(inner.lower(), inner.upper())


def plain_metavars(command: Any) -> None:
    """Name the value of every option of ``command`` and its subcommands as click does
    (``INTEGER``, ``TEXT``, ``PATH``...), and each argument in capitals (``NAME``), as the commands'
    help texts call them, where no metavar was given."""
    import typer.core

    ctx = typer.Context(command)
    for param in getattr(command, "params", []):
        if getattr(param, "metavar", "") is not None:
            continue
        if isinstance(param, typer.core.TyperArgument) and param.name:
            param.metavar = param.name.upper()
        elif isinstance(param, typer.core.TyperOption) and not param.is_flag:
            param.metavar = _metavar(str(param.display_type(ctx)))
    for sub in getattr(command, "commands", {}).values():
        plain_metavars(sub)
