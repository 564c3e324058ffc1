"""Why a training run stopped, as exceptions the command line maps to messages and exit codes."""

from __future__ import annotations

from pathlib import Path


class TrainError(Exception):
    """A run stopped for a reason the user has to act on; the message says what and how."""


class NonFiniteError(TrainError):
    """The loss or the gradient norm was NaN/inf at ``step``."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class TrainInterrupted(TrainError):
    """Ctrl-C: the run stopped after saving a checkpoint (``checkpoint`` is None if none was)."""

    def __init__(self, message: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint
