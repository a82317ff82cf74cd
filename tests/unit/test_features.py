"""The kernel feature table and the verdict logic of bpf/features.py (the
probes themselves run in tests/root/test_kernel_features.py, on this kernel
and in the vm tier on Debian's 6.1)."""
import errno
import os
import re

import pytest
from click.testing import CliRunner

from merbridge.bpf import features as F
from merbridge.daemon import cli, doctor

UAPI = "/usr/include/linux/bpf.h"


def _uapi() -> str:
    with open(UAPI, encoding="utf-8") as f:
        return f.read()


def _enum(text: str, name: str) -> list[str]:
    body = re.search(r"enum " + name + r" \{(.*?)\};", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    return [m.group(1) for m in re.finditer(r"^\s*(\w+)\s*(?:=\s*\w+)?\s*,?\s*$", body, re.M)]


def test_uapi_numbers_match_the_kernel_header():
    text = _uapi()
    helpers = re.findall(r"FN\((\w+)\)", re.search(r"#define __BPF_FUNC_MAPPER\(FN\)(.*?)\n\n",
                                                   text, re.S).group(1))
    for const, value in vars(F).items():
        if const.startswith("FUNC_"):
            assert helpers.index(const[len("FUNC_"):].lower()) == value, const
    progs = _enum(text, "bpf_prog_type")
    for const, value in vars(F).items():
        if const.startswith("PROG_"):
            assert progs.index("BPF_PROG_TYPE_" + const[len("PROG_"):]) == value, const
    attach = _enum(text, "bpf_attach_type")
    names = {"INET4_CONNECT": "BPF_CGROUP_INET4_CONNECT", "INET6_CONNECT": "BPF_CGROUP_INET6_CONNECT",
             "UDP4_SENDMSG": "BPF_CGROUP_UDP4_SENDMSG", "UDP6_SENDMSG": "BPF_CGROUP_UDP6_SENDMSG",
             "GETSOCKOPT": "BPF_CGROUP_GETSOCKOPT",
             "INET4_GETPEERNAME": "BPF_CGROUP_INET4_GETPEERNAME",
             "INET6_GETPEERNAME": "BPF_CGROUP_INET6_GETPEERNAME",
             "UDP4_RECVMSG": "BPF_CGROUP_UDP4_RECVMSG", "UDP6_RECVMSG": "BPF_CGROUP_UDP6_RECVMSG",
             "INET4_GETSOCKNAME": "BPF_CGROUP_INET4_GETSOCKNAME",
             "INET6_GETSOCKNAME": "BPF_CGROUP_INET6_GETSOCKNAME",
             "CGROUP_INET_SOCK_RELEASE": "BPF_CGROUP_INET_SOCK_RELEASE"}
    for const, value in vars(F).items():
        if const.startswith("ATTACH_"):
            assert attach.index(names[const[len("ATTACH_"):]]) == value, const
    with open("/usr/include/asm-generic/socket.h", encoding="utf-8") as f:
        assert re.search(r"#define SO_NETNS_COOKIE\s+(\d+)", f.read()).group(1) == str(F.SO_NETNS_COOKIE)


def test_the_floor_is_the_newest_required_feature():
    assert F.FLOOR == (5, 15) and F.FLOOR_TEXT == "5.15"
    newest = [f for f in F.FEATURES if f.since == F.FLOOR]
    assert [f.name for f in newest] == ["bpf_get_netns_cookie in sock_ops programs",
                                        "bpf_get_netns_cookie in cgroup getsockopt programs"]
    assert doctor.MIN_KERNEL == F.FLOOR
    # an optional feature (only --ambient needs it) never raises the floor
    late = F.Feature("x", (9, 0), "an option", required=False)
    assert F.floor((*F.FEATURES, late)) == (5, 15)
    assert F.floor((*F.FEATURES, F.Feature("y", (9, 1), "all"))) == (9, 1)


def test_every_helper_the_programs_call_is_probed():
    """A helper called by bpf/progs (or the headers they include) without a
    probe would make the floor a guess again."""
    here = os.path.join(os.path.dirname(F.__file__))
    called = set()
    for d in ("progs", "include"):
        for name in os.listdir(os.path.join(here, d)):
            with open(os.path.join(here, d, name), encoding="utf-8") as f:
                called |= set(re.findall(r"\b(bpf_\w+)\(", f.read()))
    # byte order macros and the debug printk (compiled out) are not helpers
    called -= {"bpf_htons", "bpf_htonl", "bpf_ntohs", "bpf_ntohl", "bpf_trace_printk",
               "bpf_sk_release"}   # comes with bpf_sk_lookup_tcp
    probed = {f.name.split()[0] for f in F.FEATURES if f.helper}
    assert called <= probed, called - probed


@pytest.mark.parametrize("log,present", [
    (None, True),                                                           # loaded
    ("0: (85) call bpf_sock_hash_update#70\nR2 !read_ok\nprocessed 1 insns", True),
    ("Unreleased reference id=2 alloc_insn=0", True),
    ("0: (85) call bpf_get_netns_cookie#122\nunknown func bpf_get_netns_cookie#122\n", False),
    ("0: (85) call bpf_bind#64\nprogram of this type cannot use helper bpf_bind#64\n", False),
    ("invalid func unknown#100000", False),
    (os.strerror(errno.EINVAL), False),                                     # attach type unknown
])
def test_helper_verdict_from_the_verifier_log(log, present):
    assert F.helper_present(log) is present


def test_probe_program_encoding():
    assert F.program(0) == bytes.fromhex("b700000001000000" "9500000000000000")
    assert F.program(122)[:8] == bytes.fromhex("850000007a000000")


SOCKOPS_COOKIE = next(f for f in F.FEATURES if f.name == "bpf_get_netns_cookie in sock_ops programs")
NETNS_OPT = next(f for f in F.FEATURES if f.kind == "sockopt")
AMBIENT = [f for f in F.FEATURES if not f.required]


def test_refusal_names_each_missing_feature_with_its_release():
    assert F.refusal("6.1.0", []) == ""
    msg = F.refusal("5.10.0-28-amd64", [SOCKOPS_COOKIE, NETNS_OPT])
    assert msg == (
        "kernel 5.10.0-28-amd64 lacks 2 features merbridge needs: socket option SO_NETNS_COOKIE "
        "(Linux 5.14), needed by the daemon (keys each CNI pod's mb_netns_pod entry by netns "
        "cookie); bpf_get_netns_cookie in sock_ops programs (Linux 5.15), needed by sockops "
        "(legacy mode learns each pod's IPs by netns). Use Linux 5.15 or newer (merbridge's "
        "floor is Linux 5.15), or a kernel that backports these.")
    assert "lacks 1 feature merbridge" in F.refusal("5.14.0", [SOCKOPS_COOKIE])


def test_missing_counts_only_required_features_unless_asked():
    results = {f: None for f in F.FEATURES}
    results.update({AMBIENT[0]: "unknown func", SOCKOPS_COOKIE: "unknown func"})
    assert F.missing(results) == [SOCKOPS_COOKIE]
    assert set(F.missing(results, required_only=False)) == {AMBIENT[0], SOCKOPS_COOKIE}


def test_doctor_checks_per_feature_and_the_floor():
    results = {f: None for f in F.FEATURES}
    checks = doctor.kernel_feature_checks("6.1.0", True, lambda: results)
    assert len(checks) == len(F.FEATURES) + 1 and all(c.status == "ok" for c in checks)
    assert checks[-1].name == "kernel floor" and "5.15" in checks[-1].detail

    results[SOCKOPS_COOKIE] = "unknown func bpf_get_netns_cookie#122"
    results[AMBIENT[0]] = "unknown func bpf_get_current_cgroup_id#80"
    checks = doctor.kernel_feature_checks("5.10.0", True, lambda: results)
    bad = {c.name: c for c in checks if c.status == "fail"}
    assert set(bad) == {f"kernel feature {SOCKOPS_COOKIE.name}", f"kernel feature {AMBIENT[0].name}",
                        "kernel floor"}
    cookie = bad[f"kernel feature {SOCKOPS_COOKIE.name}"]
    assert cookie.required and "Linux 5.15" in cookie.detail and "#122" in cookie.detail
    assert not bad[f"kernel feature {AMBIENT[0].name}"].required     # --ambient only
    assert bad["kernel floor"].detail == F.refusal("5.10.0", [SOCKOPS_COOKIE])
    assert not doctor.passed(checks)


def test_doctor_skips_the_probes_without_privileges_or_bpf():
    (c,) = doctor.kernel_feature_checks("6.1.0", False)
    assert c.status == "skip" and "root" in c.detail

    def denied():
        raise F.ProbeError(errno.EPERM, "bpf(BPF_PROG_LOAD): Operation not permitted")
    (c,) = doctor.kernel_feature_checks("6.1.0", True, denied)
    assert c.status == "skip" and "Operation not permitted" in c.detail
    assert doctor.kernel_refusal("6.1.0", denied) == ""      # the loader will say why


def test_the_daemon_refuses_to_start_with_doctors_message(monkeypatch, tmp_path):
    from merbridge.daemon import runtime
    started = []
    monkeypatch.setattr(runtime, "run", lambda cfg: started.append(cfg) or 0)
    results = {f: None for f in F.FEATURES}
    results[NETNS_OPT] = "Protocol not available"
    monkeypatch.setattr(F, "probe_all", lambda: results)
    monkeypatch.setattr(doctor.platform, "release", lambda: "5.10.0-28-amd64")
    monkeypatch.setenv("NODE_NAME", "node-1")
    r = CliRunner().invoke(cli.main, ["run", f"--pods-dir={tmp_path}", "--metrics-addr=127.0.0.1:0"])
    assert r.exit_code == 1 and started == []
    assert f"merbridge: {F.refusal('5.10.0-28-amd64', [NETNS_OPT])}" in r.output

    results[NETNS_OPT] = None
    r = CliRunner().invoke(cli.main, ["run", f"--pods-dir={tmp_path}", "--metrics-addr=127.0.0.1:0"])
    assert r.exit_code == 0 and len(started) == 1, r.output
