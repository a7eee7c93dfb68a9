"""Parameter validation with one message format: ``<where>: <parameter> must be <rule>, got <value>``.

``where`` names what is being configured (a config section, a class, an unlearner's registered
name), so a message read alone in a log still says which setting to change. Configs, models,
training, the relearning probe and every unlearner validate through these helpers.
"""
from __future__ import annotations

from typing import Iterable


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
