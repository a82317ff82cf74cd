"""Fuzzing the installed merbridge-cni against the REAL daemon (issue 6).

A valid ADD of an in-mesh pod (the target: networked by the chain, not yet
enrolled) is mutated by hypothesis, one to three mutations per case: stdin
(bad JSON, non-UTF-8, UTF-16, over the size cap, deep nesting, wrong types,
huge values, bad or missing cniVersion, missing or broken prevResult, wrong
IPs, socket paths that lead nowhere) and the CNI_* environment (unknown
commands, missing, empty, huge or non-UTF-8 values, bogus netns paths and path
tricks, bad interface names, other pod identities). Each case runs the daemon's
installed plugin as libcni does (``nsenter`` into the node netns, env + stdin)
and must

* end within ``CASE_TIMEOUT`` with exit 0 and a valid result (ADD: prevResult
  passed through; VERSION: the version info; others: nothing), or a non-zero
  exit and the spec's error JSON (``cniVersion``, ``code``, ``msg``, maybe
  ``details``), never code 999, never "Traceback" on stderr;
* leave the daemon's kernel and record state exactly as it was: map entries
  (``mb_mark_pod_ips``, ``mb_local_pods``, ``mb_netns_pod``), the state file's
  records, marker listeners and XDP programs in the node netns and both pods.

A bystander pod stays enrolled throughout and must not be touched. Only a call
that succeeded may change anything, and only as the valid call does: an
accepted ADD is undone by the runtime's DEL with the same env and stdin, an
accepted GC (a 1.1.0 GC with no valid attachments drops every container) by
the bystander's ADD; then the state must be exactly the starting one again.
Last, the well-formed ADD/CHECK/DEL still works and the daemon logged no
traceback.

Safety: every netns path the cases use is fixed here and checked before the
run: nothing that exists is a network namespace other than the target's or the
node's (the daemon refuses its own); socket paths that are not the daemon's
lead nowhere. ``MB_DAEMON_FUZZ_CASES`` changes the case count (300); the
hypothesis profile is derandomized, so CI runs the same cases every time.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import fcntl
import json
import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemonkit import (NODE_NAME, Pod, cid_of, cnitool_ok, direct, enrolled, make_pod,
                       marker_marks, node_state, plugin_call, remove_pod, tc_progs_all,
                       xdp_progs)
from cnikit import invoke_plugin, netns_path
from merbridge.cni import errors, plugin, skel, version
from merbridge.lab.manifests import pod_manifest

pytestmark = pytest.mark.root

CASES = int(os.environ.get("MB_DAEMON_FUZZ_CASES", "300"))
CASE_TIMEOUT = 20
ABSENT = object()          # a mutation value: remove the key / variable
HUGE = 100_000             # characters: under the kernel's 128 KiB per env string


@dataclasses.dataclass
class Fuzz:
    w: object
    target: Pod            # networked by the chain, not enrolled
    bystander: Pod         # enrolled throughout
    prev: dict             # the target's prevResult
    by_prev: dict
    env: dict              # the valid ADD
    conf: dict
    netns_values: list     # CNI_NETNS candidates (fixed, checked for safety)
    gone: str              # a netns path that does not exist
    before: dict | None = None


def state(f: Fuzz) -> dict:
    """Everything the daemon holds or made, node-wide and in both pods."""
    w = f.w
    return {**node_state(w),
            "markers": {p.name: marker_marks(p.ns) for p in (f.target, f.bystander)},
            "xdp": {ns: xdp_progs(ns) for ns in (w.node, f.target.ns, f.bystander.ns)},
            "tc": tc_progs_all(w.node)}


def is_netns(path) -> tuple[int, int] | None:
    """(dev, inode) when ``path`` opens as a network namespace, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except (OSError, ValueError):
        return None
    try:
        if fcntl.ioctl(fd, 0xB703) != 0x40000000:    # NS_GET_NSTYPE == CLONE_NEWNET
            return None
        st_ = os.fstat(fd)
        return st_.st_dev, st_.st_ino
    except OSError:
        return None
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def fuzz(daemon_world, tmp_path_factory):
    w = daemon_world
    tmp = tmp_path_factory.mktemp("fuzz")
    plain = f"plain-{w.tag}"
    made: list[Pod] = []
    try:
        target = make_pod(w, "fz")
        made.append(target)
        bystander = make_pod(w, "by")
        made.append(bystander)
        w.daemon.publish(pod_manifest(plain, uid=f"uid-{plain}", node=NODE_NAME,
                                      phase="Pending", in_mesh=False))
        # the target networked by the chain without a pod identity: passed through
        p = w.cnitool("add", w.net, target.ns, cni_args="IgnoreUnknown=1")
        assert p.returncode == 0, p.stderr
        prev = json.loads(p.stdout)
        by_prev = cnitool_ok(w, "add", bystander)
        enrolled(w, bystander, by_prev)
        env, conf = plugin_call(w, "ADD", target, cid_of(target), prev)

        (tmp / "regular").write_text("")
        os.symlink(target.path, tmp / "to-target")
        os.symlink(netns_path(w.node), tmp / "to-node")
        gone = netns_path(f"mbt-{w.tag}-gone")
        netns_values = [
            ABSENT, "", target.path[1:], f"/var/run/netns/../netns/{target.ns}",
            f"{target.path}/", f"/{target.path}", f"{target.path}/.", gone,
            netns_path(w.node),                          # the daemon's own netns
            f"/proc/{w.daemon.proc.pid}/ns/net",         # the same, through /proc
            f"/proc/{w.daemon.proc.pid}/ns/uts",         # another namespace type
            str(tmp / "regular"), str(tmp), "/var/run/netns", "/dev/null",
            str(tmp / "to-node"), str(tmp / "to-target"),
            "/" + "n" * 5000, gone.encode() + b"\xff", target.path + "\n",
        ]
        allowed = {is_netns(target.path), is_netns(netns_path(w.node))}
        for v in netns_values:
            if v is not ABSENT:
                assert is_netns(v) in allowed | {None}, f"unsafe CNI_NETNS candidate {v!r}"
        yield Fuzz(w, target, bystander, prev, by_prev, env, conf, netns_values, gone)
    finally:
        for pod in made:
            remove_pod(w, pod)
        w.daemon.unpublish(plain)


# -- mutations ------------------------------------------------------------------------
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0/"),
               max_size=20)
junk = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | text
    | st.sampled_from(["x" * HUGE, 10**400, -1, 0, "", [], {}]),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(text, kids, max_size=3),
    max_leaves=6)
versions = st.sampled_from(list(version.SUPPORTED) + ["", "9.9.9", "one", "1.0", "0.1",
                                                      "1.0.0\n", " 1.0.0", "x" * HUGE])
bad_ips = (st.ip_addresses(v=4).map(lambda a: f"{a}/24") | st.ip_addresses(v=6).map(
    lambda a: f"{a}/64") | text | st.sampled_from(
    ["10.232.1.300/24", "0.0.0.0/0", "::/0", "127.0.0.1/8", "224.0.0.1/4", "10.232.1.9",
     "10.232.1.9/33", "fd00:232:1::9/129", "::ffff:10.232.1.9/120", "BYSTANDER"]))


def env_values(netns_values: list, gone: str) -> dict:
    bad = st.sampled_from([ABSENT, "", "x" * HUGE, b"\xff\xfe", "a b"])
    return {
        "CNI_COMMAND": st.sampled_from(["DEL", "CHECK", "VERSION", "STATUS", "GC", "add",
                                        "FROB", "ADD ", b"AD\xff"]) | bad | text,
        "CNI_CONTAINERID": st.sampled_from(["-lead", "bad id", "../../etc", "fz.other_1",
                                            "c" * 300, b"ctr-\xff"]) | bad | text,
        "CNI_NETNS": st.sampled_from(netns_values) | text.map(lambda t: f"{gone}{t}"),
        "CNI_IFNAME": st.sampled_from(["lo", "eth1", "x" * 16, ".", "..", "eth0/x", "eth 0",
                                       "eth0:1", "ETH0", b"eth\xff"]) | bad | text,
        "CNI_ARGS": st.sampled_from(["IgnoreUnknown=1", "a;b;=;;==", "K8S_POD_NAME=",
                                     "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;"
                                     "K8S_POD_NAME=fz", "PLAIN", "BYSTANDER",
                                     b"IgnoreUnknown=1;K8S_POD_NAME=\xff"]) | bad | text,
        "CNI_PATH": bad | text,
        "CNI_NETNS_OVERRIDE": st.sampled_from(["1", "true", "0"]),
        "CNI_UNKNOWN": text,
    }


CONF_VALUES = {
    "cniVersion": versions | junk,
    "name": st.sampled_from(["", "-bad", "a b", "x" * HUGE, "ok.name"]) | junk,
    "type": st.sampled_from(["bridge", "", "../merbridge-cni"]) | junk,
    # never the default path (deleting the key): only paths that lead nowhere
    "socketPath": st.sampled_from(["/var/run/netns/nowhere.sock", "rel.sock", "",
                                   "/" + "s" * 200, 5, None, ["/x"]]),
    "timeoutSeconds": st.sampled_from([0, -1, 1e9, "5", True, None, 10**30, 3, []]),
    "excludeNamespaces": st.sampled_from([["default"], "default", [5], None, ABSENT]) | junk,
    "logLevel": st.sampled_from(["debug", "loud", 3, None, ABSENT]),
    "prevResult": st.sampled_from([ABSENT, None, {}, [], "prev"]) | junk,
    "args": junk, "runtimeConfig": junk, "capabilities": junk,
    "cni.dev/valid-attachments": junk, "x" * 100: junk,
}
PREV_VALUES = {
    ("ips", 0, "address"): bad_ips,
    ("ips", 1, "address"): bad_ips,
    ("ips", 0, "interface"): junk,
    ("ips",): st.sampled_from([[], None, "10.232.1.9/24", [{}], [{"address": 5}]]) | junk,
    ("interfaces",): st.sampled_from([[], None, [{}], [{"name": 5}]]) | junk,
    ("interfaces", 2, "sandbox"): st.sampled_from(["/var/run/netns/other", "", 5]),
    ("cniVersion",): versions | junk,
    ("routes",): junk,
}


def mutations(netns_values: list, gone: str):
    envs = env_values(netns_values, gone)
    env = st.sampled_from(sorted(envs)).flatmap(
        lambda k: st.tuples(st.just("env"), st.just(k), envs[k]))
    netns = st.tuples(st.just("env"), st.just("CNI_NETNS"), envs["CNI_NETNS"])
    return st.one_of(
        env, netns,
        st.sampled_from(sorted(CONF_VALUES)).flatmap(
            lambda k: st.tuples(st.just("conf"), st.just(k), CONF_VALUES[k])),
        st.sampled_from(sorted(PREV_VALUES)).flatmap(
            lambda k: st.tuples(st.just("prev"), st.just(k), PREV_VALUES[k])))


ENCODINGS = ["utf8"] * 10 + ["utf16", "truncated", "bad-byte", "over-cap", "deep", "empty",
                             "bom", "two-docs", "nan"]


def build(f: Fuzz, muts, encoding: str) -> tuple[dict, bytes]:
    """The valid ADD's env and stdin with ``muts`` applied, then encoded."""
    env, conf = dict(f.env), copy.deepcopy(f.conf)
    ip_of = {"BYSTANDER": f.by_prev["ips"][0]["address"]}
    for where, key, value in muts:
        if where == "env":
            value = {"PLAIN": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME=plain-{f.w.tag}",
                     "BYSTANDER": f.bystander.args}.get(value, value) \
                if isinstance(value, str) else value
            target = env
        elif where == "conf":
            target = conf
        else:     # a path inside prevResult; skipped where the shape no longer fits
            target = conf.get("prevResult")
            for step in key[:-1]:
                ok = isinstance(target, dict) and isinstance(step, str) and step in target \
                    or isinstance(target, list) and isinstance(step, int) and step < len(target)
                target = target[step] if ok else None
            if not isinstance(target, (dict, list)):
                continue
            key = key[-1]
            if isinstance(target, list) and not (isinstance(key, int) and key < len(target)):
                continue
            value = ip_of.get(value, value) if isinstance(value, str) else value
        if value is ABSENT:
            if isinstance(target, dict):
                target.pop(key, None)
        else:
            target[key] = value
    data = json.dumps(conf).encode()
    return env, {
        "utf8": data, "utf16": json.dumps(conf).encode("utf-16"),
        "truncated": data[:len(data) * 2 // 3], "bad-byte": data.replace(b'"', b'"\xc3(', 1),
        "over-cap": data + b" " * (skel.MAX_STDIN + 1 - len(data)),
        "deep": b'{"cniVersion": "1.0.0", "name": "n", "x": ' + b"[" * 200_000
                + b"]" * 200_000 + b"}",
        "empty": b"", "bom": b"\xef\xbb\xbf" + data, "two-docs": data + data,
        "nan": data[:-1] + b', "timeoutSeconds": NaN}',
    }[encoding]


def check_outcome(env: dict, stdin: bytes, rc: int, out, err: str) -> str:
    """The spec's answer: a valid result with exit 0, or the error JSON with a
    non-zero exit and a real code. Returns the outcome's name for the tally."""
    assert "Traceback" not in err, err
    command = env.get("CNI_COMMAND")
    if rc == 0:
        if command == "ADD":
            conf = json.loads(stdin.decode("utf-8"))
            assert out == plugin.passthrough(conf["prevResult"], conf.get("cniVersion")
                                             or out["cniVersion"]), out
        elif command == "VERSION":
            assert out == version.info(), out
        else:
            assert out is None, out
        return f"{command} ok"
    assert isinstance(out, dict) and {"cniVersion", "code", "msg"} <= set(out) <= \
        {"cniVersion", "code", "msg", "details"}, out
    assert isinstance(out["code"], int) and out["code"] != errors.INTERNAL, out
    assert isinstance(out["msg"], str) and out["msg"], out
    return f"code {out['code']}"


def test_fuzzed_calls_end_in_the_spec_and_leave_the_daemon_as_it_was(fuzz):
    f, w = fuzz, fuzz.w
    f.before = state(f)
    tally: collections.Counter = collections.Counter()
    slowest = [0.0]
    t_start = time.monotonic()

    @settings(max_examples=CASES, derandomize=True, database=None, deadline=None,
              print_blob=False, suppress_health_check=list(HealthCheck))
    @given(muts=st.lists(mutations(f.netns_values, f.gone), min_size=1, max_size=3),
           encoding=st.sampled_from(ENCODINGS))
    def case(muts, encoding):
        env, stdin = build(f, muts, encoding)
        t0 = time.monotonic()
        rc, out, err = invoke_plugin(w.node, w.daemon.plugin, env, stdin, timeout=CASE_TIMEOUT)
        slowest[0] = max(slowest[0], time.monotonic() - t0)
        outcome = check_outcome(env, stdin, rc, out, err)
        tally[outcome] += 1
        after = state(f)
        if after != f.before:
            # only an accepted ADD or GC may change anything, as the valid call does
            assert rc == 0 and outcome in ("ADD ok", "GC ok"), diff(f.before, after)
            tally[f"{outcome}, undone"] += 1
            if outcome == "ADD ok":   # the runtime's DEL for the container it added
                rc, _, err = invoke_plugin(w.node, w.daemon.plugin,
                                           {**env, "CNI_COMMAND": "DEL"}, stdin)
            else:                     # the GC dropped the bystander: add it back
                rc, _, err = direct(w, "ADD", f.bystander, cid_of(f.bystander), f.by_prev)
            assert rc == 0, err
            after = state(f)
            assert after == f.before, diff(f.before, after)

    case()
    n = sum(v for k, v in tally.items() if not k.endswith("undone"))
    print(f"\ndaemon fuzz: {n} cases in {time.monotonic() - t_start:.1f} s "
          f"(slowest {slowest[0]:.2f} s): {dict(sorted(tally.items()))}")
    assert n >= CASES * 3 // 4, tally

    # still healthy: the well-formed ADD enrols, CHECK passes, DEL restores it all
    rc, out, err = invoke_plugin(w.node, w.daemon.plugin, f.env, json.dumps(f.conf).encode())
    assert (rc, out) == (0, f.prev), err
    enrolled(w, f.target, f.prev)
    rc, _, err = direct(w, "CHECK", f.target, cid_of(f.target), f.prev)
    assert rc == 0, err
    cnitool_ok(w, "check", f.bystander)
    rc, _, err = direct(w, "DEL", f.target, cid_of(f.target), f.prev)
    assert rc == 0, err
    assert state(f) == f.before
    tracebacks = [line for line in w.daemon.log().splitlines() if "Traceback" in line]
    assert tracebacks == [], w.daemon.log()[-3000:]


def diff(before: dict, after: dict) -> str:
    return "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}"
                     for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k))
