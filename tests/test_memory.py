"""glibc malloc thresholds of the receiving processes (qcnode.service.memory)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qcnode.service.memory import keep_freed_buffers

# per "slice", in a thread, the SCP's three 530 KB copies (joined PDVs, BytesIO's own copy, Part 10
# bytes); prints the minor page faults per copy
FAULTS_PER_COPY = """
import io, json, resource, sys, threading
from qcnode.service.memory import keep_freed_buffers
tuned = keep_freed_buffers() if sys.argv[1] == "tuned" else None
chunks = [bytes(131066)] * 4 + [bytes(5000)]
def copies():
    for _ in range(300):
        joined = b"".join(chunks)
        dataset = io.BytesIO(joined)
        part10 = bytes(132) + dataset.getbuffer()
        del joined, dataset, part10
copies()  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = threading.Thread(target=copies)
t.start(); t.join()
print(json.dumps({"tuned": tuned, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 900}))
"""


def _faults_per_copy(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_COPY, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_buffers_stops_page_faults_on_slice_sized_buffers():
    default, tuned = _faults_per_copy("default"), _faults_per_copy("tuned")
    assert tuned["tuned"] is True
    print(f"minor faults per 530 KB copy: default {default['faults']:.1f}, tuned {tuned['faults']:.2f}")
    assert tuned["faults"] < 2  # the freed block is reused: no fresh, zeroed pages
    assert default["faults"] > 20 * max(tuned["faults"], 0.5)  # what the setting is there for


def test_keep_freed_buffers_reports_when_it_cannot(monkeypatch):
    import platform
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert keep_freed_buffers() is False
