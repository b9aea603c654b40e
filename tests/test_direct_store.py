"""C-STOREs served in the DUL thread (qcnode.net.direct_store): same bytes on the wire as
pynetdicom, same results, and pynetdicom still serves everything else."""
from __future__ import annotations

import io
import struct
import time

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification
from sqlalchemy import func, select

from daemon_helpers import copy_series, storescu
from qcnode.db.models import Instance
from qcnode.net.direct_store import (StoreCommand, _store_response_size, encode_store_response,
                                         parse_store_command)
from test_scp import start_node  # noqa: F401 - the fixture

CT = "1.2.840.10008.5.1.4.1.1.2"


def _command_set(primitive, message_class) -> bytes:
    """The encoded command set pynetdicom sends for ``primitive``."""
    msg = message_class()
    msg.primitive_to_message(primitive)
    (pdata, *_) = list(msg.encode_msg(1, 0))
    (context_id, data), *_ = pdata.presentation_data_value_list
    assert data[0] == 0x03
    return bytes(data[1:])


def _store_rq(sop_uid: str, move_ae: str | None = None, message_id: int = 7) -> C_STORE:
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = CT
    req.AffectedSOPInstanceUID = sop_uid
    req.Priority = 2
    if move_ae:
        req.MoveOriginatorApplicationEntityTitle = move_ae
        req.MoveOriginatorMessageID = 3
    req.DataSet = io.BytesIO(b"\x00")  # any data set: CommandDataSetType says one follows
    return req


@pytest.mark.parametrize("status", [0x0000, 0xB007, 0xA700, 0xC004, 0x0122])
@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45", None])
def test_store_response_matches_pynetdicoms_encoder(status, sop_uid):
    sop_uid = sop_uid or generate_uid()
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 65535
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = sop_uid
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (pdata,) = list(msg.encode_msg(5, 16384))
    pdu = P_DATA_TF()
    pdu.from_primitive(pdata)
    assert encode_store_response(5, 65535, CT, sop_uid, status) == pdu.encode()
    # the size checked against the peer's maximum PDU before a C-STORE is taken, computed without encoding
    assert _store_response_size(StoreCommand(65535, CT, sop_uid, 2, True)) == len(pdu.encode())


@pytest.mark.parametrize("move_ae", [None, "MOVER"])
@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45"])
def test_store_command_parser_reads_what_pynetdicom_writes(move_ae, sop_uid):
    cmd = parse_store_command(_command_set(_store_rq(sop_uid, move_ae), C_STORE_RQ))
    assert cmd is not None
    assert (cmd.message_id, cmd.sop_class_uid, cmd.sop_instance_uid, cmd.priority, cmd.has_data_set) == \
        (7, CT, sop_uid, 2, True)
    assert (cmd.move_originator_ae, cmd.move_originator_message_id) == ((move_ae, 3) if move_ae else (None, None))


def test_store_command_parser_refuses_everything_else():
    good = _command_set(_store_rq("1.2.3.4"), C_STORE_RQ)
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = Verification
    assert parse_store_command(_command_set(echo, C_ECHO_RQ)) is None           # another command
    assert parse_store_command(good[:-3]) is None                               # truncated value
    assert parse_store_command(good + b"\x00") is None                          # trailing bytes
    extra = struct.pack("<HHL", 0x0000, 0x0902, 4) + b"oops"                   # Error Comment: not in a C-STORE-RQ
    assert parse_store_command(good + extra) is None
    assert parse_store_command(good + good[12:30]) is None                      # an element twice
    assert parse_store_command(struct.pack("<HHL", 0x0008, 0x0016, 2) + b"1\x00") is None  # not group 0000


def test_storescu_slices_are_served_in_the_dul_thread(start_node, port, shared_ct, tmp_path):  # noqa: F811
    scp, sf, _ = start_node()
    files = copy_series(shared_ct / "philips_head_phantom", tmp_path / "a", n=4)
    assert storescu(port, files).returncode == 0
    assert scp.direct_stores == 4 and scp.stored == 4
    with sf() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 4
    mr = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
    assert int(assoc.send_c_store(mr).Status) == 0x0122  # refused with its status, on the same path
    assoc.release()
    assert scp.direct_stores == 5 and scp.refused == 1


def _p_data_tf(*items: tuple[int, bytes]) -> bytes:
    body = b"".join(struct.pack(">LB", len(data) + 1, cid) + data for cid, data in items)
    return struct.pack(">BBL", 0x04, 0x00, len(body)) + body


def test_unusual_p_data_goes_to_pynetdicom_unchanged(start_node, port, shared_ct):  # noqa: F811
    """A command set split over two PDUs is left to pynetdicom; a PDU holding a whole C-STORE and
    the start of the next message is served here up to the end of the C-STORE, the rest by
    pynetdicom. Every request gets its response, every slice is stored."""
    scp, sf, _ = start_node()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
    assert assoc.is_established
    ct_cx = next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage)
    echo_cx = next(c.context_id for c in assoc.accepted_contexts if c.abstract_syntax == Verification)
    slices = []
    for path in sorted((shared_ct / "philips_head_phantom").glob("I*.dcm"))[:2]:
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = generate_uid()
        slices.append((ds.SOPInstanceUID, encode(ds, True, True)))
    send = assoc.dul.socket.send
    # hold the requestor's reactor (as pynetdicom's send_c_* do), so that this test reads the responses
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)

    def response():
        cid, msg = assoc.dimse.get_msg(block=True)
        assert msg is not None
        return cid, msg

    # 1. the command set in two fragments, two PDUs: pynetdicom assembles and serves it
    uid, data = slices[0]
    command = _command_set(_store_rq(uid, message_id=11), C_STORE_RQ)
    send(_p_data_tf((ct_cx, b"\x01" + command[:40])))
    send(_p_data_tf((ct_cx, b"\x03" + command[40:])))
    send(_p_data_tf((ct_cx, b"\x02" + data)))
    cid, msg = response()
    assert (cid, msg.MessageIDBeingRespondedTo, msg.Status, msg.AffectedSOPInstanceUID) == (ct_cx, 11, 0, uid)
    assert scp.direct_stores == 0 and scp.stored == 1

    # 2. command + data set + the next message (a C-ECHO-RQ) in one PDU
    uid, data = slices[1]
    echo = C_ECHO()
    echo.MessageID = 13
    echo.AffectedSOPClassUID = Verification
    send(_p_data_tf((ct_cx, b"\x03" + _command_set(_store_rq(uid, message_id=12), C_STORE_RQ)),
                    (ct_cx, b"\x00" + data[:1000]), (ct_cx, b"\x02" + data[1000:]),
                    (echo_cx, b"\x03" + _command_set(echo, C_ECHO_RQ))))
    got = {msg.MessageIDBeingRespondedTo: (cid, msg.Status) for cid, msg in (response(), response())}
    assert got == {12: (ct_cx, 0), 13: (echo_cx, 0)}
    assert scp.direct_stores == 1 and scp.stored == 2
    assoc._reactor_checkpoint.set()
    assoc.release()
    with sf() as s:
        assert set(s.scalars(select(Instance.sop_instance_uid))) == {u for u, _ in slices}


def test_every_read_of_the_receive_path_asks_for_immediate_acks():
    """FastRecvSocket requests TCP_QUICKACK before each read of a real TCP connection (delayed ACKs
    stalled one C-STORE in 13 by 40 ms); the PDU bytes come through unchanged."""
    import socket

    from qcnode.net.pdu import FastRecvSocket
    if not hasattr(socket, "TCP_QUICKACK"):
        pytest.skip("TCP_QUICKACK is Linux only")
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()

    class Recorded:  # the real socket, with its option calls written down
        def __init__(self, sock):
            self.sock, self.calls = sock, []

        def setsockopt(self, *args):
            self.calls.append(("setsockopt", args))
            return self.sock.setsockopt(*args)

        def recv_into(self, *args):
            self.calls.append(("recv_into", None))
            return self.sock.recv_into(*args)

    recorded = Recorded(conn)
    fast = FastRecvSocket.__new__(FastRecvSocket)
    fast.socket = recorded
    payload = bytes(range(256)) * 64
    client.sendall(payload[:6] + payload[6:])
    assert bytes(fast.recv(6)) + bytes(fast.recv(len(payload) - 6)) == payload
    reads = [i for i, (name, _) in enumerate(recorded.calls) if name == "recv_into"]
    firsts = [reads[0]] + [b for a, b in zip(reads, reads[1:]) if b != a + 1]  # first read of each recv()
    assert len(firsts) == 2
    for i in firsts:
        assert recorded.calls[i - 1] == ("setsockopt", (socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1))
    assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
    for s in (client, conn, server):
        s.close()
