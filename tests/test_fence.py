"""The fence around pynetdicom's internals (qcnode/net/, issue #18):

- no module of qcnode outside qcnode/net/ uses a private member of pynetdicom, highdicom or
  socketserver (imports of ``_x`` modules or names, ``._x`` on their objects, overriding their
  private methods, ``getattr(obj, "_x")``); the checker is shown to catch what qcnode did before;
- the upstream functions that qcnode/net/ copies, overrides or calls privately still have the source
  they were written against (``qcnode.net.compat.PINNED_SOURCES``);
- another pynetdicom version turns the fast path off with one warning, and the node then serves on
  pynetdicom's own path.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pynetdicom
import pytest

from qcnode.net import compat

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = PROJECT_ROOT / "qcnode"
FENCED_PACKAGE = PACKAGE / "net"
FENCED_LIBRARIES = ("pynetdicom", "highdicom", "socketserver")
FENCED_MODULE_PREFIX = "qcnode.net"  # its classes are pynetdicom's subclasses, its private members its own
# the receiver of a "._x" that is (most likely) a pynetdicom object: association, DUL, ACSE, AE,
# server, DIMSE, socket, primitive, PDU, event, request, presentation context, timer
NETWORK_OBJECT = re.compile(r"assoc|dul|acse|dimse|server|sock|primitive|pdu|acceptor|requestor|transport|timer"
                            r"|(?<![a-z])(ae|evt|event|req|rq|cx|context)(?![a-z])", re.IGNORECASE)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _root(node: ast.AST) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


class _FenceChecker(ast.NodeVisitor):
    """Collects the private-member uses of pynetdicom/highdicom/socketserver in one module."""

    def __init__(self, path: str):
        self.path = path
        self.found: list[str] = []
        self.fenced_names: set[str] = set()  # names bound to those libraries or their members
        self.fenced_class_depth = 0

    def _flag(self, node: ast.AST, what: str) -> None:
        self.found.append(f"{self.path}:{getattr(node, 'lineno', '?')}: {what}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] in FENCED_LIBRARIES:
                self.fenced_names.add(alias.asname or parts[0])
                if any(_private(p) for p in parts):
                    self._flag(node, f"import {alias.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        parts = (node.module or "").split(".")
        if (node.module or "").startswith(FENCED_MODULE_PREFIX):
            self.fenced_names.update(alias.asname or alias.name for alias in node.names)
        if parts[0] not in FENCED_LIBRARIES:
            return
        if any(_private(p) for p in parts):
            self._flag(node, f"from {node.module} import ...")
        for alias in node.names:
            self.fenced_names.add(alias.asname or alias.name)
            if _private(alias.name):
                self._flag(node, f"from {node.module} import {alias.name}")

    def _is_fenced_object(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super":
            return self.fenced_class_depth > 0
        root = _root(node)
        if root in ("self", "cls") and self.fenced_class_depth > 0 and isinstance(node, ast.Name):
            return True
        return root in self.fenced_names or bool(NETWORK_OBJECT.search(ast.unparse(node)))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if _private(node.attr) and self._is_fenced_object(node.value):
            self._flag(node, f"{ast.unparse(node)}")
        elif node.attr == "__class__" and isinstance(node.ctx, ast.Store) and self._is_fenced_object(node.value):
            self._flag(node, f"class switch {ast.unparse(node)}")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if (isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str) and _private(node.args[1].value)
                and self._is_fenced_object(node.args[0])):
            self._flag(node, f"{node.func.id}({ast.unparse(node.args[0])}, {node.args[1].value!r})")
        self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        fenced = any(_root(base) in self.fenced_names for base in node.bases)
        if fenced:
            self.fenced_names.add(node.name)  # its subclasses are pynetdicom's too
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(item.name):
                    self._flag(item, f"{node.name}.{item.name} overrides a private method of "
                                     f"{', '.join(ast.unparse(b) for b in node.bases)}")
        self.fenced_class_depth += fenced
        self.generic_visit(node)
        self.fenced_class_depth -= fenced


def fence_violations(source: str, path: str = "<source>") -> list[str]:
    """Private-member uses of pynetdicom, highdicom or socketserver in the module ``source``."""
    checker = _FenceChecker(path)
    checker.visit(ast.parse(source))
    return checker.found


def test_no_private_pynetdicom_highdicom_or_socketserver_use_outside_qcnode_net():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if FENCED_PACKAGE in path.parents:
            continue
        found += fence_violations(path.read_text(), str(path.relative_to(PROJECT_ROOT)))
    assert not found, "private members used outside qcnode/net/ (move the use there):\n" + "\n".join(found)


# What qcnode did before the fence (commit f19259b), and other shapes of the same thing.
OLD_SCP = '''
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE


class _PolicyACSE(ACSE):
    def __init__(self, assoc, policy):
        super().__init__(assoc)
        self._policy = policy

    def _negotiate_as_acceptor(self) -> None:
        rsd = self._policy("AE", "1.2.3.4")
        if rsd:
            self.send_reject(*rsd)
            return
        super()._negotiate_as_acceptor()


class StorageSCP:
    def start(self):
        self.server = self.ae.make_server(("", 0), evt_handlers=[])
        self.ae._servers.append(self.server)  # noqa: SLF001 - as start_server does

    def _on_conn_open(self, event):
        event.assoc.acse = _PolicyACSE(event.assoc, self.association_policy)
'''
OLD_SR = '''
import highdicom as hd
from highdicom._standard_utils import (get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map,
                                       is_multiframe_image)
'''


@pytest.mark.parametrize("source,expected", [
    (OLD_SCP, ["_PolicyACSE._negotiate_as_acceptor overrides", "super()._negotiate_as_acceptor",
               "self.ae._servers"]),
    (OLD_SR, ["from highdicom._standard_utils import"]),
    ("from pynetdicom import _config\n_config.UNRESTRICTED_STORAGE_SERVICE = True\n", ["import _config"]),
    ("import pynetdicom\npynetdicom._config.LOG_HANDLER_LEVEL = 'none'\n", ["pynetdicom._config"]),
    ("import pynetdicom._config as c\n", ["import pynetdicom._config"]),
    ("def f(assoc):\n    assoc.dul._run_loop_delay = 0.01\n", ["assoc.dul._run_loop_delay"]),
    ("def f(self):\n    return self.assoc._accepted_cx\n", ["self.assoc._accepted_cx"]),
    ("def f(event):\n    return getattr(event.assoc, '_kill')\n", ["getattr(event.assoc, '_kill')"]),
    ("def f(req):\n    req._affected_sop_class_uid = None\n", ["req._affected_sop_class_uid"]),
    ("from pynetdicom.association import Association\ndef f(a):\n    a.__class__ = Association\n"
     "def g(assoc):\n    assoc.__class__ = object\n", ["class switch assoc.__class__"]),
    ("import socketserver\nclass S(socketserver.TCPServer):\n    def _handle_request_noblock(self):\n"
     "        pass\n", ["S._handle_request_noblock overrides"]),
    ("from pynetdicom.dul import DULServiceProvider as D\nclass X(D):\n    def run(self):\n"
     "        self._idle_timer.stop()\n", ["self._idle_timer"]),
    ("from pynetdicom.transport import ThreadedAssociationServer as T\nclass A(T):\n    pass\n"
     "def f():\n    class B(A):\n        def _handle_request_noblock(self):\n"
     "            super()._handle_request_noblock()\n", ["B._handle_request_noblock overrides",
                                                         "super()._handle_request_noblock"]),
    ("from qcnode.net.listener import NodeAssociationServer\nclass C(NodeAssociationServer):\n"
     "    def _handle_request_noblock(self):\n        pass\n", ["C._handle_request_noblock overrides"]),
    ("from qcnode.net import compat\ncompat._check_installed()\n", ["compat._check_installed"]),
])
def test_the_checker_catches_private_use(source, expected):
    found = "\n".join(fence_violations(textwrap.dedent(source)))
    for what in expected:
        assert what in found, f"{what!r} not caught in:\n{found}"


def test_the_checker_leaves_public_use_and_own_private_members_alone():
    source = '''
import os
import argparse
import threading
from pynetdicom import AE, evt

class Node:
    def __init__(self):
        self._lock = threading.Lock()
        self._closing = threading.Event()

    def start(self, event):
        self.server = AE().start_server(("", 0), block=False, evt_handlers=[])
        event.assoc.acse.send_reject(1, 1, 3)
        getattr(self.server, "connection_closed", None)
        return self._closing.is_set(), argparse._SubParsersAction, os._exit
'''
    assert fence_violations(textwrap.dedent(source)) == []


# ---- the upstream sources qcnode/net/ depends on --------------------------------------------------

def test_pinned_pynetdicom_and_socketserver_sources_are_unchanged():
    changed = compat.changed_sources()
    assert not changed, (
        "upstream source changed under qcnode/net/ (pynetdicom "
        f"{pynetdicom.__version__}, pinned for {compat.SUPPORTED_PYNETDICOM}; Python "
        f"{sys.version_info.major}.{sys.version_info.minor}, pinned for {compat.PINNED_PYTHON}): re-read the "
        "upstream diff of each, update the copy in qcnode/net/, then the digests (see qcnode/net/__init__.py):\n"
        + "\n".join(f"  {name}: now {digest}" for name, digest in changed.items()))


def test_the_digest_catches_a_changed_source(monkeypatch):
    name = "pynetdicom.dul:DULServiceProvider.run_reactor"
    monkeypatch.setitem(compat.PINNED_SOURCES, name, "0" * 64)
    assert list(compat.changed_sources()) == [name]


def test_installed_pynetdicom_is_the_supported_one_and_pinned():
    assert pynetdicom.__version__ == compat.SUPPORTED_PYNETDICOM and compat.FAST_PATH_SUPPORTED
    major, minor, _ = compat.SUPPORTED_PYNETDICOM.split(".")
    pin = f'"pynetdicom>={compat.SUPPORTED_PYNETDICOM},<{major}.{int(minor) + 1}"'
    assert pin in (PROJECT_ROOT / "pyproject.toml").read_text()


# ---- another pynetdicom version -----------------------------------------------------------------

_OTHER_VERSION_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    import pynetdicom
    pynetdicom.__version__ = "3.1.0"  # what an upgrade past the pin would install
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.transport import ThreadedAssociationServer
    from daemon_helpers import write_config
    from qcnode.config import load_config
    from qcnode.db.engine import make_engine, session_factory, upgrade
    from qcnode.ingest.scp import StorageSCP
    from qcnode.ingest.spool import Spool
    import qcnode.net.compat, qcnode.net.server, qcnode.service.daemon  # imported again: still one warning

    tmp, port = Path(sys.argv[3]), int(sys.argv[4])
    cfg = load_config(write_config(tmp, port))  # node.fast_path = true by default
    upgrade(cfg.database_url)
    scp = StorageSCP(cfg, session_factory(make_engine(cfg.database_url)),
                     Spool(cfg.path(cfg.storage.spool_dir), cfg.path(cfg.storage.quarantine_dir)))
    scp.start()
    ae = AE("PYSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
    (server_assoc,) = scp.ae.active_associations
    print("RESULT", scp.fast_path, type(scp.server) is ThreadedAssociationServer,
          type(server_assoc) is Association, int(assoc.send_c_echo().Status),
          "qcnode.net.reactors" in sys.modules, "qcnode.net.direct_store" in sys.modules)
    assoc.release()
    scp.stop(2)
""")


def test_another_pynetdicom_version_falls_back_to_pynetdicoms_path_with_one_warning(tmp_path, port):
    proc = subprocess.run([sys.executable, "-c", _OTHER_VERSION_SCRIPT, str(PROJECT_ROOT / "tests"),
                           str(PROJECT_ROOT), str(tmp_path), str(port)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert output.count("pynetdicom_version_unsupported") == 1, output[-3000:]
    # plain path: pynetdicom's server and association classes, an echo answered, no fast-path module loaded
    assert "RESULT False True True 0 False False" in proc.stdout, output[-3000:]


def test_fast_path_is_off_when_unsupported_or_switched_off(monkeypatch):
    assert compat.fast_path_active(True) and not compat.fast_path_active(False)
    assert not compat.pynetdicom_supported("3.0.5") and not compat.pynetdicom_supported("3.1.0")
    monkeypatch.setattr(compat, "FAST_PATH_SUPPORTED", False)
    assert not compat.fast_path_active(True)


@pytest.mark.timeout(180)
def test_serve_with_the_fast_path_off_runs_one_scp_process(tmp_path, port):
    """The listening socket shared between SCP processes is part of the fast path: with
    node.fast_path = false, `qcnode serve` receives in one process (pynetdicom's server) and answers."""
    from pynetdicom import AE

    from daemon_helpers import serve_process, stop_process, wait_for, wait_port, write_config
    cfg = write_config(tmp_path, port, extra={"node": {"fast_path": False, "scp_processes": 2},
                                              "worker": {"enabled": False}})
    proc = serve_process(cfg)
    try:
        wait_port(port, 120, proc)
        log_path = tmp_path / "var" / "qcnode.log"
        wait_for(lambda: '"serve_ready"' in log_path.read_text(), 60, what="serve_ready")
        ae = AE(ae_title="ECHO")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="QCNODE")
        assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
        assoc.release()
        log_text = log_path.read_text()
        assert '"scp_processes_reduced"' in log_text and '"fast_path": false' in log_text
        assert "\"scp1\"" not in log_text  # no second SCP process was started
    finally:
        assert stop_process(proc) == 0
