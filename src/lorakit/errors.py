"""The one exception lorakit raises for bad input.

Every message names the problem and the fix (file, line, field, module name). Callers
collect all problems first and raise once, so a user fixes everything in one pass.
"""


class LorakitError(ValueError):
    """Bad input to lorakit: the message says what is wrong and how to fix it."""

    @classmethod
    def collect(cls, problems: list[str], header: str = "") -> None:
        """Raise one error listing every problem, or return if there are none."""
        if not problems:
            return
        if len(problems) == 1 and not header:
            raise cls(problems[0])
        lines = [header or f"{len(problems)} problems:"] + [f"  - {p}" for p in problems]
        raise cls("\n".join(lines))


class UnsupportedError(LorakitError, TypeError):
    """A LorakitError that is also a TypeError: this kind of module cannot do what was asked (PEFT raises
    TypeError there, e.g. mixed-adapter batches through nn.MultiheadAttention)."""


class MergeError(LorakitError, RuntimeError):
    """A LorakitError that is also a RuntimeError: a merge that cannot be done (PEFT raises RuntimeError)."""
