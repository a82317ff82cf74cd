"""``--exclude-namespaces`` reaches the CNI plugin (CNI mode).

The plugin decides pass-through from its netconf's ``excludeNamespaces``
before it asks the daemon anything, so a daemon started with a non-default
list must write that list into the conflist entry it chains in. Here the real
daemon excludes ``default`` (where the lab's pods live), and the installed
plugin is run with the netconf a container runtime would hand it -- the
entry exactly as installed -- for a pod that would otherwise be enrolled.
"""
import json
import os
import subprocess

import pytest

from daemonenv import PRIMARY, Env

pytestmark = pytest.mark.root


def installed_entry(env: Env) -> tuple[dict, dict]:
    """The chained conflist the daemon wrote, and its merbridge-cni entry."""
    with open(os.path.join(env.conf_dir, PRIMARY)) as f:
        chained = json.load(f)
    (entry,) = [p for p in chained["plugins"] if p["type"] == "merbridge-cni"]
    return chained, entry


def add_as_runtime(env: Env, pod, chained: dict, entry: dict) -> subprocess.CompletedProcess:
    conf, environ = env._cni_call("ADD", pod, "", chained["cniVersion"], None, None)
    conf = dict(entry, cniVersion=chained["cniVersion"], name=chained["name"],
                prevResult=conf["prevResult"])
    return subprocess.run([os.path.join(env.bin_dir, "merbridge-cni")], input=json.dumps(conf),
                          env=environ, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("flag, excluded", [("--exclude-namespaces=default,team-a", True),
                                            ("--exclude-namespaces=team-a", False)])
def test_daemon_exclude_namespaces_reach_the_plugin(pin_dir, lab, flag, excluded):
    a = lab.add_pod("a")
    a.start_sidecar()
    env = Env(lab, pin_dir)
    try:
        env.publish_pod(a)
        proc = env.start(flag)
        chained, entry = installed_entry(env)
        assert entry["excludeNamespaces"] == flag.split("=", 1)[1].split(",")
        res = add_as_runtime(env, a, chained, entry)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["ips"][0]["address"] == f"{a.ip4}/24"   # prevResult back
        # excluded: passed straight through, no marker listener, no state; else enrolled
        assert bool(env.marker(a)) is not excluded
        with open(os.path.join(env.state_dir, "enrolled.json")) as f:
            names = [r["name"] for r in json.load(f).get("containers", [])]
        assert names == ([] if excluded else ["a"])
        assert env.stop(proc) == 0
    finally:
        env.close()
