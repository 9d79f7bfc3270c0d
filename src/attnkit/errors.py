"""Exceptions raised by attnkit."""

from __future__ import annotations


class AttentionInputError(ValueError):
    """A malformed call: names the argument, what was expected and what came."""

    def __init__(self, arg: str, expected: str, got: object, hint: str | None = None):
        self.arg = arg
        self.expected = expected
        self.got = got
        msg = f"argument `{arg}`: expected {expected}, got {got}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


class UnsupportedError(RuntimeError):
    """An explicitly requested backend cannot serve the call; lists every reason."""

    def __init__(self, backend: str, reasons: list[str]):
        self.backend = backend
        self.reasons = list(reasons)
        lines = "\n".join(f"  - {r}" for r in self.reasons) or "  - (no reason given)"
        super().__init__(
            f"backend {backend!r} cannot serve this call:\n{lines}\n"
            "Use backend='auto' (or attnkit.explain(...) to see which backends can)."
        )
