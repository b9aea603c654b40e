"""Starting the SCP's server on the fast path or on pynetdicom's own.

Fast path: the node's server class (:mod:`qcnode.net.listener`, optionally over a listening socket
shared with the node's other SCP processes) and, per association, the event-driven reactors with
C-STOREs served in the DUL thread (:func:`qcnode.net.reactors.use_fast_receive`, from
``EVT_CONN_OPEN``). Plain path: ``AE.start_server`` with the same handlers and nothing else; the
fast-path modules are not even imported, so a pynetdicom whose internals moved still serves.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

from pynetdicom import AE

if TYPE_CHECKING:
    from qcnode.net.listener import SharedListener


def start_server(ae: AE, address: tuple[str, int], handlers: list[Any], ssl_context: Any = None, *,
                 fast: bool, listener: SharedListener | None = None) -> Any:
    """Listen on ``address`` in a background thread and return the server (``server.shutdown()``
    stops it). ``listener`` (fast path only): serve that shared listening socket instead."""
    if not fast:
        if listener is not None:
            raise ValueError("a listening socket shared between SCP processes needs node.fast_path")
        return ae.start_server(address, block=False, ssl_context=ssl_context, evt_handlers=handlers)
    from qcnode.net.listener import NodeAssociationServer, balanced_server_class

    # what AE.start_server(block=False) does, with the node's server class
    server_class = NodeAssociationServer if listener is None else balanced_server_class(listener)
    server = ae.make_server(address, evt_handlers=handlers, ssl_context=ssl_context, server_class=server_class)
    threading.Thread(target=server.serve_forever, name="scp-acceptor", daemon=True).start()
    ae._servers.append(server)  # noqa: SLF001 - as start_server does (server.shutdown() removes it)
    return server


def use_fast_receive(assoc: Any, store_handler: Callable[[Any], int] | None, artim_timeout: float | None) -> bool:
    """Put a new acceptor association on the fast path (from ``EVT_CONN_OPEN``); see
    :func:`qcnode.net.reactors.use_fast_receive`."""
    from qcnode.net.reactors import use_fast_receive as switch
    return switch(assoc, store_handler=store_handler, artim_timeout=artim_timeout)
