"""Parameter validation with one message format: ``<where>: <parameter> must be <rule>, got <value>``.

``where`` names what is being configured (a config section, a class, an unlearner's registered
name), so a message read alone in a log still says which setting to change. Configs, models,
training, the relearning probe and every unlearner validate through these helpers;
:func:`check_type` checks a value against its declared type first (config fields, and every
unlearner parameter in :func:`dkvb.unlearn.create_unlearner`), so ``lr: abc`` fails before any
work instead of deep inside it.
"""
from __future__ import annotations

import math
import types
from typing import Any, Iterable, Literal, Union, get_args, get_origin


def invalid(where: str, parameter: str, rule: str, value: object, note: str = "") -> ValueError:
    """The ``ValueError`` for a bad parameter value; ``note`` is appended (e.g. how to spell it)."""
    return ValueError(f"{where}: {parameter} must be {rule}, got {value!r}{note}")


def require(ok: bool, where: str, parameter: str, rule: str, value: object) -> None:
    """Raise :func:`invalid` unless ``ok``. Comparisons with NaN are false, so
    ``require(x > 0, ...)`` also rejects a NaN ``x``."""
    if not ok:
        raise invalid(where, parameter, rule, value)


def require_count(where: str, parameter: str, value: object, low: int = 1) -> None:
    """Raise unless ``value`` is an integer (not a bool) ``>= low``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    require(ok, where, parameter, f"an integer >= {low}", value)


def require_choice(where: str, parameter: str, value: object, choices: Iterable[object]) -> None:
    """Raise unless ``value`` is one of ``choices`` (listed in the message in their given order)."""
    options = list(choices)
    require(value in options, where, parameter, "one of " + ", ".join(map(repr, options)), value)


def check_type(where: str, parameter: str, value: Any, hint: Any) -> Any:
    """``value`` checked against a parameter's declared type ``hint``; returns it (a float
    parameter takes an int, and a number YAML read as text, e.g. ``1e-3``, as the number it spells).

    Raises :func:`invalid`: booleans must be booleans, integers integers (not ``2.5``, nor ``1e12``,
    which YAML reads as text), floats finite numbers, text text, and ``None``/``nan`` spelled as
    text are refused with the YAML spelling to use. ``X | None``, ``Literal[...]``, ``dict`` and
    ``list`` are understood; other hints pass the value through.
    """
    origin, args = get_origin(hint), get_args(hint)

    def bad(rule: str, note: str = "") -> ValueError:
        return invalid(where, parameter, rule, value, note)

    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.strip().lower() in ("none", "null") and type(None) in args:
            raise bad(f"{_rule(rest[0])} or null", " (YAML spells none as null or ~)")
        if len(rest) != 1:
            return value
        try:
            return check_type(where, parameter, value, rest[0])
        except ValueError:
            if rest[0] in (bool, int, float, str):
                raise bad(f"{_rule(rest[0])} or null") from None
            raise
    if origin is Literal:
        if value not in args:
            raise bad("one of " + ", ".join(map(repr, args)))
        return value
    if hint is bool and not isinstance(value, bool):
        raise bad("true or false")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad("an integer", " (YAML reads 1e12 as text: write the digits)" if _numeric_text(value) else "")
    if hint is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise bad("a number")
        if not math.isfinite(number):
            raise bad("a finite number")
        return number
    if hint is str and not isinstance(value, str):
        raise bad("text")
    if (origin or hint) in (dict, list) and not isinstance(value, origin or hint):
        raise bad("a mapping" if (origin or hint) is dict else "a list")
    return value


def _numeric_text(value: Any) -> bool:
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        return False


def _rule(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(hint, str(hint))
