"""The child processes of ``serve`` (more SCP processes, the worker side, the HTTP server):
started fresh (spawn), killed with the parent, restarted with a back-off when they exit."""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from qcnode.config import Config
from qcnode.log import get_logger

if TYPE_CHECKING:
    from qcnode.service.daemon import ChildSpec

log = get_logger("qcnode.daemon")


class ChildProcess:
    """A part of ``serve`` in a child process: more SCP processes, or the worker side.

    Started with ``multiprocessing`` (spawn: a fresh interpreter, so no GIL is shared), optionally
    niced, and killed by the kernel if this process dies (kill -9 included: PR_SET_PDEATHSIG), so a
    crash leaves no orphan behind and a dead worker's job lease is released by the next start.
    Restarted with a growing back-off if it exits on its own.
    """

    def __init__(self, cfg: Config, spec: ChildSpec, listener: Any = None):
        self.cfg = cfg
        self.spec = spec
        self.listener = listener  # an SCP child's share of the listening socket, or the HTTP socket
        self.proc: Any = None
        self.ready: Any = None
        self._restart_at = 0.0
        self._started_at = 0.0
        self._backoff = 1.0

    @property
    def role(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        self.ready = ctx.Event()
        self.proc = ctx.Process(target=_child_main, args=(self.cfg, os.getpid(), self.spec, self.listener,
                                                          self.ready),
                                name=f"qcnode-{self.role}", daemon=False)
        self.proc.start()
        self._started_at = time.monotonic()
        log.info("child_process_started", role=self.role, pid=self.proc.pid, nice=self.spec.nice)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the child runs (an SCP child: listens); False on timeout or if it died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready.wait(0.2):
                return True
            if not self.proc.is_alive():
                break
        log.error("child_process_not_ready", role=self.role, pid=self.proc.pid, exitcode=self.proc.exitcode)
        return False

    def keep_alive(self) -> None:
        """Restart the child (with a growing back-off) if it exited unexpectedly."""
        if self.proc is None or self.proc.is_alive():
            return
        now = time.monotonic()
        if not self._restart_at:  # just noticed
            if now - self._started_at > 300:  # it had run fine for a while: retry quickly
                self._backoff = 1.0
            log.error("child_process_died", role=self.role, pid=self.proc.pid, exitcode=self.proc.exitcode,
                      restart_in_s=self._backoff)
            self._restart_at = now + self._backoff
        elif now >= self._restart_at:
            self._restart_at = 0.0
            self._backoff = min(self._backoff * 2, 60.0)
            self.start()

    def terminate(self) -> None:
        """SIGTERM: the child shuts down gracefully (as ``serve`` does on SIGTERM)."""
        if self.proc is not None and self.proc.is_alive():
            self.proc.terminate()

    def join(self, timeout: float) -> None:
        """Wait for the child to exit; SIGKILL after ``timeout``."""
        if self.proc is None:
            return
        self.proc.join(timeout)
        if self.proc.is_alive():
            log.warning("child_process_killed", role=self.role, pid=self.proc.pid)
            self.proc.kill()
            self.proc.join(5)


def _child_main(cfg: Config, parent_pid: int, spec: ChildSpec, listener: Any, ready: Any) -> None:
    """Entry point of a child process of ``serve``: run ``spec.roles`` until SIGTERM."""
    _die_with_parent(parent_pid)
    if spec.nice:
        try:
            os.nice(int(spec.nice))
        except OSError:
            pass
    stop = threading.Event()

    def watch_parent() -> None:  # where PR_SET_PDEATHSIG is unavailable
        while not stop.wait(1.0):
            if os.getppid() != parent_pid:
                os._exit(1)
    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    if spec.roles.http:
        from qcnode.http.server import run_http
        raise SystemExit(run_http(cfg, stop=stop, ready=ready, sock=listener))
    from qcnode.service.daemon import ProcessPlan, run_process
    code = run_process(cfg, ProcessPlan(spec.roles, migrate_db=False), stop=stop, ready=ready, listener=listener)
    raise SystemExit(code)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
