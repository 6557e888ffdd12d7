"""User-facing errors: one line, what failed, why, and a hint.

Format (DESIGN.md): ``<what failed> for <kind> '<name>' (<op_type>): <why>. Hint: <what to do>``.
The CLI prints ``str(error)`` and exits with ``error.exit_code``.
"""


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
