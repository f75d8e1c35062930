"""The typed errors tiermap raises. Every message names the culprit and the fix."""

from __future__ import annotations


class TiermapError(Exception):
    """Base class of every error tiermap raises on purpose."""


class HardwareSpecError(TiermapError):
    """A target file or target name is wrong. Lists every problem found, each with its key path."""

    def __init__(self, problems: list[str] | str, source: str = "target") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n{lines}")


class UnsupportedProgramError(TiermapError):
    """The program uses what tiermap cannot represent (dynamic shapes, unknown dialects ...)."""


class InfeasiblePlacementError(TiermapError):
    """No placement fits the target: names the tensor, its shape, the step and the capacities."""


class PassError(TiermapError):
    """A compiler pass failed; names the pass."""

    def __init__(self, pass_name: str, message: str) -> None:
        self.pass_name = pass_name
        super().__init__(f"pass '{pass_name}' failed: {message}")


class ChoiceError(TiermapError, ValueError):
    """An option (of `plan`, `jit`, the CLI or a pass) is not one of its choices; names the option,
    the value given and what is accepted."""


class UserCodeError(TiermapError):
    """The user's own function raised while tiermap traced it; wraps the original exception."""

    def __init__(self, where: str, original: BaseException) -> None:
        self.where = where
        self.original = original
        super().__init__(f"{where} raised {type(original).__name__}: {original}")
