"""The one name rule for everything that becomes part of a storage path: domains, aliases, variants.

A name is 1 to 64 characters: a lowercase letter first, then lowercase letters, digits, ``_`` or
``-``. Such a name cannot traverse (no ``/``, ``\\``, ``.``), cannot glob (no ``*``, ``?``, ``[``),
cannot carry a URL scheme (no ``:``) and means the same on every store and file system. It is checked
at every entry point (the CLI, the Python API, the registry store, the REST service) before the name
touches storage, and again on names read back from a store.
"""

from __future__ import annotations

import re

from .errors import ConfigError

NAME_RULE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
RULE_TEXT = "1-64 characters: a lowercase letter first, then lowercase letters, digits, '_' or '-'"
#: Names the registry gives a meaning of its own; they cannot be aliases.
RESERVED_ALIASES = frozenset({"latest"})
#: A version number as text: ASCII digits only (``str.isdigit`` also takes "²" and "٢"), at most 12, no
#: leading zero, optionally after one ``v``.
VERSION_RULE = re.compile(r"v?([1-9][0-9]{0,11})")
DIGITS = re.compile(r"[0-9]{1,12}")


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RULE.fullmatch(name) is not None


def version_number(text: object) -> int | None:
    """The version ``3``, ``"3"`` or ``"v3"`` names, else None (not ``"²"``, ``"v٢"``, ``"0"``, ``"03"``)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text if text >= 1 else None
    match = VERSION_RULE.fullmatch(text) if isinstance(text, str) else None
    number = int(match.group(1)) if match is not None else 0
    return number if number >= 1 else None


def is_digits(text: object) -> bool:
    """ASCII digits only (a folder or claim name that is a version number)."""
    return isinstance(text, str) and DIGITS.fullmatch(text) is not None


def check_name(name: object, what: str = "name") -> str:
    """``name`` if it follows the rule, else a :class:`ConfigError` that names ``what`` and the rule."""
    if not is_valid_name(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise ConfigError(f"{what} {shown} is not a valid name ({RULE_TEXT})", errors={what: RULE_TEXT})
    return name  # type: ignore[return-value]


def check_alias(alias: object) -> str:
    check_name(alias, "alias")
    if alias in RESERVED_ALIASES:
        raise ConfigError(f"alias {alias!r} is built in and cannot be set", errors={"alias": "reserved"})
    return alias  # type: ignore[return-value]
