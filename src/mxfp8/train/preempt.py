"""Graceful stop on SIGTERM / SIGINT: finish the step, checkpoint, exit 143 / 130.

Schedulers preempt a job with SIGTERM (then SIGKILL after a grace period); a person stops one
with Ctrl-C (SIGINT). The first signal only sets a flag: the loop finishes the optimizer step
it is in, writes a checkpoint and returns, and the CLI prints the resume command and exits
with 128 + the signal number (143, 130), as a shell reports a killed job. A second signal
means "now": :class:`Aborted` is raised wherever the main thread is. That is safe because a
checkpoint becomes visible only by an atomic rename, so an aborted write leaves the previous
checkpoint in place.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Aborted(BaseException):
    """A second stop signal arrived: stop immediately (BaseException, like KeyboardInterrupt,
    so that broad ``except Exception`` blocks do not swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"aborted by a second {signal.Signals(signum).name}")
        self.signum = signum


class StopRequest:
    """The stop signal received so far (``None``: keep going)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        return 128 + self.signum if self.signum is not None else 0

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise Aborted(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, SIGTERM and SIGINT set the yielded :class:`StopRequest` (a second one
    raises :class:`Aborted`); the previous handlers come back afterwards. Outside the main
    thread (where Python cannot install handlers) the request simply never fires."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
