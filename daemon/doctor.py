"""``merbridge doctor``: can merbridge run on this node, and if not, what is missing?

Each check reports OK, FAIL or SKIP with what it found and, when it fails,
exactly how to fix it.  Required checks decide the exit status; the others
are advice.  Program and map types are probed with ``bpftool feature probe
kernel`` (JSON), which loads tiny programs and creates tiny maps, so it needs
root's capabilities; without bpftool or them those checks are skipped, not guessed.

Inputs (mount table, kernel release, the probe) are parameters so the logic
is testable on any machine; the defaults read this machine.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Callable

from merbridge.bpf import features as kfeatures
from merbridge.daemon.config import DEFAULT_BPFFS_PATH, default_attach_point, find_cgroup2_mount

#: the probed floor: the newest mainline release among the features the
#: datapath needs (bpf/features.py; the probes of kernel_feature_checks decide)
MIN_KERNEL = kfeatures.FLOOR
#: the program types merbridge loads (see bpf/progs/*.c)
PROGRAM_TYPES = {
    "cgroup_sock_addr": "connect4/6, sendmsg/recvmsg (redirect to the sidecar)",
    "sock_ops": "sockops (record socket pairs)",
    "sk_msg": "sk_msg (local socket shortcut)",
    "cgroup_sockopt": "getsockopt (answer SO_ORIGINAL_DST)",
    "xdp": "XDP on pod veths (CNI mode)",
}
#: the map types of bpf/include/maps.h
MAP_TYPES = ("hash", "lru_hash", "array", "percpu_array", "sockhash", "sk_storage")
#: capabilities the daemon needs (bit numbers of linux/capability.h): loading
#: and attaching cgroup/XDP programs and pinning (CAP_SYS_ADMIN covers CAP_BPF
#: and CAP_PERFMON on every kernel), netlink, SO_MARK and ethtool (CAP_NET_ADMIN)
REQUIRED_CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}


@dataclass(frozen=True)
class Check:
    name: str
    status: str        # "ok" | "fail" | "skip"
    required: bool
    detail: str
    fix: str = ""


def _ok(name: str, detail: str, required: bool = True) -> Check:
    return Check(name, "ok", required, detail)


def _fail(name: str, detail: str, fix: str, required: bool = True) -> Check:
    return Check(name, "fail", required, detail, fix)


def _skip(name: str, detail: str, fix: str = "", required: bool = True) -> Check:
    return Check(name, "skip", required, detail, fix)


def parse_kernel(release: str) -> tuple[int, int]:
    parts = release.split("-", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return (0, 0)


def _mounts(mounts_file: str) -> list[tuple[str, str]]:
    try:
        with open(mounts_file, encoding="utf-8") as f:
            return [(p[1], p[2]) for p in (line.split() for line in f) if len(p) >= 3]
    except OSError:
        return []


def effective_caps(status_file: str = "/proc/self/status") -> int:
    """This process's effective capability set (CapEff), 0 when unreadable.

    Capabilities, not the uid, decide: a container's root without them
    (``privileged: false``) cannot load a program, and uid 0 is what it shows.
    """
    try:
        with open(status_file, encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def privileges_check(caps: int, euid: int) -> Check:
    missing = [name for name, bit in REQUIRED_CAPS.items() if not caps >> bit & 1]
    if not missing:
        return _ok("privileges", f"uid {euid} with {', '.join(REQUIRED_CAPS)}")
    return _fail("privileges", f"running as uid {euid} without {', '.join(missing)}",
                 "run as root with full capabilities (the DaemonSet is privileged: true; "
                 "outside it, plain root or sudo)")


def bpftool_probe() -> dict | None:
    """``bpftool feature probe kernel -j`` as a dict, None if unavailable."""
    tool = shutil.which("bpftool") or next(
        (p for p in ("/usr/sbin/bpftool", "/sbin/bpftool") if os.access(p, os.X_OK)), None)
    if tool is None:
        return None
    try:
        out = subprocess.run([tool, "feature", "probe", "kernel", "-j"], capture_output=True,
                             timeout=60, check=True).stdout
        return json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _bcc_importable() -> tuple[bool, str]:
    # in a child process: bcc is imported only by merbridge.bpf.loader, and
    # a broken libbcc must not take the doctor down with it
    try:
        r = subprocess.run([sys.executable, "-c", "import bcc, sys; sys.stdout.write(getattr(bcc, '__version__', '?'))"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, str(exc)
    if r.returncode != 0:
        return False, (r.stderr.strip().splitlines() or ["import failed"])[-1]
    return True, r.stdout.strip()


def run_checks(*, bpffs_path: str = DEFAULT_BPFFS_PATH, cgroup_path: str | None = None,
               mounts_file: str = "/proc/mounts", kernel_release: str | None = None,
               probe: Callable[[], dict | None] = bpftool_probe,
               bcc: Callable[[], tuple[bool, str]] = _bcc_importable,
               caps: int | None = None,
               kprobe: Callable[[], dict] = kfeatures.probe_all) -> list[Check]:
    checks: list[Check] = []
    release = kernel_release or platform.release()
    caps = effective_caps() if caps is None else caps
    mounts = _mounts(mounts_file)

    version = parse_kernel(release)
    want = ".".join(map(str, MIN_KERNEL))
    checks.append(_ok("kernel", f"{release} (>= {want})") if version >= MIN_KERNEL else _fail(
        "kernel", f"{release} is older than {want}",
        f"upgrade the node kernel to {want} or newer (see the kernel feature checks below)"))

    checks.append(privileges_check(caps, os.geteuid()))
    privileged = checks[-1].status == "ok"

    cg = cgroup_path or find_cgroup2_mount(mounts_file)
    if cg is None:
        checks.append(_fail("cgroup v2", "no cgroup2 mount in " + mounts_file,
                            "mount it: mount -t cgroup2 none /sys/fs/cgroup (or boot with "
                            "systemd.unified_cgroup_hierarchy=1), then pass --cgroup-path"))
    elif not os.path.isfile(os.path.join(cg, "cgroup.procs")):
        checks.append(_fail("cgroup v2", f"{cg} is not a cgroup v2 directory",
                            "pass --cgroup-path=<the cgroup2 mount point> (see /proc/mounts)"))
    else:
        checks.append(_ok("cgroup v2", f"{cg}"))
        checks.append(attach_point_check(cgroup_path, cg))
    checks.append(ambient_check(version, checks[-1].status == "ok"))

    bpf_mounts = [m for m, fstype in mounts if fstype == "bpf"]
    parent = os.path.dirname(os.path.abspath(bpffs_path.rstrip("/")))
    covering = [m for m in bpf_mounts if os.path.abspath(bpffs_path).startswith(m.rstrip("/") + "/")
                or os.path.abspath(bpffs_path) == m]
    if covering:
        checks.append(_ok("bpffs", f"{bpffs_path} is on the bpf filesystem mounted at {covering[0]}"))
    else:
        checks.append(_fail("bpffs", f"no bpf filesystem holds {bpffs_path}"
                            + (f" (bpffs is mounted at {', '.join(bpf_mounts)})" if bpf_mounts else ""),
                            f"mount -t bpf bpf {parent if parent != '/' else '/sys/fs/bpf'}, "
                            "or pass --bpffs-path under an existing bpffs mount"))

    btf = "/sys/kernel/btf/vmlinux"
    checks.append(_ok("BTF", btf, required=False) if os.path.exists(btf) else _fail(
        "BTF", f"{btf} is missing", "use a kernel built with CONFIG_DEBUG_INFO_BTF=y "
        "(not needed by bcc, but by most BPF tooling used to debug)", required=False))

    build = f"/lib/modules/{release}/build"
    kheaders = "/sys/kernel/kheaders.tar.xz"
    if os.path.exists(os.path.join(build, "Makefile")) or os.path.isdir(os.path.join(build, "include")):
        checks.append(_ok("kernel headers", build))
    elif os.path.exists(kheaders):
        checks.append(_ok("kernel headers", kheaders))
    else:
        checks.append(_fail("kernel headers", f"neither {build} nor {kheaders} exists",
                            f"install the headers for {release} (Debian: apt-get install "
                            f"linux-headers-{release}) or load the kheaders module (modprobe kheaders)"))

    ok, detail = bcc()
    checks.append(_ok("bcc", f"python bcc {detail}") if ok else _fail(
        "bcc", f"cannot import bcc: {detail}",
        "apt-get install python3-bpfcc and run merbridge from /usr/bin/python3 or a venv "
        "made with --system-site-packages (PyPI's 'bcc' is an unrelated package)"))

    checks.extend(kernel_feature_checks(release, privileged, kprobe))

    features = probe() if privileged else None
    if features is None:
        why = "bpftool is not installed or failed" if privileged else "needs root's capabilities"
        fix = "apt-get install bpftool" if privileged else "run doctor as root"
        for t in PROGRAM_TYPES:
            checks.append(_skip(f"program type {t}", f"not probed: {why}", fix))
        for t in MAP_TYPES:
            checks.append(_skip(f"map type {t}", f"not probed: {why}", fix))
        return checks
    progs, maps = features.get("program_types", {}), features.get("map_types", {})
    for t, use in PROGRAM_TYPES.items():
        checks.append(_ok(f"program type {t}", use) if progs.get(f"have_{t}_prog_type") else _fail(
            f"program type {t}", f"the kernel cannot load {t} programs, needed for {use}",
            "use a kernel with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF, CONFIG_BPF_STREAM_PARSER "
            f"and CONFIG_NET enabled, {'.'.join(map(str, MIN_KERNEL))} or newer"))
    for t in MAP_TYPES:
        checks.append(_ok(f"map type {t}", "available") if maps.get(f"have_{t}_map_type") else _fail(
            f"map type {t}", f"the kernel cannot create {t} maps",
            "use a kernel with CONFIG_BPF_SYSCALL" + (" and CONFIG_BPF_STREAM_PARSER"
                                                       if t == "sockhash" else "")))
    return checks


def attach_point_check(cgroup_path: str | None, mount: str) -> Check:
    """Where ``merbridge run`` attaches with these flags, and why
    (config.default_attach_point; docs/security.md)."""
    if cgroup_path:
        return _ok("attach point", f"{cgroup_path} (--cgroup-path)")
    cgroup, why = default_attach_point(mount)
    return _ok("attach point", f"{cgroup}: {why}")


def kernel_feature_checks(release: str, privileged: bool,
                          kprobe: Callable[[], dict] = kfeatures.probe_all) -> list[Check]:
    """One check per kernel feature the datapath uses (bpf/features.py: a
    tiny program per helper and attach type, SO_NETNS_COOKIE), then the
    verdict the daemon gives at start (kernel_refusal) when any is missing."""
    if not privileged:
        return [_skip("kernel features", "not probed: needs root's capabilities", "run doctor as root")]
    try:
        results = kprobe()
    except kfeatures.ProbeError as exc:
        return [_skip("kernel features", f"not probed: {exc}", "run doctor as root")]
    checks = []
    for f, why in results.items():
        name = f"kernel feature {f.name}"
        if why is None:
            checks.append(_ok(name, f"{f.release}; used by {f.used_by}", required=f.required))
        else:
            checks.append(_fail(name, f"missing ({why}); came with {f.release}, needed by "
                                f"{f.used_by}", f"use {f.release} or newer", required=f.required))
    lacking = kfeatures.missing(results)
    checks.append(_fail("kernel floor", kfeatures.refusal(release, lacking),
                        f"use Linux {kfeatures.FLOOR_TEXT} or newer") if lacking else
                  _ok("kernel floor", f"every feature of Linux {kfeatures.FLOOR_TEXT}'s floor "
                      f"probed present ({len(results)} probes)"))
    return checks


def kernel_refusal(release: str | None = None, kprobe: Callable[[], dict] | None = None) -> str:
    """The daemon's start gate: "" when the kernel has every required
    feature (or probing is impossible: the loader then says why), else the
    message doctor's "kernel floor" check prints."""
    try:
        results = (kprobe or kfeatures.probe_all)()
    except kfeatures.ProbeError:
        return ""
    return kfeatures.refusal(release or platform.release(), kfeatures.missing(results))


def ambient_check(version: tuple[int, int], cgroup_v2: bool) -> Check:
    """``--ambient`` (docs/ambient.md) keys pods by cgroup id
    (bpf_get_current_cgroup_id in cgroup connect programs): kernel >= 5.7 and
    cgroup v2. Advice only: sidecar mode does not need it."""
    want = ".".join(map(str, MIN_KERNEL))
    if version < MIN_KERNEL:
        return _fail("ambient mode", f"kernel older than {want}",
                     f"upgrade the kernel to {want} or newer to use --ambient", required=False)
    if not cgroup_v2:
        return _fail("ambient mode", "no cgroup v2 hierarchy",
                     "mount cgroup v2 (see the cgroup v2 check) to use --ambient", required=False)
    return _ok("ambient mode", f"kernel >= {want} and cgroup v2: --ambient can run",
               required=False)


def passed(checks: list[Check]) -> bool:
    """True when no required check failed or was skipped."""
    return all(c.status == "ok" or not c.required for c in checks)


def render_text(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        tag = {"ok": "OK  ", "fail": "FAIL", "skip": "SKIP"}[c.status]
        opt = "" if c.required else " (optional)"
        lines.append(f"{tag} {c.name}{opt}: {c.detail}")
        if c.fix and c.status != "ok":
            lines.append(f"     fix: {c.fix}")
    lines.append("all required checks passed" if passed(checks)
                 else "some required checks did not pass: merbridge cannot run here yet")
    return "\n".join(lines) + "\n"


def render_json(checks: list[Check]) -> str:
    return json.dumps({"ok": passed(checks), "checks": [asdict(c) for c in checks]}, indent=2) + "\n"
