"""Stage configs as data: one frozen dataclass per stage, whose fields carry their help text.

The library function of a stage takes its config; the CLI builds its options from the same
fields (``cli.py``); a recipe is the model plus these configs (``recipe.py``). So an option
is written once, with one default and one help line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any


def opt(default: Any, help: str, *, flag: str | None = None, cli: bool = True, parse=None, text: str | None = None):
    """A stage-config field with its help line. ``flag``: the option's spelling when it is
    not ``--field-name``; ``cli=False``: recipe-only; ``parse``: how the CLI's text becomes the
    value (e.g. ``"4096,8192"`` -> ``[4096, 8192]``), with ``text`` the option's metavar."""
    meta = {"help": help, "flag": flag, "cli": cli, "parse": parse, "text": text}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def int_list(text: str | None) -> list[int] | None:
    """``"4096,8192"`` -> ``[4096, 8192]`` (CLI spelling of a list of token counts)."""
    from .errors import KvxError

    if not text:
        return None
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise KvxError(f"expected token counts like '4096,8192', not {text!r}") from None


# A converted layer's own copies of these original projections may train with its new weights
# (the layer-wise fitting's --fit-also, the distillation's --train-also): the queries learn to
# read the compressed keys, the output projection to read the reconstructed values.
ALSO_TRAINABLE = ("q_proj", "o_proj")


def also_trainable(text: str, flag: str) -> tuple[str, ...]:
    """``"q_proj,o_proj"`` -> the names, in the order given; ``none`` (or nothing) -> ``()``.
    A name outside ``ALSO_TRAINABLE`` is a one-line error naming ``flag``."""
    from .errors import KvxError

    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip() and n.strip().lower() != "none"))
    unknown = sorted(set(names) - set(ALSO_TRAINABLE))
    if unknown:
        raise KvxError(f"{flag} {','.join(unknown)}: choose from {', '.join(ALSO_TRAINABLE)} (or none)")
    return names


def accepts(hint, value) -> bool:
    """Does ``value`` (parsed YAML) fit the type ``hint`` of a config field?"""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(accepts(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def config_fields(cls) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of a stage config, in order."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]
