"""DICOM networking of the SCP; the one package that uses pynetdicom's or socketserver's private members.

- :mod:`~qcnode.net.compat`: the pynetdicom version the fast path was written for, whether it may
  run (``node.fast_path`` and that version), digests of the upstream sources it depends on;
- :mod:`~qcnode.net.server`: starts the SCP on the fast path or on pynetdicom's own
  (``AE.start_server``, public API only);
- :mod:`~qcnode.net.policy`: the association policy (allow-lists, free disk) and its A-ASSOCIATE-RJ;
- the fast path: :mod:`~qcnode.net.listener` (the node's server class, one listening socket for
  several SCP processes), :mod:`~qcnode.net.reactors` (event-driven association threads),
  :mod:`~qcnode.net.pdu` (PDU reads and length limits), :mod:`~qcnode.net.direct_store` (C-STOREs
  served in the DUL thread).

Outside this package no module touches private members of pynetdicom, highdicom or socketserver
(``tests/test_fence.py``). What the plain path lacks: the PDU length limits, ``node.artim_timeout``
(pynetdicom waits ``acse_timeout`` for an A-ASSOCIATE-RQ), the network timeout held while a handler
runs, 0x0122 (instead of pynetdicom's A-ABORT) for a C-STORE of an unknown SOP class on a CT context
and 0xC001 for an over-long UID in a one-PDU command set, the early close of connections whose peer
has gone, the deep listen backlog, the TLS handshake outside the accepting thread, and the shared
listener (``serve`` then runs one SCP process).

Upgrading pynetdicom is a deliberate act; the fast path stays off (one warning at start) on any
version but ``compat.SUPPORTED_PYNETDICOM``:

1. read the upstream diff of every function in ``compat.PINNED_SOURCES`` (``tests/test_fence.py``
   names those whose source changed);
2. carry the changes into the copies and overrides here (reactors, pdu, direct_store, listener, server);
3. set ``compat.SUPPORTED_PYNETDICOM`` and the pin in ``pyproject.toml``, and paste the new digests
   (``python -m qcnode.net.compat`` prints them);
4. run tests/test_fence.py, test_scp.py, test_scp_hardening.py, test_direct_store.py and
   test_activity_listener.py.

A new Python whose socketserver source changed is handled the same way (``compat.PINNED_PYTHON``).
"""
