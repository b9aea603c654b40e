"""C-STORE served in the DUL thread: the command set parsed and the response encoded by hand.

pynetdicom passes every received P-DATA-TF through its state machine to the DIMSE layer, which
decodes the command set with pydicom and queues the message for the association thread; that
thread runs the service class, triggers ``EVT_C_STORE``, and builds and encodes the C-STORE-RSP
with pydicom again, then hands it back to the DUL thread to send: much Python, and two thread
hand-offs, around a handler that does the real work. :class:`DirectStore` does the same steps for a
plain C-STORE-RQ inside the DUL thread: it reads the command set itself (Implicit VR Little Endian,
group 0000 only), collects the data set fragments, calls the node's C-STORE handler with the same
``Event`` pynetdicom would give it, and writes the C-STORE-RSP PDU to the socket, byte for byte what
pynetdicom would send.

Anything it does not recognise goes to pynetdicom unchanged: a command set split over several
PDUs, any DIMSE message but a C-STORE-RQ with a data set, a command set with elements beyond
those of a C-STORE-RQ, a presentation context that was not accepted, SOP Class extended
negotiation, a response larger than the peer's maximum PDU, and anything outside the
established state (Sta6). The fallback decision is made before a byte is consumed, so pynetdicom
then sees exactly what it would have seen. Unlike pynetdicom it serves a C-STORE-RQ whatever its
SOP Class UID or UID lengths, so that the handler answers a SOP class that is not the context's
with 0x0122 and an over-long UID with 0xC001 (pynetdicom aborts the association for both).

While the handler runs the association's idle timer (the network timeout) is held, and it is
restarted once the response is sent: the DUL thread reads nothing meanwhile, and a handler that
outlasts the network timeout (a long database lock wait) must still get its Success to the peer,
as on pynetdicom's path, instead of the association thread aborting the association under it.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any, Callable

from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

from qcnode.log import get_logger

log = get_logger("qcnode.scp")

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101
MAX_UID_LENGTH = 64
HANDLER_ERROR = 0xC211  # pynetdicom's status for an exception in the EVT_C_STORE handler

_ELEMENT = struct.Struct("<HHL")
_US = struct.Struct("<H")
# (0000,eeee) elements a C-STORE-RQ may carry (PS3.7 9.3.1.1), by element number
_GROUP_LENGTH, _SOP_CLASS, _COMMAND_FIELD, _MESSAGE_ID = 0x0000, 0x0002, 0x0100, 0x0110
_PRIORITY, _DATA_SET_TYPE, _SOP_INSTANCE = 0x0700, 0x0800, 0x1000
_MOVE_AE, _MOVE_MESSAGE_ID = 0x1030, 0x1031
_US_ELEMENTS = {_COMMAND_FIELD, _MESSAGE_ID, _PRIORITY, _DATA_SET_TYPE, _MOVE_MESSAGE_ID}
_TEXT_ELEMENTS = {_SOP_CLASS, _SOP_INSTANCE, _MOVE_AE}


@dataclass
class StoreCommand:
    """The fields of a received C-STORE-RQ command set."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    priority: int
    has_data_set: bool
    move_originator_ae: str | None = None
    move_originator_message_id: int | None = None


def parse_store_command(data: bytes | memoryview) -> StoreCommand | None:
    """The C-STORE-RQ in an encoded command set, or None if it is anything else (another
    command, an element a C-STORE-RQ does not have, a malformed or truncated element)."""
    values: dict[int, Any] = {}
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 8:
            return None
        group, element, length = _ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0x0000 or offset + length > end or element in values:
            return None
        raw = bytes(data[offset:offset + length])
        offset += length
        if element in _US_ELEMENTS:
            if length != 2:
                return None
            values[element] = _US.unpack(raw)[0]
        elif element in _TEXT_ELEMENTS:
            try:
                values[element] = raw.decode("ascii").rstrip("\x00 ")
            except UnicodeDecodeError:
                return None
        elif element != _GROUP_LENGTH:
            return None
        else:
            values[element] = raw
    required = (_COMMAND_FIELD, _MESSAGE_ID, _SOP_CLASS, _SOP_INSTANCE, _PRIORITY, _DATA_SET_TYPE)
    if values.get(_COMMAND_FIELD) != C_STORE_RQ or any(k not in values for k in required):
        return None
    return StoreCommand(message_id=values[_MESSAGE_ID], sop_class_uid=values[_SOP_CLASS],
                        sop_instance_uid=values[_SOP_INSTANCE], priority=values[_PRIORITY],
                        has_data_set=values[_DATA_SET_TYPE] != NO_DATA_SET,
                        move_originator_ae=values.get(_MOVE_AE) or None,
                        move_originator_message_id=values.get(_MOVE_MESSAGE_ID))


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\x00" if len(value) % 2 else value


def encode_store_response(context_id: int, message_id: int, sop_class_uid: str, sop_instance_uid: str,
                          status: int) -> bytes:
    """The P-DATA-TF PDU of a C-STORE-RSP (one command PDV, last fragment), as pynetdicom encodes it.
    A UID longer than 64 characters is left out (both are optional in the response, PS3.7 9.3.1.2):
    echoed, it would make the peer's DIMSE decoder abort instead of reading the 0xC001."""
    def uid_element(element: int, uid: str) -> bytes:
        return _element(element, _uid_value(uid)) if len(uid) <= MAX_UID_LENGTH else b""
    body = b"".join((
        uid_element(_SOP_CLASS, sop_class_uid),
        _element(_COMMAND_FIELD, _US.pack(C_STORE_RSP)),
        _element(0x0120, _US.pack(message_id)),  # Message ID Being Responded To
        _element(_DATA_SET_TYPE, _US.pack(NO_DATA_SET)),
        _element(0x0900, _US.pack(status)),       # Status
        uid_element(_SOP_INSTANCE, sop_instance_uid)))
    command = _element(_GROUP_LENGTH, struct.pack("<L", len(body))) + body
    pdv = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBL", 0x04, 0x00, len(pdv)) + pdv


def _store_response_size(command: StoreCommand) -> int:
    """Bytes of the C-STORE-RSP P-DATA-TF PDU for ``command`` (whatever its status), without encoding it:
    the PDU and PDV headers (12), the group length (12), four 2-byte elements (40) and the two UIDs
    (an upper bound where a UID is too long to be echoed)."""
    return 64 + sum(8 + len(_uid_value(uid)) for uid in (command.sop_class_uid, command.sop_instance_uid))


class DirectStore:
    """Serves plain C-STORE-RQs of one acceptor association inside its DUL thread.

    ``feed(items)`` is given the PDV items of each received P-DATA-TF; it returns the items it
    did not take (all of them when pynetdicom must handle the PDU), which the caller hands to
    pynetdicom as usual."""

    def __init__(self, dul: Any, handler: Callable[[Any], int]):
        self.dul = dul
        self.handler = handler
        self._command: StoreCommand | None = None
        self._request_primitive: C_STORE | None = None
        self._context: Any = None
        self._chunks: list[memoryview] = []

    def feed(self, items: list[tuple[int, memoryview]]) -> list[tuple[int, memoryview]]:
        """Take what belongs to a C-STORE served here; return the rest, in order."""
        index = 0
        if self._command is None:
            if not self._start(items[0]):
                return items
            index = 1
        while index < len(items):
            context_id, data = items[index]
            if data[0] & 1:  # a command fragment inside the data set: pynetdicom calls it invalid too
                raise ValueError("command fragment received before the last data set fragment")
            self._chunks.append(data[1:])
            index += 1
            if data[0] & 2:
                self._finish()
                return items[index:]
        return []

    def _start(self, item: tuple[int, memoryview]) -> bool:
        """Begin serving the message whose command set is ``item``, if it is one served here."""
        context_id, data = item
        assoc = self.dul.assoc
        if (data[0] & 3) != 3 or self.dul.state_machine.current_state != "Sta6":
            return False
        if assoc.dimse.message is not None or assoc._sent_release:  # noqa: SLF001
            return False  # pynetdicom is assembling a message, or the association is ending
        command = parse_store_command(data[1:])
        if command is None or not command.has_data_set:
            return False
        context = assoc._accepted_cx.get(context_id)  # noqa: SLF001
        if context is None or assoc.acceptor.accepted_common_extended:
            return False
        maximum = assoc.requestor.maximum_length
        if maximum and _store_response_size(command) > maximum:
            return False
        try:
            request = self._request(command)
        except (ValueError, TypeError):
            return False
        self._command, self._request_primitive, self._context, self._chunks = command, request, context, []
        return True

    @staticmethod
    def _request(command: StoreCommand) -> C_STORE:
        """The C-STORE primitive for ``command``. The UIDs are set without pynetdicom's length
        check (pynetdicom would abort the association for a 65-character UID): the handler
        answers an invalid UID with 0xC001 itself."""
        req = C_STORE()
        req.MessageID = command.message_id
        req._affected_sop_class_uid = UID(command.sop_class_uid) or None  # noqa: SLF001
        req._affected_sop_instance_uid = UID(command.sop_instance_uid) or None  # noqa: SLF001
        req.Priority = command.priority
        if command.move_originator_ae is not None:
            req.MoveOriginatorApplicationEntityTitle = command.move_originator_ae
        if command.move_originator_message_id is not None:
            req.MoveOriginatorMessageID = command.move_originator_message_id
        return req

    def _finish(self) -> None:
        """Run the handler on the complete message and send its C-STORE-RSP."""
        command, request, context = self._command, self._request_primitive, self._context
        assert command is not None and request is not None
        request.DataSet = io.BytesIO(b"".join(self._chunks))
        self._command, self._request_primitive, self._context, self._chunks = None, None, None, []
        assoc = self.dul.assoc
        event = evt.Event(assoc, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple})
        idle_timer = self.dul._idle_timer  # noqa: SLF001
        idle_timer.stop()  # held: the association thread must not time the handler out
        try:
            try:
                status = self.handler(event)
                if not isinstance(status, int):
                    raise TypeError(f"C-STORE handler returned {type(status).__name__}, not a status")
            except Exception:  # noqa: BLE001 - as pynetdicom: the peer gets 0xC211
                log.exception("store_handler_error", sop_instance_uid=command.sop_instance_uid)
                status = HANDLER_ERROR
            if not assoc.is_established:  # aborted meanwhile (e.g. shutdown): nothing to answer
                return
            self.dul.socket.send(encode_store_response(context.context_id, command.message_id,
                                                       command.sop_class_uid, command.sop_instance_uid, status))
        finally:
            idle_timer.restart()
