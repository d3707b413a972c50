"""Exception hierarchy shared by the engine, workers and the HTTP server."""

from __future__ import annotations

import signal


class EngineError(Exception):
    """Base class for every error raised by tp_engine."""


class InvalidRequestError(EngineError, ValueError):
    """The caller sent something the engine cannot serve (bad messages, bad params)."""


class EngineTerminatedError(EngineError):
    """The engine was shut down while a request was still pending."""


class WorkerDiedError(EngineError):
    """A worker process exited unexpectedly."""

    def __init__(self, rank: int, exitcode: int | None, detail: str = "",
                 replica: int | None = None) -> None:
        self.rank = rank
        self.exitcode = exitcode
        self.detail = detail
        self.replica = replica  # its worker group, when the engine has several
        super().__init__(self._format())

    def _format(self) -> str:
        # multiprocessing reports death-by-signal as a negative exit code.
        if self.exitcode is None:
            how = "exit code unknown"
        elif self.exitcode < 0:
            try:
                how = f"killed by signal {signal.Signals(-self.exitcode).name}"
            except ValueError:
                how = f"killed by signal {-self.exitcode}"
        else:
            how = f"exit code {self.exitcode}"
        where = "" if self.replica is None else f" of replica {self.replica}"
        msg = f"worker rank {self.rank}{where} died ({how})"
        return f"{msg}: {self.detail}" if self.detail else msg


class ConfigError(EngineError, ValueError):
    """The engine cannot start as configured: a missing or unreadable checkpoint, a bad
    keyword, a tensor-parallel size that does not divide the model."""
