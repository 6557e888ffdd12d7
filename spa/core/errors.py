"""User-facing errors: one line, what failed, why, and a hint.

Format (DESIGN.md): ``<what failed> for <kind> '<name>' (<op_type>): <why>. Hint: <what to do>``.
The CLI prints ``str(error)`` and exits with ``error.exit_code``.

Library errors name the parameter the caller passed, as ``name=`` (``calib=``, ``round_to=``);
the CLI rewrites those names into its own flags (``--calib``, ``--round-to``) before printing.
"""

import re


def first_line(exc: BaseException, limit: int = 300, default: str = "") -> str:
    """The first non-empty line of an exception's message, at most `limit` characters (clip)."""
    text = str(exc).strip()
    return clip(text.splitlines()[0], limit) if text else default


def clip(text: str, limit: int) -> str:
    """`text` when it fits in `limit` characters, else cut at its last sentence, clause or word
    boundary before the limit and ended with "…" (never mid-word)."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    for mark in (". ", "; ", ", ", " "):
        at = head.rfind(mark)
        if at >= limit // 3:
            return head[:at + (1 if mark != " " else 0)].rstrip(",;") + " …"
    return head.rstrip() + "…"


class SpaError(Exception):
    """A clear, expected failure caused by the input or the request (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message.rstrip('.')}. Hint: {hint}" if hint else message)


class UsageError(SpaError):
    """A bad parameter value or combination, caught before any work (exit code 2)."""

    exit_code = 2


def require(ok: bool, message: str, hint: str | None = None) -> None:
    """Raise UsageError(message, hint) unless `ok`: one line per parameter check."""
    if not ok:
        raise UsageError(message, hint)


def positive_int(name: str, value) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
            f"invalid {name}={value}: it must be a positive integer")


PARAM = re.compile(r"\b([a-z][a-z0-9_]*)=(True\b|False\b)?(?=[^=]|$)")


def with_flags(text: str, flags: dict) -> str:
    """`text` with each ``name=`` of a known parameter written as its flag (``round_to=0`` ->
    ``--round-to 0``, ``pass calib=DATA`` -> ``pass --calib DATA``, ``prune_hidden=True`` ->
    ``--prune-hidden``, ``check=False`` -> ``--no-check``): library errors in the
    CLI's words. `flags`: {parameter name: flag}."""
    def flag(match):
        name, rest = match.group(1), text[match.end():match.end() + 1]
        if name not in flags or (match.group(2) == "False") != flags[name].startswith("--no-"):
            return match.group(0)
        return flags[name] if match.group(2) or rest in ("", " ", ",", ".", ";", ")") else f"{flags[name]} "

    return PARAM.sub(flag, text)


class VerificationError(SpaError):
    """A requested verification or threshold failed (exit code 3)."""

    exit_code = 3
