"""Command-line options generated from a config dataclass: each field states its default, help,
type, choices and range once, and both the CLI and the Python API check the same.

    @dataclass
    class Config:
        beta: float = option(0.1, "KL strength", minimum=0.0, exclusive=True)

    add_arguments(parser, Config)        # --beta (default: 0.1)
    config = from_args(Config, args)     # Config(beta=...)
    check_ranges(config)                 # ValueError naming the option
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] = (), choices=None,
           minimum: float | None = None, maximum: float | None = None, exclusive: bool = False,
           group: str = "options", metavar: str | None = None, cli: bool = True, required: bool = False,
           negative_flag: str | None = None, const=None, resumable: bool = False):
    """A dataclass field with its command-line description.

    minimum/maximum: the allowed range (exclusive=True: the bounds themselves are not allowed).
    negative_flag: for a bool that defaults to True, the flag that turns it off (e.g. --no-progress).
    A `bool | None` field becomes --flag / --no-flag (None: decided later).
    const: the value of the flag given without a value (nargs="?").
    cli=False: a Python-only field (e.g. a loaded model).
    resumable: may differ between a run and its resumption (cadence, display), unlike the
    settings that define what is trained."""
    meta = dict(help=help, flags=flags, choices=choices, minimum=minimum, maximum=maximum, exclusive=exclusive,
                group=group, metavar=metavar, cli=cli, required=required, negative_flag=negative_flag, const=const,
                resumable=resumable)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _field_types(cls) -> dict:
    """Field name -> int / float / str / bool (the first of a union such as `int | None`)."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        out[name] = args[0] if args else tp
    return out


def flag_name(field: dataclasses.Field) -> str:
    return "--" + field.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One argparse option per field with cli=True, grouped, with the field's default and help."""
    groups: dict[str, Any] = {}
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        m = f.metadata
        if not m.get("cli", True):
            continue
        group = groups.get(m["group"])
        if group is None:
            group = groups[m["group"]] = parser.add_argument_group(m["group"])
        default = f.default if f.default is not dataclasses.MISSING else None
        tp = types[f.name]
        text = m["help"]
        if tp is bool and default is None:
            group.add_argument(flag_name(f), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
            continue
        if tp is bool:
            if m.get("negative_flag"):  # unset: the field's default (no "(default: True)" under a --no- flag)
                group.add_argument(m["negative_flag"], dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                   help=text)
            else:
                group.add_argument(flag_name(f), *m["flags"], dest=f.name, action="store_true", help=text)
            continue
        kwargs = dict(dest=f.name, default=default, help=text + (" (default: %(default)s)" if "%(default)" not in text
                                                                 and not m.get("required") else ""))
        if m.get("required"):
            kwargs["required"] = True
        if tp in (int, float):
            kwargs["type"] = tp
        if m.get("choices"):
            kwargs["choices"] = m["choices"]
        if m.get("metavar"):
            kwargs["metavar"] = m["metavar"]
        if m.get("const") is not None:
            kwargs.update(nargs="?", const=m["const"])
        group.add_argument(flag_name(f), *m["flags"], **kwargs)


def from_args(cls, args: argparse.Namespace, **extra):
    """The config from parsed arguments (fields the parser does not know keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **extra)


def aliases(cls) -> dict[str, str]:
    """Extra flag spellings as Python keyword names (e.g. {"lr": "learning_rate"}), so the Python
    API takes what the CLI takes."""
    out = {}
    for f in dataclasses.fields(cls):
        for flag in f.metadata.get("flags", ()):
            out[flag.lstrip("-").replace("-", "_")] = f.name
    return out


def check_ranges(config, error=ValueError) -> None:
    """Every field's type, choices and range, checked up front; `error` names the option."""
    types = _field_types(type(config))
    for f in dataclasses.fields(config):
        m = f.metadata
        value = getattr(config, f.name)
        if value is None:
            continue
        tp = types[f.name]
        name = flag_name(f) if m.get("cli", True) else f.name
        if tp in (int, float) and not isinstance(value, bool):
            if not isinstance(value, (int, float)) or (tp is int and not float(value).is_integer()):
                raise error(f"{name}: expected {'an integer' if tp is int else 'a number'}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise error(f"{name}: expected a finite number, got {value!r}")
            lo, hi, strict = m.get("minimum"), m.get("maximum"), m.get("exclusive")
            if lo is not None and (value < lo or (strict and value == lo)):
                raise error(f"{name}: expected {'>' if strict else '>='} {lo}, got {value!r}")
            if hi is not None and (value > hi or (strict and value == hi)):
                raise error(f"{name}: expected {'<' if strict else '<='} {hi}, got {value!r}")
        if m.get("choices") and value not in m["choices"]:
            raise error(f"{name}: expected one of {', '.join(map(str, m['choices']))}, got {value!r}")
