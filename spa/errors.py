"""User-facing errors: one line, what failed, why, and a hint.

Format (DESIGN.md): ``<what failed> for <kind> '<name>' (<op_type>): <why>. Hint: <what to do>``.
The CLI prints ``str(error)`` and exits with ``error.exit_code``.
"""


def first_line(exc: BaseException, limit: int = 300, default: str = "") -> str:
    """The first non-empty line of an exception's message, cut to `limit` characters."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else default


class SpaError(Exception):
    """A clear, expected failure caused by the input or the request (exit code 1)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message}. Hint: {hint}" if hint else message)


class VerificationError(SpaError):
    """A requested verification or threshold failed (exit code 3)."""

    exit_code = 3
