"""Event-driven reactors for the SCP's acceptor associations (the fast path's core).

pynetdicom runs two threads per association, and both poll: the DUL reactor sleeps 1 ms whenever
it finds nothing to do, the association reactor sleeps 1 ms before every look at its queues, so idle
associations burn CPU and every wake-up takes the GIL from the thread doing real work. Here the DUL
thread blocks in ``select`` on its socket and on a wake-up socket pair (written when a primitive is
queued for sending or the reactor is told to stop), and the association thread blocks on an Event
that the DUL thread sets after each state-machine event. Both still wake at least every
``IDLE_WAIT_S`` so that pynetdicom's timers (ARTIM, network timeout) and flags set from elsewhere keep
working. (Not ``DULServiceProvider._run_loop_delay``: that only sets the length of the polling sleep,
trading CPU for latency; it cannot make the thread wait for its socket.)

The DUL thread reads PDUs with :mod:`qcnode.net.pdu` (length limits checked before a byte of the body
is allocated, P-DATA-TF without pynetdicom's decoder; EVT_PDU_RECV is not fired for P-DATA-TF: only
pynetdicom's debug logging listens to it), and serves a P-DATA-TF that carries a plain C-STORE-RQ
itself (:mod:`qcnode.net.direct_store`) when the SCP passes its handler; everything else goes on to
pynetdicom's DIMSE layer. A PDU over its limit aborts the association as pynetdicom aborts it for an
invalid PDU (Evt19: A-ABORT, then wait for the peer to close), and whatever else the peer sends on that
connection is read and dropped in small pieces.

While a C-STORE handler runs (in the DUL thread for :mod:`direct_store`, in the association thread
otherwise) the connection is quiet because the node is busy, not the peer: the network timeout
(pynetdicom's idle timer) is held while it runs and restarted after it, so a slow handler (a long
database lock wait) still gets its response sent and keeps its association.

A connection that sends no A-ASSOCIATE-RQ (a load balancer's health check) holds an association
slot only briefly: the DUL's ARTIM timer, which pynetdicom runs for ``acse_timeout`` while it waits for
the request, runs for ``artim_timeout`` (``node.artim_timeout``) and then closes the connection; until
the request is in, a socket read (of a PDU sent in part, or a TLS handshake) also gives up after that
long; and the association thread, which pynetdicom keeps waiting for the request for ``acse_timeout``
even after the connection is gone, ends as soon as its DUL thread has ended.

The loops are pynetdicom 3.0's ``DULServiceProvider.run_reactor``, ``Association.run_reactor``
(acceptor part) and ``Association._run_reactor`` (MIT licence) with only the waits changed; they stay
in one module because the two reactors wake each other and share ``IDLE_WAIT_S``.
:func:`use_fast_receive` switches an acceptor association to them, and its socket to
:class:`~qcnode.net.pdu.FastRecvSocket`, before its threads start (``EVT_CONN_OPEN``); an association
of any other shape is left as pynetdicom made it.
"""
from __future__ import annotations

import queue
import select
import socket
import threading
import time
from typing import Any, Callable, cast

from pynetdicom import evt
from pynetdicom.association import LOGGER as ASSOC_LOGGER, Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import LOGGER as DUL_LOGGER, DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket
from pynetdicom.utils import set_timer_resolution

from qcnode.log import get_logger
from qcnode.net.direct_store import DirectStore
from qcnode.net.pdu import (PDU_HEADER, PDU_NAMES, REFUSE_ALL, FastRecvSocket, ReceivedPDataTF, pdata_length_limit,
                            pdu_length_limits, split_pdv_items)

log = get_logger("qcnode.scp")

IDLE_WAIT_S = 0.05  # longest wait without an event: the granularity of pynetdicom's timers here

_PDATA_STATES = ("Sta6", "Sta7")  # where a P-DATA-TF is valid (established; awaiting A-RELEASE-RP)
_DISCARD_READ_SIZE = 1 << 16


class EventDrivenDUL(DULServiceProvider):
    """The DUL reactor, waiting in ``select`` on its socket and its wake-up pair."""

    _wake_r: socket.socket
    _wake_w: socket.socket
    idle_timeouts: int  # waits that ended after IDLE_WAIT_S with nothing to do
    direct_store: DirectStore | None  # serves plain C-STOREs in this thread (None: all via pynetdicom)
    pdu_limits: list[int]  # longest PDU length read now, by PDU type (see pdu_length_limits)
    pdata_limit: int  # longest P-DATA-TF once established (see pdata_length_limit)
    discarding: bool  # an over-long PDU aborted the association: the rest of the input is dropped
    request_read_timeout: bool  # socket reads time out (limit_request_wait) until the A-ASSOCIATE-RQ is in

    def _setup_wakeup(self, max_pdu_size: int | None = None) -> None:
        self.idle_timeouts = 0
        self.request_read_timeout = False
        self.direct_store = None
        self.pdu_limits = pdu_length_limits()  # until established
        self.pdata_limit = pdata_length_limit(max_pdu_size)
        self.discarding = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def limit_request_wait(self, artim_timeout: float) -> None:
        """Until the A-ASSOCIATE-RQ has arrived, the ARTIM timer runs ``artim_timeout`` and a socket read
        (the rest of a PDU begun, a TLS handshake) waits at most that long: a peer that sends nothing
        or stalls half-way is dropped then."""
        self.artim_timer.timeout = artim_timeout
        raw = getattr(self.socket, "socket", None)
        if raw is not None:
            raw.settimeout(artim_timeout)
            self.request_read_timeout = True

    def _end_request_wait(self) -> None:
        """Blocking reads again (as pynetdicom) once the DUL has left Sta2 (awaiting A-ASSOCIATE-RQ)."""
        if self.state_machine.current_state == "Sta2":
            return
        self.request_read_timeout = False
        raw = getattr(self.socket, "socket", None)
        if raw is not None:
            try:
                raw.settimeout(None)
            except OSError:  # closed meanwhile
                pass

    def wake(self) -> None:
        """Make the reactor look at its queues and flags now."""
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed (the reactor has ended)
            pass

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self.wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self.wake()
            while self.is_alive():
                time.sleep(0.001)
            return True
        return False

    def _wait_for_work(self) -> None:
        """Block until the socket has data, a wake-up arrives, or IDLE_WAIT_S passes."""
        waitables: list[Any] = [self._wake_r]
        assoc_socket = self.socket
        if assoc_socket is not None and assoc_socket._is_connected and assoc_socket.socket is not None:  # noqa: SLF001
            waitables.append(assoc_socket.socket)
        try:
            ready, _, _ = select.select(waitables, [], [], IDLE_WAIT_S)
        except (OSError, ValueError):  # the socket closed under us: the loop's own check reports it
            return
        if not ready:
            self.idle_timeouts += 1
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:  # drained
                pass

    def _read_pdu_data(self) -> None:
        """pynetdicom's PDU reader (same events on the same errors), P-DATA-TF without its decoder."""
        sock = cast(Any, self.socket)
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError) as exc:
            self._connection_lost(exc)
            return
        if len(header) != 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, pdu_length = PDU_HEADER.unpack(header)
        if pdu_length > self.pdu_limits[pdu_type] and not self._admit_pdu(pdu_type, pdu_length):
            return  # unknown type (limit -1), too long, or input being dropped
        try:
            body = sock.recv(pdu_length)
        except (OSError, TimeoutError) as exc:
            self._connection_lost(exc)
            return
        if len(body) != pdu_length:
            DUL_LOGGER.error(f"The received PDU is shorter than expected ({6 + len(body)} of "
                             f"{6 + pdu_length} bytes received)")
            self.event_queue.put("Evt17")
            return
        try:
            if pdu_type == 0x04:
                # (no EVT_PDU_RECV: only pynetdicom's debug logging listens to it, and it knows
                # P_DATA_TF objects only; the node binds EVT_C_STORE etc.)
                items = split_pdv_items(memoryview(body))
                if self.direct_store is not None:
                    items = self.direct_store.feed(items)  # plain C-STOREs are served right here
                    if not items:
                        return
                pdu: Any = ReceivedPDataTF(items)
                event = "Evt10"
            else:
                pdu, event = self._decode_pdu(header + body)
            self.event_queue.put(event)
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: an undecodable PDU is Evt19
            DUL_LOGGER.error("Unable to decode the received PDU data")
            DUL_LOGGER.exception(exc)
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    def _admit_pdu(self, pdu_type: int, pdu_length: int) -> bool:
        """For a PDU header over ``pdu_limits``: True to read the PDU after all (the first long
        P-DATA-TF of an established association: the limits are raised), else False after
        queuing the event: an unknown type (as pynetdicom: Evt19), a length over the limit (Evt19,
        and the rest of the connection's input is dropped), or nothing for input after that."""
        if self.discarding:
            self._discard_input()
            return False
        limit = self.pdu_limits[pdu_type]
        if limit < 0:
            DUL_LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
            self.event_queue.put("Evt19")
            return False
        if pdu_type == 0x04 and limit < self.pdata_limit and self.state_machine.current_state in _PDATA_STATES:
            self.pdu_limits = pdu_length_limits(self.pdata_limit)  # established: P-DATA may be long now
            limit = self.pdata_limit
            if pdu_length <= limit:
                return True
        try:
            address = str(self.assoc.requestor.address)
        except (ValueError, AttributeError):
            address = None
        log.error("association_aborted", reason="PDU longer than allowed", pdu_type=PDU_NAMES[pdu_type],
                  pdu_length=pdu_length, max_length=limit, source_ip=address)
        # the body is never read: the stream is out of step, so nothing after this header is a PDU
        self.discarding = True
        self.pdu_limits = REFUSE_ALL
        self.event_queue.put("Evt19")  # A-ABORT to the peer (and A-P-ABORT to the user when established)
        return False

    def _discard_input(self) -> None:
        """Drop what the peer has sent (in pieces of 64 KiB) without waiting for more."""
        sock = cast(Any, self.socket)
        try:
            if not sock.ready:
                return
            raw = sock.socket
            if raw is None or not raw.recv(_DISCARD_READ_SIZE):
                self.event_queue.put("Evt17")  # the peer closed
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")

    def _connection_lost(self, exc: BaseException) -> None:
        DUL_LOGGER.error("Connection closed before the entire PDU was received")
        DUL_LOGGER.exception(exc)
        self.event_queue.put("Evt17")  # transport connection closed

    def _wake_association(self) -> None:
        wake = getattr(self.assoc, "wake", None)
        if wake is not None:
            wake()

    def run(self) -> None:
        # the Thread was made with target=<the original run_reactor>, bound before the class switch
        self.run_reactor()

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop, waiting in ``_wait_for_work`` instead of sleeping 1 ms."""
        try:
            self._run_reactor_loop()
        finally:
            self._wake_association()
            for sock in (self._wake_r, self._wake_w):
                sock.close()

    def _run_reactor_loop(self) -> None:
        self._idle_timer.start()
        self.socket = cast(Any, self.socket)
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():  # noqa: SLF001
                self.assoc._dul_ready.set()  # noqa: SLF001
            if idle:
                self._wait_for_work()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - as pynetdicom: abort, bypassing the state machine
                DUL_LOGGER.error("Exception in DUL.run(), aborting association")
                DUL_LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True  # noqa: SLF001
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            if self.request_read_timeout:
                self._end_request_wait()
            self._wake_association()  # it may have queued a DIMSE message or an ACSE primitive
            idle = False


class EventDrivenAssociation(Association):
    """An acceptor association whose reactor waits on an Event set by its DUL thread."""

    _wakeup: threading.Event
    idle_timeouts: int  # waits that ended after IDLE_WAIT_S without a wake-up

    def _setup_wakeup(self) -> None:
        self.idle_timeouts = 0
        self._wakeup = threading.Event()

    def wake(self) -> None:
        """Make the reactor look at its queues and flags now."""
        self._wakeup.set()

    def kill(self) -> None:
        self._kill = True
        self.wake()
        super().kill()

    def run(self) -> None:
        # the Thread was made with target=<the original run_reactor>, bound before the class switch
        self.run_reactor()

    def run_reactor(self) -> None:
        """pynetdicom's acceptor run: wait for the A-ASSOCIATE-RQ, negotiate, serve; the wait ends
        when the DUL thread ends (the peer closed the connection, or the ARTIM timer expired)."""
        if not self._started_dul:
            self.dul.start()
            self._started_dul = True
            self._dul_ready.wait()
        primitive = self._wait_for_association_request()
        if primitive is None:  # no A-ASSOCIATE-RQ
            self.kill()
        else:
            self.requestor.primitive = primitive
            evt.trigger(self, evt.EVT_REQUESTED, {})
            if not self.is_aborted and not self.is_rejected:  # (a handler may have sent either)
                self.acse.negotiate_association()
            if self.is_established:
                with set_timer_resolution(self._timer_resolution):
                    self._run_reactor()
        sock = cast(AssociationSocket, self.dul.socket)
        if self._server and sock.socket:  # as pynetdicom: make sure the connection is shut down
            self._server.shutdown_request(sock.socket)

    def _wait_for_association_request(self) -> A_ASSOCIATE | None:
        """The A-ASSOCIATE primitive from the DUL, or None once the DUL thread has ended without one
        or ``acse_timeout`` has passed (pynetdicom waits ``acse_timeout`` in any case)."""
        timeout = self.acse_timeout
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        while True:
            self._wakeup.clear()  # before looking: a wake-up after this point is not lost
            primitive = self.dul.receive_pdu(wait=False)
            if primitive is not None:
                return cast(A_ASSOCIATE, primitive)
            if self._kill or not self.dul.is_alive() or time.monotonic() >= deadline:
                return cast("A_ASSOCIATE | None", self.dul.receive_pdu(wait=False))  # one queued just before
            if not self._wakeup.wait(IDLE_WAIT_S):
                self.idle_timeouts += 1

    def _serve_request(self, msg: Any, context_id: int) -> None:
        """pynetdicom's dispatch, except that a C-STORE of a SOP class pynetdicom has no storage
        service for (an unknown or private UID) goes to the storage service too, whose handler
        refuses it with 0x0122, instead of an A-ABORT. (Not ``_config.UNRESTRICTED_STORAGE_SERVICE``:
        it is process-wide and also makes negotiation accept every private or unknown abstract syntax.)"""
        if (isinstance(msg, C_STORE) and context_id in self._accepted_cx
                and uid_to_service_class(msg.AffectedSOPClassUID or "") is not StorageServiceClass
                and not self.acceptor.accepted_common_extended):
            self.dimse.cancel_req = {}
            self._is_paused = True
            try:
                StorageServiceClass(self).SCP(msg, self._accepted_cx[context_id])
            except Exception as exc:  # noqa: BLE001 - as pynetdicom: log and abort
                ASSOC_LOGGER.exception(exc)
                self.abort()
            finally:
                self._is_paused = False
                self.dimse.cancel_req = {}
            return
        super()._serve_request(msg, context_id)

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop, waiting on the wake-up Event instead of sleeping 1 ms."""
        self._is_paused = False
        while not self._kill:
            if not self._wakeup.wait(IDLE_WAIT_S):
                self.idle_timeouts += 1
            self._wakeup.clear()  # before looking: a wake-up after this point is not lost
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                # the handler's time is no idle time of the peer's (pynetdicom would abort right
                # after the response when a handler outlasts the network timeout)
                self.dul._idle_timer.stop()  # noqa: SLF001
                try:
                    self._serve_request(msg, cast(int, context_id))
                finally:
                    self.dul._idle_timer.restart()  # noqa: SLF001
                self._wakeup.set()  # look again at once: more may have arrived meanwhile
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                ASSOC_LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                ASSOC_LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                ASSOC_LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def use_fast_receive(assoc: Any, store_handler: Callable[[Any], int] | None = None,
                     artim_timeout: float | None = None) -> bool:
    """Switch a not yet started acceptor association to :class:`FastRecvSocket` and the
    event-driven reactors (call it from ``EVT_CONN_OPEN``). With ``store_handler`` (the node's
    ``EVT_C_STORE`` handler) plain C-STOREs are served in the DUL thread (:mod:`direct_store`);
    with ``artim_timeout`` a connection is dropped when its A-ASSOCIATE-RQ is not in after that long
    (:meth:`EventDrivenDUL.limit_request_wait`).

    Returns False (and changes nothing) for anything but a plain pynetdicom acceptor whose
    threads have not started."""
    dul = getattr(assoc, "dul", None)
    if type(assoc) is not Association or type(dul) is not DULServiceProvider:
        return False
    if not assoc.is_acceptor or assoc.is_alive() or dul.is_alive():
        return False
    if type(dul.socket) is AssociationSocket:  # a TLS or custom socket is kept as it is
        dul.socket.__class__ = FastRecvSocket
    dul.__class__ = EventDrivenDUL
    # pynetdicom makes it a non-daemon thread: one waiting for a peer that never speaks or closes
    # (up to acse_timeout / network_timeout) kept the process alive after a graceful stop
    dul.daemon = True
    cast(EventDrivenDUL, dul)._setup_wakeup(assoc.acceptor.maximum_length)  # noqa: SLF001
    if artim_timeout is not None:
        cast(EventDrivenDUL, dul).limit_request_wait(artim_timeout)
    if store_handler is not None:
        cast(EventDrivenDUL, dul).direct_store = DirectStore(dul, store_handler)
    assoc.__class__ = EventDrivenAssociation
    cast(EventDrivenAssociation, assoc)._setup_wakeup()  # noqa: SLF001
    return True
