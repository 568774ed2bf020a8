"""Preemption: SIGTERM / SIGUSR1 (SLURM's warning signal) ask the loop to checkpoint and stop.

The handler only sets a flag; the loop acts on it at the next step boundary, after all
ranks agree, so a checkpoint is never written mid-step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Context manager that installs the handlers and restores the previous ones on exit."""

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop without a real signal (e.g. from a launcher's own hook)."""
        self.received = int(signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.received = signum

    def __enter__(self) -> PreemptionFlag:
        # Handlers can only be installed from the main thread; elsewhere rely on request().
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
