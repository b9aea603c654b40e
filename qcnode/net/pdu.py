"""Reading PDUs on the fast path: one-buffer socket reads, PDU length limits, P-DATA-TF without copies.

A PDU is read into one buffer of the length its header claims, so that length is checked first
(:func:`pdu_length_limits`): until the association is established any PDU may be at most
``MAX_ASSOCIATION_PDU_LENGTH`` long (the peer has passed no allow-list yet); once it is, a P-DATA-TF
may be as long as the node's maximum PDU size plus ``PDATA_LENGTH_SLACK``, but at least
``MIN_PDATA_LENGTH_LIMIT`` (a peer that ignores the negotiated maximum and sends one slice per PDU
keeps working, as with pynetdicom); ``UNLIMITED_PDATA_LENGTH`` when that size is 0 (unlimited).

A P-DATA-TF's PDV items are cut out of the received buffer as memoryviews (:func:`split_pdv_items`)
and handed on as the same P-DATA primitive pynetdicom would make (:class:`ReceivedPDataTF`), instead
of going through pynetdicom's generic PDU decoder, which copies every item.
"""
from __future__ import annotations

import socket
import struct
from typing import Any, cast

from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

# Longest PDU bodies read (PDU length field, PS3.8 9.3); a longer one aborts the association.
MAX_ASSOCIATION_PDU_LENGTH = 1 << 20  # any PDU before establishment; A-ASSOCIATE-*, A-RELEASE-*, A-ABORT
PDATA_LENGTH_SLACK = 1 << 16  # over the node's maximum PDU size: PDU/PDV headers, peers that count differently
MIN_PDATA_LENGTH_LIMIT = 4 << 20  # a P-DATA-TF of an established association may always be this long
UNLIMITED_PDATA_LENGTH = 64 << 20  # the P-DATA-TF limit when the node's maximum PDU size is 0 (unlimited)

PDU_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LB")
_KNOWN_PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)
PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
             0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
REFUSE_ALL = [-1] * 256  # limits while the rest of a connection's input is dropped

_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def request_quick_ack(sock: Any) -> None:
    """Ask the kernel to acknowledge what arrives on ``sock`` at once instead of delaying the ACK.

    Linux falls back to delayed ACKs (up to 40 ms) on a connection that looks interactive, and
    resets this flag as it pleases, so it is set again before each read. Without it a sender that
    holds its last small segment until our ACK comes (Nagle; DCMTK's storescu does) stalls a
    C-STORE while we wait for that segment."""
    if _TCP_QUICKACK is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
    except OSError:  # not TCP (a socket pair in tests), or closed: the read reports it
        pass


class FastRecvSocket(AssociationSocket):
    """pynetdicom's association socket, reading a PDU with as few ``recv`` calls as the kernel allows.

    pynetdicom reads PDUs 4096 bytes per ``recv`` (a poll and a copy each); this reads straight
    into one buffer of the requested size, with the same result and the same errors. Each read
    first asks for immediate ACKs (:func:`request_quick_ack`)."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        request_quick_ack(sock)
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        nr_read = 0
        while nr_read < nr_bytes:
            n = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
            if not n:  # connection closed: what was read so far, as pynetdicom's recv() returns
                del view
                del buf[nr_read:]
                return buf
            nr_read += n
        return buf


def pdata_length_limit(max_pdu_size: int | None) -> int:
    """The longest P-DATA-TF PDU length read on an established association whose node negotiates
    ``max_pdu_size`` (0 or None: unlimited)."""
    if not max_pdu_size:
        return UNLIMITED_PDATA_LENGTH
    return max(max_pdu_size + PDATA_LENGTH_SLACK, MIN_PDATA_LENGTH_LIMIT)


def pdu_length_limits(pdata_limit: int = MAX_ASSOCIATION_PDU_LENGTH) -> list[int]:
    """The longest PDU length read for each PDU type byte (index 0-255; -1: unknown type):
    ``MAX_ASSOCIATION_PDU_LENGTH``, and ``pdata_limit`` for a P-DATA-TF."""
    limits = [-1] * 256
    for pdu_type in _KNOWN_PDU_TYPES:
        limits[pdu_type] = MAX_ASSOCIATION_PDU_LENGTH
    limits[0x04] = pdata_limit
    return limits


class InvalidPDU(ValueError):
    """A P-DATA-TF PDU whose PDV items do not add up to its length."""


def split_pdv_items(body: memoryview) -> list[tuple[int, memoryview]]:
    """(presentation context ID, PDV data) of each item of a P-DATA-TF PDU body (PS3.8 9.3.5),
    as views into ``body``; raises InvalidPDU if the items do not exactly fill it."""
    items: list[tuple[int, memoryview]] = []
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < 6:
            raise InvalidPDU(f"truncated PDV item at offset {offset} of {end}")
        length, context_id = _PDV_HEADER.unpack_from(body, offset)
        # length counts the context ID and the data; the data holds at least the control header
        if length < 2 or offset + 4 + length > end:
            raise InvalidPDU(f"PDV item length {length} at offset {offset} does not fit the PDU ({end} bytes)")
        items.append((context_id, body[offset + 5:offset + 4 + length]))
        offset += 4 + length
    if not items:
        raise InvalidPDU("P-DATA-TF PDU without PDV items")
    return items


class ReceivedPDataTF(P_DATA_TF):
    """A received P-DATA-TF whose PDV data are views into the receive buffer."""

    def __init__(self, items: list[tuple[int, memoryview]]):
        self._items = items
        self._item_objects: list[PresentationDataValueItem] | None = None
        super().__init__()

    @property  # type: ignore[override]
    def presentation_data_value_items(self) -> list[PresentationDataValueItem]:
        """pynetdicom's item objects, made only if something asks (debug logging)."""
        if self._item_objects is None:
            self._item_objects = []
            for context_id, data in self._items:
                item = PresentationDataValueItem()
                item.presentation_context_id = context_id
                item.presentation_data_value = bytes(data)
                self._item_objects.append(item)
        return self._item_objects

    @presentation_data_value_items.setter
    def presentation_data_value_items(self, value: list[PresentationDataValueItem]) -> None:
        if value:  # P_DATA_TF.__init__ assigns [] (nothing to keep)
            self._item_objects = value

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        primitive.presentation_data_value_list = []  # as pynetdicom: the setter checks only what it is given
        primitive.presentation_data_value_list.extend(self._items)  # type: ignore[arg-type]
        return primitive
