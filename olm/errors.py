"""The ground floor: olm's error types and the helpers that keep every error message to one readable line.

Imports nothing of olm; every other module may import it.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class OlmError(Exception):
    """An error olm reports as one line (``error: ...``, non-zero exit) rather than a traceback: a mistake in the
    input (config, data, checkpoint) or a fault of the run's environment (NaN loss, full disk). Bugs are not OlmErrors."""


class ConfigError(OlmError, ValueError):
    """A configuration mistake, reported as one line that names the config path and the allowed values."""


def first_line(exc_or_text: BaseException | str) -> str:
    """The first non-empty line of an exception's message (its type's name when the message is empty)."""
    text = str(exc_or_text).strip()
    if text:
        return text.splitlines()[0]
    return type(exc_or_text).__name__ if isinstance(exc_or_text, BaseException) else ""


def closest(value: object, valid: Iterable[str], cutoff: float = 0.5) -> str | None:
    """The valid name closest to ``value`` (difflib's ratio >= ``cutoff``), or None."""
    close = difflib.get_close_matches(str(value), list(valid), n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(value: object, valid: Iterable[str], what: str = "known") -> str:
    """``"; did you mean 'gqa'? known: mha, gqa, mqa"``: the tail of an error about an unknown name."""
    valid = list(valid)
    match = closest(value, valid)
    hint = f"; did you mean {match!r}?" if match else ";"
    return f"{hint} {what}: {', '.join(valid) if valid else '(none)'}"


def config_error_cause(exc: BaseException) -> ConfigError | None:
    """The ConfigError behind ``exc`` (itself, or one an OmegaConf resolver raised, wrapped once per
    interpolation it was reached through), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
