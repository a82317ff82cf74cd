"""sk_msg queueing is bounded: a bulk transfer through the shortcut to a slow
reader cannot pile up in kernel memory, and the bytes arrive complete and in
order (bpf/progs/redir.c, docs/datapath.md "sk_msg backpressure").

The app (in the pod's cgroup) connects to DST:8080, which connect4 rewrites
to the sidecar stand-in on 127.0.0.1:15001 (UID 1337). Both sockets enter
the sockhash. The "sidecar" reads at a fixed pace, slower than the sender can
write. While the transfer runs, a sampler reads ``ss -tm`` of both sockets
(in the pod netns) and ``/proc/net/sockstat``'s TCP mem (node-wide) every
50 ms. The stream carries a sequence number in each 1 MiB block and both
ends compute a CRC-32 over everything, so a reordered or lost byte shows.
"""
from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import pytest

from hookenv import Pod, datapath
from merbridge.bpf import types as t
from merbridge.bpf.policy import PodPolicy

pytestmark = pytest.mark.root

POD4, DST4 = "10.232.0.1", "10.232.0.2"
MARK = 0x2320001
MiB = 1 << 20
GiB = 1 << 30

SENDER = r'''
import json, os, socket, struct, sys, time, zlib
addr, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = bytearray(os.urandom(1 << 20))
s = socket.create_connection((addr, port), timeout=120)
crc, sent, seq = 0, 0, 0
t0 = time.monotonic()
while sent < total:
    struct.pack_into("!Q", block, 0, seq)
    chunk = memoryview(block)[:min(len(block), total - sent)]
    s.sendall(chunk)
    crc = zlib.crc32(chunk, crc)
    sent += len(chunk)
    seq += 1
done = time.monotonic() - t0
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(json.dumps({"sent": sent, "crc": crc, "send_s": done}))
'''

READER = r'''
import json, socket, sys, time, zlib
rate = float(sys.argv[1])                  # bytes per second
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 15001)); s.listen(4)
print("ready", flush=True)
c, _ = s.accept()
buf = bytearray(1 << 20)
crc, got = 0, 0
t0 = time.monotonic()
while True:
    n = c.recv_into(buf)
    if not n:
        break
    crc = zlib.crc32(memoryview(buf)[:n], crc)
    got += n
    lag = got / rate - (time.monotonic() - t0)
    if lag > 0:
        time.sleep(lag)
c.sendall(b"k"); c.close()
print(json.dumps({"got": got, "crc": crc, "recv_s": time.monotonic() - t0}), flush=True)
'''


@pytest.fixture(scope="module")
def dp():
    with datapath(cni_mode=True) as d:
        yield d


@pytest.fixture
def pod(dp):
    p = Pod(v4=[POD4, DST4])
    try:
        p.serve("marker", "0.0.0.0", 39807, mark=MARK, in_cgroup=False)
        p.enrol(dp, MARK, POD4)
        dp.maps.local_pods.put(POD4, PodPolicy())
        dp.attach(p.cgroup)
        yield p
    finally:
        dp.detach(p.cgroup)
        dp.maps.local_pods.delete(POD4)
        Pod.forget(dp, MARK)
        dp.maps.settings.set(t.MB_SET_SKMSG_MAX_QUEUE, 0)
        p.close()


_SKMEM = re.compile(r"skmem:\(([^)]*)\)")


def _ss_mem(netns: str) -> list[dict[str, int]]:
    """skmem of every TCP socket on port 15001 in netns (r, rb, t, tb, w, ...)."""
    out = subprocess.run(["nsenter", f"--net={netns}", "ss", "-tmnH", "state", "established",
                          "( sport = :15001 or dport = :15001 )"],
                         capture_output=True, text=True).stdout
    socks = []
    for m in _SKMEM.finditer(out):
        fields = dict(re.match(r"([a-z]+)(\d+)", f).groups() for f in m.group(1).split(","))
        socks.append({k: int(v) for k, v in fields.items()})
    return socks


def _tcp_mem_bytes() -> int:
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1]) * 4096
    raise AssertionError("no TCP line in /proc/net/sockstat")


class Sampler(threading.Thread):
    """Peak socket memory of the transfer's two sockets while it runs."""

    def __init__(self, netns: str) -> None:
        super().__init__(daemon=True)
        self.netns = netns
        self.stop = threading.Event()
        self.base_tcp_mem = _tcp_mem_bytes()
        self.peak_queued = 0        # sum over both sockets of r + t + w (bytes)
        self.peak_rb = self.peak_tb = 0
        self.peak_tcp_mem = 0       # node-wide, minus the value before the transfer
        self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            socks = _ss_mem(self.netns)
            if socks:
                self.samples += 1
                queued = sum(s.get("r", 0) + s.get("t", 0) + s.get("w", 0) for s in socks)
                self.peak_queued = max(self.peak_queued, queued)
                self.peak_rb = max([self.peak_rb] + [s.get("rb", 0) for s in socks])
                self.peak_tb = max([self.peak_tb] + [s.get("tb", 0) for s in socks])
            self.peak_tcp_mem = max(self.peak_tcp_mem, _tcp_mem_bytes() - self.base_tcp_mem)
            time.sleep(0.05)


def transfer(dp, pod: Pod, total: int, rate: float) -> tuple[dict, dict, Sampler, dict]:
    """app -> DST4:8080 (-> sidecar stand-in) of total bytes; the reader drains
    at rate bytes/s. Returns sender, reader, sampler, counter deltas."""
    reader = subprocess.Popen(pod._argv(READER, [str(rate)], 1337, 1337, True),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pod.procs.append(reader)
    assert reader.stdout.readline().strip() == "ready", reader.stderr.read()
    before = dp.maps.counters()
    sampler = Sampler(pod.netns)
    sampler.start()
    try:
        out = pod.run(SENDER, DST4, "8080", str(total))
        sender = json.loads(out)
        reader_out = json.loads(reader.stdout.readline())
    finally:
        sampler.stop.set()
        sampler.join()
    after = dp.maps.counters()
    delta = {k: after[k] - before.get(k, 0) for k in after}
    return sender, reader_out, sampler, delta


def test_bulk_transfer_is_bounded_complete_and_in_order(dp, pod):
    budget = t.MB_SKMSG_MAX_QUEUE_DEFAULT
    total = 2 * GiB + 12345          # not a multiple of the block: a partial last send
    sender, reader, s, delta = transfer(dp, pod, total, rate=500 * MiB)
    print(f"\nbulk: {total} B, sender {sender['send_s']:.1f} s, reader {reader['recv_s']:.1f} s, "
          f"peak queued {s.peak_queued / MiB:.1f} MiB (rb {s.peak_rb / MiB:.1f} MiB, "
          f"tb {s.peak_tb / MiB:.1f} MiB), node TCP mem +{s.peak_tcp_mem / MiB:.1f} MiB, "
          f"{s.samples} samples; counters {delta}")
    # complete and in order
    assert reader["got"] == sender["sent"] == total
    assert reader["crc"] == sender["crc"]
    # the app's socket used the shortcut, then left it once, for good
    assert delta["sockhash_add"] == 2
    assert delta["msg_redirect"] >= 1
    assert delta["msg_backpressure"] == 1
    assert delta["msg_pass"] >= 1
    # bounded: at most the budget plus what normal TCP itself allows
    assert s.samples >= 10
    assert s.peak_queued <= budget + s.peak_rb + s.peak_tb + 4 * MiB
    assert s.peak_queued < 128 * MiB
    # node-wide TCP memory (includes other users of the machine): far below
    # the ~1.5 GiB the old unbounded redirect would have queued here
    assert s.peak_tcp_mem < 512 * MiB


def test_without_a_budget_the_queue_grows(dp, pod):
    """Negative control for the measurement: with an (effectively) unlimited
    budget the same probe sees the queue grow far beyond the bound above."""
    dp.maps.settings.set(t.MB_SET_SKMSG_MAX_QUEUE, 1 << 62)
    total = 256 * MiB
    sender, reader, s, delta = transfer(dp, pod, total, rate=50 * MiB)
    print(f"\nunbounded: peak queued {s.peak_queued / MiB:.1f} MiB, counters {delta}")
    assert reader["got"] == total and reader["crc"] == sender["crc"]
    assert delta["msg_backpressure"] == 0
    # the bounded run above stays near budget + rcvbuf + sndbuf (~11 MiB)
    assert s.peak_queued > 64 * MiB


REQRESP = r'''
import json, socket, sys
addr, port, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.create_connection((addr, port), timeout=20)
for i in range(n):
    msg = i.to_bytes(4, "big") * (size // 4)
    s.sendall(msg)
    got = b""
    while len(got) < size:
        d = s.recv(size - len(got))
        if not d:
            raise SystemExit("connection closed early")
        got += d
    if got != msg:
        raise SystemExit("reply %d differs" % i)
print(json.dumps({"ok": True}))
'''

ECHO = r'''
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 15001)); s.listen(4)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    size = int(sys.argv[1])
    while True:
        got = b""
        while len(got) < size:
            d = c.recv(size - len(got))
            if not d:
                break
            got += d
        if len(got) < size:
            break
        c.sendall(got)
    c.close()
'''


def test_request_response_stays_on_the_shortcut(dp, pod):
    """1,000 request/response exchanges of 1 KiB each way on one connection
    (2 MiB in total, below the default budget): every message is redirected."""
    size, n = 1024, 1000
    echo = subprocess.Popen(pod._argv(ECHO, [str(size)], 1337, 1337, True),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pod.procs.append(echo)
    assert echo.stdout.readline().strip() == "ready"
    before = dp.maps.counters()
    assert json.loads(pod.run(REQRESP, DST4, "8080", str(n), str(size)))["ok"]
    after = dp.maps.counters()
    delta = {k: after[k] - before[k] for k in after}
    assert delta["sockhash_add"] == 2
    assert delta["msg_redirect"] >= 2 * n
    assert delta["msg_pass"] == 0
    assert delta["msg_backpressure"] == 0 and delta["msg_peer_missing"] == 0


def test_budget_is_per_connection_and_a_setting(dp, pod):
    """A small budget moves a connection to the normal path after it, and a
    new connection starts with a fresh budget."""
    size, n = 1024, 100
    dp.maps.settings.set(t.MB_SET_SKMSG_MAX_QUEUE, 10 * size + 1)
    echo = subprocess.Popen(pod._argv(ECHO, [str(size)], 1337, 1337, True),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pod.procs.append(echo)
    assert echo.stdout.readline().strip() == "ready"
    for _ in range(2):
        before = dp.maps.counters()
        assert json.loads(pod.run(REQRESP, DST4, "8080", str(n), str(size)))["ok"]
        after = dp.maps.counters()
        delta = {k: after[k] - before[k] for k in after}
        # each direction: 10 messages redirected, then the normal path
        assert delta["msg_redirect"] == 2 * 10
        assert delta["msg_backpressure"] == 2
        assert delta["msg_pass"] == 2 * (n - 10)
