"""verifier-stats: what the kernel verifier costs per datapath program.

Run as root on a quiet machine, with the project's virtualenv:

    .venv/bin/python scripts/verifier-stats.py [--runs 5] [--reloads 5] [--legacy]

Each run loads a fresh ``loader.Datapath(...).load()`` (CNI mode unless
--legacy) into a private pin dir under /sys/fs/bpf (removed after) and
records, per program:

* load ms: the wall time of bcc's ``load_func`` (the BPF_PROG_LOAD the daemon's
  start waits for), and of the whole ``load()`` (compile included);
* verified: ``bpf_prog_info.verified_insns`` of the loaded program;
* then ``--reloads`` more BPF_PROG_LOADs of the same instructions with
  log_level 4 (BPF_LOG_STATS), for the kernel's own "verification time",
  "processed ... insns" and "total_states / peak_states".

With --inbound the tc and XDP programs of inbound.c (loaded on first enrol
in CNI mode) are measured too. Prints one line per program with the
medians over all runs, and the median of load().
"""
from __future__ import annotations

import argparse
import ctypes as ct
import os
import re
import statistics
import sys
import time
import uuid

from merbridge.bpf import loader, mesh

_libc = ct.CDLL(None, use_errno=True)
_SYS_BPF = 321          # x86_64
_BPF_PROG_LOAD = 5
_BPF_OBJ_GET_INFO_BY_FD = 15
_LOG_STATS = 4


def _bpf(cmd: int, attr: ct.Array) -> int:
    return _libc.syscall(_SYS_BPF, cmd, ct.byref(attr), ct.sizeof(attr))


def prog_info(fd: int) -> dict[str, int]:
    """verified_insns and the translated length of a loaded program."""
    info = ct.create_string_buffer(256)
    attr = ct.create_string_buffer(16)
    ct.c_uint32.from_buffer(attr, 0).value = fd
    ct.c_uint32.from_buffer(attr, 4).value = len(info)
    ct.c_uint64.from_buffer(attr, 8).value = ct.addressof(info)
    if _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr) < 0:
        raise OSError(ct.get_errno(), "BPF_OBJ_GET_INFO_BY_FD")
    return {"xlated": ct.c_uint32.from_buffer(info, 20).value // 8,
            "verified": ct.c_uint32.from_buffer(info, 216).value}   # verified_insns


def reload_stats(insns: bytes, license: bytes, prog_type: int, attach_type: int) -> dict:
    """One more BPF_PROG_LOAD of insns with BPF_LOG_STATS: the kernel's figures."""
    log = ct.create_string_buffer(1 << 16)
    code = ct.create_string_buffer(insns, len(insns))
    lic = ct.create_string_buffer(license)
    attr = ct.create_string_buffer(128)
    ct.c_uint32.from_buffer(attr, 0).value = prog_type
    ct.c_uint32.from_buffer(attr, 4).value = len(insns) // 8
    ct.c_uint64.from_buffer(attr, 8).value = ct.addressof(code)
    ct.c_uint64.from_buffer(attr, 16).value = ct.addressof(lic)
    ct.c_uint32.from_buffer(attr, 24).value = _LOG_STATS
    ct.c_uint32.from_buffer(attr, 28).value = len(log)
    ct.c_uint64.from_buffer(attr, 32).value = ct.addressof(log)
    ct.c_uint32.from_buffer(attr, 68).value = max(attach_type, 0)   # expected_attach_type
    t0 = time.perf_counter()
    fd = _bpf(_BPF_PROG_LOAD, attr)
    wall = time.perf_counter() - t0
    if fd < 0:
        raise OSError(ct.get_errno(), f"BPF_PROG_LOAD: {log.value.decode()[-2000:]}")
    os.close(fd)
    text = log.value.decode()
    m = re.search(r"processed (\d+) insns .* total_states (\d+) peak_states (\d+)", text)
    v = re.search(r"verification time (\d+) usec", text)
    return {"wall_ms": wall * 1e3, "verify_us": int(v.group(1)) if v else -1,
            "processed": int(m.group(1)) if m else -1,
            "states": int(m.group(2)) if m else -1, "peak": int(m.group(3)) if m else -1}


def one_run(cni_mode: bool, reloads: int, inbound: bool) -> tuple[float, dict[str, dict]]:
    pin = f"/sys/fs/bpf/mbv-{uuid.uuid4().hex[:10]}"
    d = loader.Datapath(pin, mesh.get("istio"), cni_mode=cni_mode)
    walls: dict[str, float] = {}
    orig = loader.BPF.load_func

    def timed(self, name, *a, **kw):
        t0 = time.perf_counter()
        try:
            return orig(self, name, *a, **kw)
        finally:
            walls.setdefault(name.decode(), (time.perf_counter() - t0) * 1e3)

    loader.BPF.load_func = timed
    try:
        t0 = time.perf_counter()
        d.load()
        total = time.perf_counter() - t0
        kinds = {p.func: loader.HOOKS[p.hook] for p in d.programs}
        if inbound and cni_mode:
            d.xdp_programs()
            d.tc_programs()
            for n in (loader.XDP_INGRESS, loader.XDP_EGRESS):
                kinds[n] = (loader.BPF.XDP, -1)
            for n in (loader.TC_TO_POD, loader.TC_FROM_POD):
                kinds[n] = (loader.BPF.SCHED_CLS, -1)
        out: dict[str, dict] = {}
        for name, (prog_type, attach_type) in kinds.items():
            b = d._objs[name if name in d._objs else loader.XDP_SOURCE]
            row = {"load_ms": walls[name], **prog_info(d._fns[name].fd)}
            insns = b.dump_func(name.encode())
            lic = loader.bcclib.bpf_module_license(b.module)
            stats = [reload_stats(insns, lic, prog_type, attach_type) for _ in range(reloads)]
            for k in ("verify_us", "processed", "states", "peak"):
                row[k] = statistics.median(s[k] for s in stats) if stats else -1
            out[name] = row
        return total, out
    finally:
        loader.BPF.load_func = orig
        d.close()
        loader.remove_pins(pin)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reloads", type=int, default=5)
    ap.add_argument("--legacy", action="store_true", help="cni_mode=False")
    ap.add_argument("--inbound", action="store_true", help="also inbound.c's tc/XDP programs")
    args = ap.parse_args()
    totals: list[float] = []
    rows: dict[str, list[dict]] = {}
    for i in range(args.runs):
        total, out = one_run(not args.legacy, args.reloads, args.inbound)
        totals.append(total)
        for name, row in out.items():
            rows.setdefault(name, []).append(row)
        c6 = out.get("mb_connect6", {})
        print(f"run {i + 1}: load() {total:.2f} s, mb_connect6 {c6.get('load_ms', 0):.0f} ms",
              file=sys.stderr)
    cols = ("load_ms", "verify_us", "verified", "processed", "states", "peak", "xlated")
    print(f"{'program':16}" + "".join(f"{c:>11}" for c in cols))
    for name, rs in rows.items():
        med = [statistics.median(r[c] for r in rs) for c in cols]
        print(f"{name:16}" + "".join(f"{v:>11.0f}" if c != "load_ms" else f"{v:>11.1f}"
                                     for c, v in zip(cols, med)))
    ours = [n for n in rows if n in {p.func for p in loader.ALL_PROGRAMS}]
    sums = [sum(rows[n][i]["load_ms"] for n in ours) for i in range(args.runs)]
    print(f"sum of load_func in load() ({len(ours)} programs): median {statistics.median(sums):.0f} ms "
          f"(runs: {', '.join(f'{s:.0f}' for s in sums)})")
    print(f"Datapath.load(): median {statistics.median(totals):.2f} s "
          f"(runs: {', '.join(f'{x:.2f}' for x in totals)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
