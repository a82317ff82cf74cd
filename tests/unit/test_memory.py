"""daemon/memory.py: malloc's accounting and the trimmer, in this process."""
import ctypes
import os
import gc
import time

from merbridge.daemon import memory


def test_heap_sees_a_malloc_and_its_free():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = memory.heap()
    assert before is not None, "glibc is the libc here; mallinfo2 must be found"
    block = libc.malloc(64 << 20)   # above the mmap threshold: its own mapping
    try:
        during = memory.heap()
        assert during.in_use - before.in_use >= 64 << 20
        assert during.arena >= during.in_use
    finally:
        libc.free(block)
    assert memory.heap().in_use - before.in_use < 1 << 20


def test_trim_hands_back_freed_pages():
    # every other 16 KiB block freed: holes free() cannot give back by itself
    hoard = [bytearray(16384) for _ in range(4000)]
    del hoard[::2]
    gc.collect()
    assert memory.trim() is True
    del hoard


def test_one_trim_after_a_burst_of_pokes():
    t = memory.Trimmer(quiet=0.3)
    t.start()
    try:
        for _ in range(10):   # a burst: each poke restarts the quiet period
            t.poke()
            time.sleep(0.05)
        assert t.trims == 0
        deadline = time.monotonic() + 5
        while t.trims == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert t.trims == 1
        time.sleep(0.5)
        assert t.trims == 1   # no pokes, no more trims
        t.poke()
        deadline = time.monotonic() + 5
        while t.trims == 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert t.trims == 2
        stats = t.stats()
        assert stats.trims == 2 and stats.python_blocks > 0 and stats.malloc is not None
    finally:
        t.stop()
    assert not t._thread.is_alive()


def test_stop_while_waiting_for_quiet_does_not_trim():
    t = memory.Trimmer(quiet=30)
    t.start()
    t.poke()
    time.sleep(0.1)
    started = time.monotonic()
    t.stop()
    assert time.monotonic() - started < 2 and not t._thread.is_alive()
    assert t.trims == 0


def test_cni_requests_that_change_pods_poke_the_trimmer():
    """The daemon's observer of the CNI server: every request counted, and
    those that change pods poke the trimmer."""
    from types import SimpleNamespace

    from merbridge.daemon import runtime

    daemon = runtime.Daemon(SimpleNamespace(mode="istio", mesh="istio"))
    pokes, counted = [], []
    daemon.trimmer = SimpleNamespace(poke=lambda: pokes.append(1))
    daemon.metrics = SimpleNamespace(cni_request=lambda *a: counted.append(a))
    for command in ("ADD", "DEL", "GC"):
        daemon._cni_request(command, "ok", 0.01)
    assert len(pokes) == 3
    daemon._cni_request("CHECK", "error", 0.01)
    daemon._cni_request("STATUS", "ok", 0.01)
    assert len(pokes) == 3   # read-only requests leave the heap alone
    assert [c[:2] for c in counted] == [("ADD", "ok"), ("DEL", "ok"), ("GC", "ok"),
                                        ("CHECK", "error"), ("STATUS", "ok")]


def _rss_kb(path):
    """Rss of this process's mappings of ``path`` (kB), from /proc/self/smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_page_out_code_reclaims_read_only_mappings_and_spares_written_ones():
    """The compiler's code pages leave the RSS; a private mapping we wrote to
    is not touched (its bytes stay), nor is any other library."""
    import mmap
    here = os.path.dirname(os.path.abspath(__file__))   # a disk, not tmpfs
    size = 4 << 20
    paths = [os.path.join(here, f".mbtest-{os.getpid()}-{name}") for name in ("ro", "rw")]
    try:
        for p in paths:
            with open(p, "wb") as f:
                f.write(os.urandom(size))
        with open(paths[0], "rb") as ro_f, open(paths[1], "r+b") as rw_f:
            ro = mmap.mmap(ro_f.fileno(), size, prot=mmap.PROT_READ)
            rw = mmap.mmap(rw_f.fileno(), size, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                sum(ro[i] for i in range(0, size, 4096))            # resident
                rw[0:size] = b"\x5a" * size                           # ours alone, written
                assert _rss_kb(paths[0]) >= size // 1024 - 64
                advised = memory.page_out_code(libs=(os.path.basename(paths[0]),
                                                     os.path.basename(paths[1])))
                assert advised == size                                # the read-only one only
                assert _rss_kb(paths[0]) < 512
                assert rw[0:size] == b"\x5a" * size
            finally:
                ro.close()
                rw.close()
    finally:
        for p in paths:
            os.unlink(p)
