"""Which pynetdicom the fast path was written against, and whether it may run here.

The fast path (:mod:`qcnode.net.reactors`, :mod:`qcnode.net.direct_store`,
:mod:`qcnode.net.listener`) copies or overrides pynetdicom and socketserver functions and reads
their private members, so it runs only on the pynetdicom version it was checked against
(``SUPPORTED_PYNETDICOM``). On any other version importing this module logs one warning and every
SCP takes pynetdicom's own path. ``PINNED_SOURCES`` holds a digest of the source of each function
the fast path copies, overrides or calls privately; ``tests/test_fence.py`` fails when one differs
(``python -m qcnode.net.compat`` prints the current digests).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
from typing import Any

import pynetdicom

from qcnode.log import get_logger

log = get_logger("qcnode.scp")

SUPPORTED_PYNETDICOM = "3.0.4"
PINNED_PYTHON = "3.11"  # the socketserver source below is this Python's

# "module:qualified name" -> sha256 of inspect.getsource() (a property by its accessor: ".fget")
PINNED_SOURCES: dict[str, str] = {
    # reactors.EventDrivenDUL: copies run_reactor, rewrites _read_pdu_data, overrides send_pdu/kill_dul/stop_dul
    "pynetdicom.dul:DULServiceProvider.__init__":
        "c82dafa9438ddf70685917cb15d2bfbc814aa0ad5233ffb0ae650faedc7570f0",
    "pynetdicom.dul:DULServiceProvider.run_reactor":
        "e3a10eb3a0931e4854af33b9496e92d9679522aca26b0e04da8967559b9e2803",
    "pynetdicom.dul:DULServiceProvider._read_pdu_data":
        "19f2d4e38c13c83586365d93dd5cd96a0c7c665cb37251054b3e1f246e9f431b",
    "pynetdicom.dul:DULServiceProvider._decode_pdu":
        "fc71dd1bf853e1ce79d29b11731a26a4f6ee9eb697026ad611f8fc91f8aa69c9",
    "pynetdicom.dul:DULServiceProvider._is_transport_event":
        "8725ed03bb8fbdefef249d5d9888c120e6277d7b6aa2c4f537e23027186e1253",
    "pynetdicom.dul:DULServiceProvider._process_recv_primitive":
        "4c0ebbb3e646e35e8e5bbc27ee2f1e6b2c82bbf619232f47639a6cbae092ed39",
    "pynetdicom.dul:DULServiceProvider.send_pdu":
        "7cbce5da8594124e9e70c790a68df640d21df11af4220783e752bc607de8dde6",
    "pynetdicom.dul:DULServiceProvider.kill_dul":
        "5ceccf8dd01c2072c377d18bb1be284941a345bd40f03bd1e03a864ab0817842",
    "pynetdicom.dul:DULServiceProvider.stop_dul":
        "28a7e0be126e7b306369cc1b131daec8e907d21d0f5692930133b6599b8c6e5f",
    # reactors.EventDrivenAssociation: copies run_reactor and _run_reactor, extends _serve_request and kill
    "pynetdicom.association:Association.__init__":
        "eb07516b8009ad8fa338201dea39578380fbf9f2c59fa5e368e20250eb97c4ea",
    "pynetdicom.association:Association.run_reactor":
        "ed8bbbe3b3d6ddaee3e8673ba25b2ab2a4c45f25bc1d8ae7b48ebafd09499e6d",
    "pynetdicom.association:Association._run_reactor":
        "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee",
    "pynetdicom.association:Association._serve_request":
        "2f24c1759cdf6c8c433094f2a8dd8144f76f5547f03daed7b94e0f78bc12f877",
    "pynetdicom.association:Association.kill":
        "8f9713666a7f4cffd840899f023090e9786668945a7c844f99d7a834077c3972",
    # pdu.ReceivedPDataTF, pdu.FastRecvSocket, the DUL's discard of input (ready), use_fast_receive (EVT_CONN_OPEN)
    "pynetdicom.pdu:P_DATA_TF.__init__":
        "53c967240e20d21342fe7e741979752ae6f77a630f256bc380b3ec5b4759ca1b",
    "pynetdicom.pdu:P_DATA_TF.to_primitive":
        "3cba1cd31f03fdf07cab0cdaec8eb85ae5368020e87adf46f46c375ae4ded6b8",
    "pynetdicom.transport:AssociationSocket.recv":
        "6bc20a33b1b7cfe76d4ad4407ca242563bc6206fde4b4e1cf7a2fbb1f11d621d",
    "pynetdicom.transport:AssociationSocket.ready.fget":
        "3eb58e3d39dc076df7a04c804ca183ffd3f4d1b34361039e9e6f11de3d45579c",
    "pynetdicom.transport:RequestHandler.handle":
        "034823fb4df3a87467bd0d45193f0d457fcf59c87fda8e97b2edfb89426f76dd",
    # listener.NodeAssociationServer and the balanced server; server.start_server mirrors start_server
    "pynetdicom.transport:AssociationServer.get_request":
        "925a4f3a3042f6e4b944505d06dc19c41e10ff7dec5385c794d62d31fd000300",
    "pynetdicom.transport:AssociationServer.server_bind":
        "cf69278a05a5c777b7e9e9af0769e3102618027b2ec8035a30af8cc370ebdae6",
    "pynetdicom.transport:AssociationServer.server_close":
        "3fa1b358badbe6826671da5e9d11cd86944be35327c47caeeff571f74bc3cca9",
    "pynetdicom.transport:AssociationServer.shutdown":
        "e8e2c3a41009886d8544d17ce01118a81bac81b612a1d17f30fc200971f41db9",
    "pynetdicom.ae:ApplicationEntity.start_server":
        "d3868a2df83d3cc08966b575dd8663ee18f101b03ec8d2766639c621b2d58841",
    # direct_store.DirectStore: serves what StorageServiceClass.SCP serves; sets the UIDs unchecked
    "pynetdicom.service_class:StorageServiceClass.SCP":
        "63afca7fc6c6e7ee6e6eb303dd6aa72c1e69dbfcb94dd91c9e90ea6d900a4c40",
    "pynetdicom.dimse_primitives:DIMSEPrimitive.AffectedSOPClassUID.fget":
        "eedf4f07436df50ff3ad8f8f31f04ded384a96887539d072f392bd3c4635c1e8",
    "pynetdicom.dimse_primitives:DIMSEPrimitive._AffectedSOPInstanceUID.fget":
        "9277bce0ad4d990f2826355326f443a79206b9fdb2dcaba33b1b57df5dbcbe97",
    "pynetdicom.dimse_primitives:C_STORE.AffectedSOPInstanceUID.fget":
        "555b4f156dfee0a2d592b62a1f5fc45573c008d0270eeb747e78bb5cbad18cf4",
    # the balanced server yields in get_request: an OSError there must mean "nothing accepted"
    "socketserver:BaseServer._handle_request_noblock":
        "e5a42023c3513d200fc1cb9e0ce590ae765af5db95b770bed51fddd5aed81f6a",
}


def pynetdicom_supported(version: str) -> bool:
    """True if the fast path may run with pynetdicom ``version``."""
    return version == SUPPORTED_PYNETDICOM


def _check_installed() -> bool:
    installed = str(pynetdicom.__version__)
    if pynetdicom_supported(installed):
        return True
    log.warning("pynetdicom_version_unsupported", installed=installed, supported=SUPPORTED_PYNETDICOM,
                fallback="pynetdicom's own receive path (node.fast_path ignored)")
    return False


FAST_PATH_SUPPORTED = _check_installed()


def fast_path_active(requested: bool) -> bool:
    """Whether an SCP runs the fast path: ``node.fast_path`` and a supported pynetdicom."""
    return bool(requested) and FAST_PATH_SUPPORTED


def resolve(name: str) -> Any:
    """The function named ``module:Qual.name`` (a property's accessor as ``...prop.fget``)."""
    module_name, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
    return obj


def source_digest(name: str) -> str:
    """sha256 of the source of the function ``name`` (see :func:`resolve`)."""
    return hashlib.sha256(inspect.getsource(resolve(name)).encode()).hexdigest()


def changed_sources() -> dict[str, str]:
    """{name: current digest} of every pinned function whose source is not the one pinned."""
    changed = {}
    for name, digest in PINNED_SOURCES.items():
        try:
            current = source_digest(name)
        except (ImportError, AttributeError, OSError, TypeError) as exc:
            current = f"unavailable: {type(exc).__name__}: {exc}"
        if current != digest:
            changed[name] = current
    return changed


if __name__ == "__main__":  # print the digests of the installed sources, to paste above
    for _name in PINNED_SOURCES:
        print(f'    "{_name}":\n        "{source_digest(_name)}",')
