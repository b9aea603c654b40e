"""``run_http``: the HTTP server's process, a role of ``qcnode serve`` (uvicorn, one event loop).

It runs apart from the SCP processes so that HTTP never competes with C-STORE receiving for a GIL.
``serve`` binds the socket itself (``http_socket``: a port in use ends ``serve`` at once with one
line) and hands it to this process, which keeps it across restarts.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Any

from qcnode.config import Config
from qcnode.config_checks import is_loopback
from qcnode.log import configure_logging, get_logger

log = get_logger("qcnode.http")
GRACEFUL_SHUTDOWN_S = 25  # SIGTERM: in-flight requests get this long to finish (serve waits 35 s)


def http_socket(cfg: Config) -> socket.socket:
    """A listening TCP socket on ``http.host:http.port`` (raises OSError, e.g. the port in use)."""
    host = cfg.http.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, cfg.http.port), family=family, backlog=256)


def run_http(cfg: Config, stop: threading.Event | None = None, ready: Any = None,
             sock: socket.socket | None = None, process_setup: bool = True) -> int:
    """Serve HTTP until SIGTERM/SIGINT or ``stop``; returns the exit code.

    ``ready`` (an Event) is set once requests are served; ``sock``: the listening socket (else bound
    here); ``process_setup``: set umask, logging and pydicom's reading mode as ``serve`` does (False
    when run in a thread of another program, e.g. a test)."""
    import pydicom.config
    import uvicorn

    from qcnode.db.engine import make_engine, session_factory
    from qcnode.http.app import HttpNode, create_app
    from qcnode.http.auth import auth_required
    from qcnode.ingest.spool import Spool

    if process_setup:
        os.umask(0o077)
        configure_logging(cfg.logging.level, cfg.path(cfg.logging.file) if cfg.logging.file else None)
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE  # as the SCP reads (see daemon)
    stop = stop or threading.Event()
    sock = sock or http_socket(cfg)
    engine = make_engine(cfg.database_url)
    node = HttpNode(cfg, session_factory(engine),
                    Spool(cfg.path(cfg.storage.spool_dir), cfg.path(cfg.storage.quarantine_dir)), engine)
    http = cfg.http
    tls = {"ssl_certfile": str(cfg.path(http.tls_cert)), "ssl_keyfile": str(cfg.path(http.tls_key))} \
        if http.tls_cert else {}
    server = uvicorn.Server(uvicorn.Config(
        create_app(node), host=http.host, port=http.port, log_config=None, access_log=False, server_header=False,
        lifespan="off", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, root_path=http.root_path, **tls))
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises a SIGTERM it handled once it is done: let that end this function, not the process
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _s, _f: stop.set())

    def watch() -> None:
        announced = False
        while not stop.wait(0.1):
            if server.started and not announced:
                announced = True
                if ready is not None:
                    ready.set()
                log.info("http_listening", host=http.host, port=sock.getsockname()[1], tls=bool(http.tls_cert),
                         tokens_required=auth_required(http), max_body_mb=http.max_body_mb)
        server.should_exit = True
    threading.Thread(target=watch, name="http-stop", daemon=True).start()
    if not http.tls_cert and not is_loopback(http.host):
        log.warning("http_without_tls", host=http.host, note="bearer tokens and instances cross the network in clear")
    try:
        server.run(sockets=[sock])
    finally:
        stop.set()
        node.close()
        engine.dispose()
        log.info("http_stopped", stored=node.stow.stored, refused=node.stow.refused)
    return 0 if server.started else 1
