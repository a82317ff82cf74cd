"""CNI config chaining: golden files for the pure part, real files and inotify for the rest."""
import json
import os
import pathlib
import shutil
import threading
import time

import pytest

from merbridge.daemon import inotify, install

TESTDATA = pathlib.Path(__file__).parent / "testdata"
ENTRY = install.plugin_entry("/var/run/merbridge-cni.sock", "istio")
INPUTS = sorted(p.name for p in TESTDATA.iterdir()
                if p.suffix in (".conf", ".conflist") and not p.name.endswith(".golden"))


@pytest.mark.parametrize("name", INPUTS)
def test_insert_matches_golden(name):
    config = json.loads((TESTDATA / name).read_bytes())
    got = install.dumps(install.insert_plugin(config, ENTRY))
    assert got == (TESTDATA / (name + ".golden")).read_bytes()


@pytest.mark.parametrize("name", INPUTS)
def test_insert_is_idempotent_and_removable(name):
    config = json.loads((TESTDATA / name).read_bytes())
    once = install.insert_plugin(config, ENTRY)
    assert install.insert_plugin(once, ENTRY) == once
    assert [p["type"] for p in once["plugins"]].count("merbridge-cni") == 1
    assert once["plugins"][-1] == ENTRY
    removed = install.remove_plugin(once)
    assert not install.has_plugin(removed)
    if install.is_conflist(config):
        assert removed == install.remove_plugin(config)
    else:
        assert removed["plugins"] == [config]


def test_insert_rejects_non_config_and_wrong_entry():
    with pytest.raises(install.InstallError):
        install.insert_plugin({"foo": 1}, ENTRY)
    with pytest.raises(ValueError):
        install.insert_plugin({"type": "bridge"}, {"type": "other"})


@pytest.fixture
def dirs(tmp_path):
    conf, bindir, src = tmp_path / "net.d", tmp_path / "bin", tmp_path / "merbridge-cni-src"
    conf.mkdir()
    bindir.mkdir()
    src.write_bytes(b"#!/usr/bin/python3\nprint('plugin')\n")
    return conf, bindir, src


def make(dirs):
    conf, bindir, src = dirs
    return install.Installer(str(bindir), str(conf), str(src), ENTRY)


def test_install_uninstall_conflist_byte_identical(dirs):
    conf, bindir, _ = dirs
    original = (TESTDATA / "calico.conflist").read_bytes()
    target = conf / "10-calico.conflist"
    target.write_bytes(original)
    target.chmod(0o600)
    inst = make(dirs)
    assert inst.install() == str(target)
    chained = json.loads(target.read_bytes())
    assert chained["plugins"][-1]["type"] == "merbridge-cni"
    assert target.stat().st_mode & 0o777 == 0o600          # mode kept
    assert (bindir / "merbridge-cni").stat().st_mode & 0o777 == 0o755
    assert inst.ready.is_set()
    # a second install writes nothing (same inode, no temp files left)
    inode = target.stat().st_ino
    inst.install()
    assert target.stat().st_ino == inode
    assert sorted(os.listdir(conf)) == ["10-calico.conflist"]
    inst.uninstall()
    assert target.read_bytes() == original
    assert not (bindir / "merbridge-cni").exists()


def test_uninstall_removes_entry_before_binary(dirs):
    conf, bindir, _ = dirs
    (conf / "10-calico.conflist").write_bytes((TESTDATA / "calico.conflist").read_bytes())
    inst = make(dirs)
    inst.install()
    with inotify.Inotify() as ino:
        wd_conf = ino.add_watch(str(conf))
        wd_bin = ino.add_watch(str(bindir))
        inst.uninstall()
        events = ino.read(1) + ino.read(0.1)
    watched = {wd_conf: "conf", wd_bin: "bin"}
    order = [(watched[e.wd], e.name) for e in events
             if e.mask & (inotify.IN_MOVED_TO | inotify.IN_DELETE)]
    assert order == [("conf", "10-calico.conflist"), ("bin", "merbridge-cni")]


def test_conf_is_converted_and_restored(dirs):
    conf, _, _ = dirs
    original = (TESTDATA / "bridge.conf").read_bytes()
    (conf / "10-bridge.conf").write_bytes(original)
    inst = make(dirs)
    assert inst.install() == str(conf / "10-bridge.conflist")
    assert sorted(os.listdir(conf)) == ["10-bridge.conflist"]
    assert (conf / "10-bridge.conflist").read_bytes() == (TESTDATA / "bridge.conf.golden").read_bytes()
    inst.uninstall()
    assert sorted(os.listdir(conf)) == ["10-bridge.conf"]
    assert (conf / "10-bridge.conf").read_bytes() == original


def test_picks_lexically_first_valid_config(dirs):
    conf, _, _ = dirs
    (conf / "00-broken.conf").write_text("{not json")
    (conf / "01-notcni.json").write_text('{"hello": 1}')
    (conf / "05-a.conflist").write_bytes((TESTDATA / "calico.conflist").read_bytes())
    (conf / "10-b.conf").write_bytes((TESTDATA / "bridge.conf").read_bytes())
    (conf / "ZZZ-merbridge-cni-kubeconfig").write_text("apiVersion: v1")
    assert install.find_primary_config(str(conf)) == str(conf / "05-a.conflist")
    make(dirs).install()
    assert install.has_plugin(json.loads((conf / "05-a.conflist").read_bytes()))
    assert (conf / "10-b.conf").read_bytes() == (TESTDATA / "bridge.conf").read_bytes()


def test_restart_cleans_entry_left_by_earlier_run(dirs):
    conf, bindir, _ = dirs
    first = make(dirs)
    (conf / "10-calico.conflist").write_bytes((TESTDATA / "calico.conflist").read_bytes())
    first.install()          # then the daemon is SIGKILLed: no uninstall
    second = make(dirs)
    second.install()
    second.uninstall()
    config = json.loads((conf / "10-calico.conflist").read_bytes())
    assert not install.has_plugin(config)
    assert config == json.loads((TESTDATA / "calico.conflist").read_bytes())


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def chained(path):
    try:
        return install.has_plugin(json.loads(path.read_bytes()))
    except (OSError, ValueError):
        return False


def test_watch_waits_then_reapplies_after_primary_rewrites(dirs):
    conf, bindir, _ = dirs
    inst = make(dirs)
    thread = threading.Thread(target=inst.watch, daemon=True)
    thread.start()
    try:
        # no config yet: the watcher waits, without spinning
        time.sleep(0.3)
        assert not inst.ready.is_set()
        # a spinning watcher would burn ~1 s of CPU here; a blocked one ~0
        cpu_before = time.process_time()
        time.sleep(1.0)
        assert time.process_time() - cpu_before < 0.5
        # the primary CNI writes its config: we chain in
        target = conf / "10-calico.conflist"
        primary = (TESTDATA / "calico.conflist").read_bytes()
        install.atomic_write(str(target), primary)
        assert inst.ready.wait(5)
        assert wait_for(lambda: chained(target))
        # the primary CNI rewrites its file (dropping us): re-applied
        rewritten = primary.replace(b'"mtu": 1440', b'"mtu": 1400')
        install.atomic_write(str(target), rewritten)
        assert wait_for(lambda: chained(target) and b"1400" in target.read_bytes())
        # the binary disappears: copied back
        (bindir / "merbridge-cni").unlink()
        assert wait_for(lambda: (bindir / "merbridge-cni").exists())
    finally:
        inst.stop()
        thread.join(5)
    assert not thread.is_alive()
    inst.uninstall()
    # the restore gives back the primary's LATEST bytes
    assert target.read_bytes() == rewritten
    assert not (bindir / "merbridge-cni").exists()


def test_uninstall_keeps_changes_the_primary_made_after_us(dirs):
    conf, _, _ = dirs
    target = conf / "10-calico.conflist"
    target.write_bytes((TESTDATA / "calico.conflist").read_bytes())
    inst = make(dirs)
    inst.install()
    config = json.loads(target.read_bytes())
    config["plugins"].insert(1, {"type": "tuning"})     # someone else edits, keeping us
    target.write_text(json.dumps(config))
    inst.uninstall()
    after = json.loads(target.read_bytes())
    assert [p["type"] for p in after["plugins"]] == ["calico", "tuning", "portmap", "bandwidth"]


def test_missing_plugin_source_is_a_clear_error(dirs, tmp_path):
    conf, bindir, _ = dirs
    inst = install.Installer(str(bindir), str(conf), str(tmp_path / "nope"), ENTRY)
    with pytest.raises(FileNotFoundError):
        inst.install()
    assert os.listdir(bindir) == []


@pytest.mark.parametrize("name,installed_as", [("10-calico.conflist", "10-calico.conflist"),
                                               ("10-bridge.conf", "10-bridge.conflist")])
def test_state_file_restores_byte_for_byte_after_a_restart(dirs, tmp_path, name, installed_as):
    conf, bindir, src = dirs
    original = (TESTDATA / ("calico.conflist" if name.endswith("conflist") else "bridge.conf")).read_bytes()
    (conf / name).write_bytes(original)
    state = str(tmp_path / "state" / "cni-install.json")
    first = install.Installer(str(bindir), str(conf), str(src), ENTRY, state_file=state)
    first.install()
    assert sorted(os.listdir(conf)) == [installed_as]
    del first                                            # the daemon is SIGKILLed
    second = install.Installer(str(bindir), str(conf), str(src), ENTRY, state_file=state)
    second.install()                                     # the restarted daemon
    second.uninstall()
    assert sorted(os.listdir(conf)) == [name]
    assert (conf / name).read_bytes() == original
    assert not os.path.exists(state)


def test_unreadable_state_file_is_ignored(dirs, tmp_path):
    conf, bindir, src = dirs
    state = tmp_path / "state.json"
    state.write_text("{garbage")
    (conf / "10-calico.conflist").write_bytes((TESTDATA / "calico.conflist").read_bytes())
    inst = install.Installer(str(bindir), str(conf), str(src), ENTRY, state_file=str(state))
    inst.install()
    inst.uninstall()
    assert (conf / "10-calico.conflist").read_bytes() == (TESTDATA / "calico.conflist").read_bytes()


def test_entry_carries_the_daemons_exclude_namespaces():
    """merbridge-cni reads excludeNamespaces from this entry: a daemon run with a
    non-default --exclude-namespaces must hand it on, or CNI mode ignores it."""
    from merbridge.cni import netconf
    from merbridge.daemon import config

    entry = install.plugin_entry("/run/s.sock", "istio", exclude_namespaces=("team-a", "team-b"))
    assert entry["excludeNamespaces"] == ["team-a", "team-b"]
    parsed = netconf.parse_netconf({"name": "n", "cniVersion": "1.0.0", **entry})
    assert parsed.exclude_namespaces == ("team-a", "team-b")
    # an empty list is passed on too: nothing is excluded
    empty = install.plugin_entry("/run/s.sock", exclude_namespaces=())
    assert netconf.parse_netconf({"name": "n", **empty}).exclude_namespaces == ()
    # without one, the plugin's default is the daemon's default
    assert "excludeNamespaces" not in ENTRY
    assert netconf.parse_netconf({"name": "n", **ENTRY}).exclude_namespaces == \
        config.DEFAULT_EXCLUDE_NAMESPACES == ("kube-system", "istio-system")


@pytest.mark.parametrize("bad,why", [
    (b"[1, 2, 3]\n", "not a JSON object but a list"),
    (b"[" * 200000 + b"]" * 200000, "nested too deeply"),
    (b'"just a string"', "not a JSON object but a str"),
    (b'{"cniVersion": "0.3.1", "plugins": {"not": "a list"}}', "neither 'plugins'"),
])
def test_bad_conflist_is_a_clear_error_and_retried_on_change(dirs, tmp_path, bad, why):
    """A conflist that is valid JSON but not an object, or nested deeper
    than the parser goes, is reported (log, problem, problem file for
    `merbridge status`), the watch thread lives on, and the next change of
    the file is installed."""
    conf, bindir, src = dirs
    state = str(tmp_path / "state" / "cni-install.json")
    target = conf / "10-calico.conflist"
    target.write_bytes(bad)
    inst = install.Installer(str(bindir), str(conf), str(src), ENTRY, state_file=state)
    thread = threading.Thread(target=inst.watch, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: inst.problem is not None)
        assert why in inst.problem and "10-calico.conflist" in inst.problem
        assert why in pathlib.Path(inst.problem_file).read_text()
        assert thread.is_alive() and not inst.ready.is_set()
        assert target.read_bytes() == bad                    # left as it was
        primary = (TESTDATA / "calico.conflist").read_bytes()
        install.atomic_write(str(target), primary)
        assert inst.ready.wait(5)
        assert wait_for(lambda: chained(target) and inst.problem is None)
        assert not os.path.exists(inst.problem_file)
    finally:
        inst.stop()
        thread.join(5)
    assert not thread.is_alive()
    inst.uninstall()
    assert target.read_bytes() == primary


def test_a_rewrite_racing_ours_is_not_lost(dirs, tmp_path, monkeypatch):
    """The primary CNI rewrites its file after we read it and before our
    rename: ours is not renamed over it (Raced, nothing written); the next
    round chains into the primary's new bytes, and uninstall gives those."""
    conf, bindir, src = dirs
    target = conf / "10-calico.conflist"
    primary = (TESTDATA / "calico.conflist").read_bytes()
    rewritten = primary.replace(b'"mtu": 1440', b'"mtu": 1400')
    target.write_bytes(primary)
    inst = install.Installer(str(bindir), str(conf), str(src), ENTRY,
                             state_file=str(tmp_path / "s" / "cni-install.json"))
    real_dumps = install.dumps

    def racing_dumps(config):             # the primary writes while we build ours
        if not target.read_bytes() == rewritten:
            target.write_bytes(rewritten)
        return real_dumps(config)

    monkeypatch.setattr(install, "dumps", racing_dumps)
    with pytest.raises(install.Raced):
        inst.install()
    assert target.read_bytes() == rewritten
    monkeypatch.setattr(install, "dumps", real_dumps)
    inst.install()
    assert chained(target) and b"1400" in target.read_bytes()
    inst.uninstall()
    assert target.read_bytes() == rewritten


# Runs one installer step sequence in a child that SIGKILLs itself right
# before its Nth file-system step (rename, unlink, fsync, chmod, mkstemp) of
# the install. Exit status -9: killed; 0: N was past the last step.
CRASHER = r'''
import os, signal, sys, tempfile
from merbridge.daemon import install
n, conf, bindir, src, state = int(sys.argv[1]), *sys.argv[2:6]
calls = [0]
def step(fn):
    def wrapped(*a, **kw):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **kw)
    return wrapped
for name in ("rename", "unlink", "fsync", "chmod"):
    setattr(install.os, name, step(getattr(os, name)))
install.tempfile.mkstemp = step(tempfile.mkstemp)
inst = install.Installer(bindir, conf, src, {"type": "merbridge-cni", "socketPath": "/s"},
                         state_file=state)
inst.install()
'''


@pytest.mark.parametrize("name", ["10-calico.conflist", "10-bridge.conf"])
@pytest.mark.parametrize("after", ["restart-then-uninstall", "uninstall"])
def test_kill_9_at_every_install_step_restores_byte_for_byte(dirs, tmp_path, name, after):
    """kill -9 of the installer before each of its file-system steps (state
    file first, then the config, then the old .conf's removal): a restarted
    daemon, installing again and then uninstalling, or just uninstalling,
    puts the original file back byte for byte and leaves nothing behind."""
    import signal
    import subprocess
    import sys
    conf, bindir, src = dirs
    original = (TESTDATA / ("calico.conflist" if name.endswith("conflist") else "bridge.conf")).read_bytes()
    original = original.replace(b"\n", b"\r\n  ")       # not our formatting: byte-exact counts
    state = str(tmp_path / "state" / "cni-install.json")
    killed = 0
    for n in range(1, 40):
        for p in (conf, bindir):
            shutil.rmtree(p)
            p.mkdir()
        if os.path.exists(state):
            os.unlink(state)
        (conf / name).write_bytes(original)
        r = subprocess.run([sys.executable, "-c", CRASHER, str(n), str(conf), str(bindir), str(src),
                            state], capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            break
        assert r.returncode == -signal.SIGKILL, r.stderr
        killed += 1
        restarted = install.Installer(str(bindir), str(conf), str(src), ENTRY, state_file=state)
        if after == "restart-then-uninstall":
            restarted.install()
            assert chained(conf / (os.path.splitext(name)[0] + ".conflist"))
        restarted.uninstall()
        assert sorted(os.listdir(conf)) == [name], n
        assert (conf / name).read_bytes() == original, n
        assert not os.path.exists(state), n
        assert [f for d in (bindir, os.path.dirname(state)) if os.path.isdir(d)
                for f in os.listdir(d) if f.startswith(".")] == [], n
    assert killed >= 5            # every step was crashed at, then the run completed
