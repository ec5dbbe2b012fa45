"""The error types of the harness: a config refused at start, a combination that cannot run, a
diverged run, a sweep refused before its first job. Re-exported where they were first defined
(``normzoo.config``, ``normzoo.train``)."""

from __future__ import annotations

__all__ = ["ConfigError", "Diverged", "InvalidCombination", "SweepRejected"]


class ConfigError(ValueError):
    """A config value that is out of range or does not fit the registry; names the key."""


class InvalidCombination(ValueError):
    """A combination of valid settings that cannot run (InstanceNorm on dense features, GroupNorm
    groups not dividing a layer's width, ...). A run records it as status ``invalid`` with this
    message, before any training."""


class Diverged(RuntimeError):
    """The training loss became NaN or inf at ``step`` (0-based global optimizer step)."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"loss is {loss} at step {step}")
        self.step = step


class SweepRejected(SystemExit):
    """A multirun refused before its first job. A ``SystemExit`` (exit status 1, the message on
    stderr) because Hydra turns an ``Exception`` raised in a callback into a warning and goes on."""

    def __init__(self, message: str) -> None:
        super().__init__(f"normzoo-train: error: {message}")
