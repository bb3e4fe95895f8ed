"""A bounded SIGTERM: the worker exits within SHUTDOWN_TIMEOUT_SECONDS, whatever it waits on.

Faust's own stop sequence stops intake, lets the agent's in-flight batch finish or be
cancelled (an unacked batch is redelivered to whoever owns the partition next and applied
once: every write is idempotent), commits what was processed and leaves the group. With the
broker or Redis unreachable at that moment, parts of that sequence wait on network timeouts
far longer than an orchestrator's grace period (Kubernetes SIGKILLs after 30 s). A watchdog
thread started at the first SIGTERM/SIGINT ends the process at the bound instead, after a
log line saying so; what was not committed is redelivered, exactly as after a SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

import faust

log = logging.getLogger(__name__)


def die(message: str, code: int = 4) -> None:
    """Stop the process now with a critical log line (nothing in hand was acked: like SIGKILL)."""
    log.critical(message)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(code)


def force_exit_after(seconds: float, started: float) -> threading.Thread:
    """A daemon thread that ends the process ``seconds`` after ``started`` (monotonic)."""

    def watchdog() -> None:
        remaining = seconds - (time.monotonic() - started)
        if remaining > 0:
            time.sleep(remaining)
        log.error(
            "shutdown did not finish within SHUTDOWN_TIMEOUT_SECONDS; exiting now (records not "
            "yet committed are redelivered and applied once)",
            extra={"shutdown_timeout_s": seconds},
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(3)

    thread = threading.Thread(target=watchdog, name="shutdown-watchdog", daemon=True)
    thread.start()
    return thread


class Worker(faust.Worker):
    """faust.Worker whose shutdown on a signal is bounded by ``shutdown_timeout`` seconds."""

    def __init__(self, *args: Any, shutdown_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shutdown_timeout = shutdown_timeout
        self._watchdog: threading.Thread | None = None

    def _schedule_shutdown(self, signal: signal.Signals) -> None:
        if self._watchdog is None:
            log.info(
                "shutting down",
                extra={"signal": signal.name, "shutdown_timeout_s": self.shutdown_timeout},
            )
            self._watchdog = force_exit_after(self.shutdown_timeout, time.monotonic())
        super()._schedule_shutdown(signal)
