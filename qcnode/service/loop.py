"""``ServiceLoop``: one background loop of ``serve`` (tracker, worker, outbox).

Each stage offers a ``run_once``-style step (True: there may be more work now); the loop calls it
until ``stop`` is set, waits ``interval`` seconds whenever a step found nothing to do or failed,
and logs a failed step instead of dying, so a database hiccup costs one interval, not the thread.
``stop`` is only checked between steps: a step interrupted by shutdown keeps its lease.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from qcnode.log import get_logger

log = get_logger("qcnode.service.loop")


@dataclass(frozen=True)
class ServiceLoop:
    """Call ``step`` until ``stop`` is set; ``setup`` runs once first, in the loop's thread."""
    name: str  # thread name; the error event is ``<name>_error`` unless ``error_event`` is given
    step: Callable[[], Any]  # truthy: busy, call again at once; falsy: wait ``interval``
    interval: float
    setup: Callable[[], Any] | None = None  # e.g. load the model (an exception here ends the loop)
    error_event: str = ""

    def run(self, stop: threading.Event) -> None:
        """Run in the calling thread until ``stop`` is set."""
        if self.setup is not None:
            self.setup()
        event = self.error_event or f"{self.name}_error"
        while not stop.is_set():
            try:
                busy = self.step()
            except Exception as exc:  # noqa: BLE001 - keep the loop alive, log the error
                log.error(event, error=f"{type(exc).__name__}: {exc}")
                busy = False
            if not busy:
                stop.wait(self.interval)

    def start(self, stop: threading.Event) -> threading.Thread:
        """Run in a new daemon thread named ``name``; returns the thread."""
        thread = threading.Thread(target=self.run, args=(stop,), name=self.name, daemon=True)
        thread.start()
        return thread
