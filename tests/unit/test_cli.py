"""The merbridge command line (click's CliRunner), config defaults and doctor."""
import json
import logging
import os

import pytest
from click.testing import CliRunner

from merbridge.daemon import cli, config, doctor, install

RUN = cli.main.commands["run"]


def parse_run(args, monkeypatch, env=None):
    monkeypatch.delenv("NODE_NAME", raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    with RUN.make_context("run", list(args)) as ctx:
        return ctx.params


@pytest.mark.parametrize("args,cni,hw", [
    (["--cni-mode=true"], True, False),
    (["--cni-mode=false"], False, False),
    (["--cni-mode"], True, False),
    (["--cni-mode=true", "--hardware-checksum=true"], True, True),
    ([], False, False),
])
def test_upstream_boolean_syntax(args, cni, hw, monkeypatch):
    params = parse_run(args, monkeypatch)
    assert params["cni_mode"] is cni and params["hardware_checksum"] is hw


def test_inbound_hook_flag(monkeypatch):
    assert parse_run([], monkeypatch)["inbound_hook"] == "tc"
    assert config.DaemonConfig().inbound_hook == "tc"
    assert parse_run(["--inbound-hook=xdp"], monkeypatch)["inbound_hook"] == "xdp"
    r = CliRunner().invoke(cli.main, ["run", "--inbound-hook=iptables"])
    assert r.exit_code == 2 and "--inbound-hook" in r.output


def test_podnet_refuses_an_unknown_hook():
    from merbridge.daemon import podnet
    with pytest.raises(podnet.PodNetError, match="inbound hook"):
        podnet.PodNet(lambda: (0, 0), inbound_hook="iptables")
    with pytest.raises(podnet.PodNetError, match="tc_programs"):
        podnet.PodNet(lambda: (0, 0), inbound_hook="tc")
    assert podnet.DEFAULT_INBOUND_HOOK == "tc"


def test_manifest_sed_switch(monkeypatch):
    manifest_args = "--mode=istio --cni-mode=false --hardware-checksum=false --node-name=n1"
    switched = manifest_args.replace("--cni-mode=false", "--cni-mode=true")   # what the sed does
    assert parse_run(manifest_args.split(), monkeypatch)["cni_mode"] is False
    assert parse_run(switched.split(), monkeypatch)["cni_mode"] is True


def test_bad_values_are_usage_errors(monkeypatch):
    runner = CliRunner()
    r = runner.invoke(cli.main, ["run", "--cni-mode=maybe"])
    assert r.exit_code == 2 and "--cni-mode" in r.output
    r = runner.invoke(cli.main, ["run", "--mode=consul"])
    assert r.exit_code == 2 and "consul" in r.output


def test_node_name_comes_from_env_never_hostname(monkeypatch):
    assert parse_run([], monkeypatch, {"NODE_NAME": "node-7"})["node_name"] == "node-7"
    assert parse_run(["--node-name=x"], monkeypatch, {"NODE_NAME": "node-7"})["node_name"] == "x"
    assert parse_run([], monkeypatch)["node_name"] == ""
    monkeypatch.delenv("NODE_NAME", raising=False)
    r = CliRunner().invoke(cli.main, ["run", "--cgroup-path=/tmp"])
    assert r.exit_code == 2
    assert "NODE_NAME" in r.output and "hostname" in r.output


def test_run_builds_the_config_and_calls_the_runtime(monkeypatch, tmp_path):
    from merbridge.daemon import runtime
    seen = []
    monkeypatch.setattr(runtime, "run", lambda cfg: seen.append(cfg) or 0)
    monkeypatch.setenv("NODE_NAME", "node-9")
    r = CliRunner().invoke(cli.main, [
        "run", "--mode=linkerd", "--cni-mode=true", f"--pods-dir={tmp_path}",
        "--exclude-namespaces=kube-system, istio-system", "--metrics-addr=127.0.0.1:0",
        "--socket-path=/tmp/x.sock"])
    assert r.exit_code == 0, r.output
    (cfg,) = seen
    assert isinstance(cfg, config.DaemonConfig)
    assert (cfg.mesh, cfg.cni_mode, cfg.node_name, cfg.pods_dir) == ("linkerd", True, "node-9", str(tmp_path))
    assert cfg.exclude_namespaces == ("kube-system", "istio-system")
    assert cfg.cgroup_path == config.find_cgroup2_mount()       # resolved default
    assert cfg.bpffs_path == "/sys/fs/bpf/merbridge" and cfg.socket_path == "/tmp/x.sock"


def test_pods_dir_must_exist(monkeypatch, tmp_path):
    r = CliRunner().invoke(cli.main, ["run", f"--pods-dir={tmp_path / 'nope'}", "--cgroup-path=/tmp"])
    assert r.exit_code == 2 and "not a directory" in r.output


def test_find_cgroup2_mount(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup2 /x\\040y cgroup2 rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    assert config.find_cgroup2_mount(str(mounts)) == "/sys/fs/cgroup/unified"
    mounts.write_text("cgroup2 /x\\040y cgroup2 rw 0 0\n")
    assert config.find_cgroup2_mount(str(mounts)) == "/x y"
    mounts.write_text("proc /proc proc rw 0 0\n")
    assert config.find_cgroup2_mount(str(mounts)) is None


def test_logfmt_lines():
    rec = logging.LogRecord("merbridge.daemon.pods", logging.WARNING, __file__, 1,
                            'pod %s said "hi"', ("shop/a",), None)
    line = cli.LogfmtFormatter().format(rec)
    assert line.startswith("ts=") and line.endswith('msg="pod shop/a said \\"hi\\""')
    assert " level=warning logger=merbridge.daemon.pods " in line


def test_install_and_uninstall_cni_commands(tmp_path):
    conf, bindir = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    plugin = tmp_path / "plugin"
    plugin.write_text("#!/bin/sh\n")
    runner = CliRunner()
    args = [f"--cni-bin-dir={bindir}", f"--cni-conf-dir={conf}", f"--state-dir={tmp_path / 'state'}"]
    r = runner.invoke(cli.main, ["install-cni", *args, f"--plugin={plugin}"])
    assert r.exit_code == 2 and "no CNI config" in r.output
    original = b'{"cniVersion": "1.0.0", "name": "n", "type": "bridge"}'
    (conf / "10-bridge.conf").write_bytes(original)
    r = runner.invoke(cli.main, ["install-cni", *args, f"--plugin={plugin}", "--socket-path=/run/s.sock"])
    assert r.exit_code == 0, r.output
    chained = json.loads((conf / "10-bridge.conflist").read_text())
    assert chained["plugins"][-1] == install.plugin_entry("/run/s.sock", "istio")
    assert (bindir / "merbridge-cni").exists()
    r = runner.invoke(cli.main, ["uninstall-cni", *args])
    assert r.exit_code == 0, r.output
    assert not (bindir / "merbridge-cni").exists()
    assert sorted(os.listdir(conf)) == ["10-bridge.conf"]      # converted back, byte for byte
    assert (conf / "10-bridge.conf").read_bytes() == original


def test_maps_dump_without_pins_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(cli.main, ["maps", "dump", f"--bpffs-path={tmp_path}"])
    assert r.exit_code == 1
    assert "no datapath pinned" in r.output and "Traceback" not in r.output


# ----------------------------------------------------------------- drain (preStop)

class DrainHandler:
    """The daemon side of POST /v1/drain: refuses (try again) ``busy`` times first."""

    def __init__(self, busy=0, error=None):
        self.calls, self.busy, self.error = 0, busy, error

    def drain(self):
        from merbridge.cni.errors import CniError
        self.calls += 1
        if self.error is not None:
            raise self.error
        if self.calls <= self.busy:
            raise CniError(11, "merbridge is not ready", "starting")
        return "merbridge-cni removed from /etc/cni/net.d"


@pytest.fixture
def drain_socket(tmp_path):
    """Serve a drain on a real CNI socket: ``serve(handler) -> socket path``
    (a handler without ``drain``: the server cannot drain)."""
    from merbridge.daemon.cniserver import CniServer
    servers = []

    def serve(handler):
        path = str(tmp_path / f"cni-{len(servers)}.sock")
        srv = CniServer(path, handler, allowed_uids=(os.getuid(),), owner=None,
                        drain=getattr(handler, "drain", None))
        srv.start()
        servers.append(srv)
        return path
    yield serve
    for srv in servers:
        srv.stop()


def drain(path, *extra):
    return CliRunner().invoke(cli.main, ["drain", f"--socket-path={path}", *extra])


def test_drain_waits_until_the_daemon_has_drained(drain_socket):
    handler = DrainHandler(busy=2)                   # still starting for two attempts
    r = drain(drain_socket(handler))
    assert r.exit_code == 0, r.output
    assert handler.calls == 3
    assert "merbridge drained: merbridge-cni removed from /etc/cni/net.d" in r.output


def test_drain_without_a_daemon_has_nothing_to_do(tmp_path):
    r = drain(tmp_path / "none.sock")                   # legacy mode: no socket at all
    assert r.exit_code == 0 and "nothing to drain" in r.output
    stale = tmp_path / "stale.sock"                      # left by a daemon that died
    import socket
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    r = drain(stale)
    assert r.exit_code == 0 and "nothing to drain" in r.output


def test_drain_failures_are_clear_errors(drain_socket, tmp_path):
    from merbridge.cni.errors import CniError
    r = drain(drain_socket(DrainHandler(error=CniError(999, "installer stuck", "EIO"))))
    assert r.exit_code == 1 and "drain failed: installer stuck: EIO" in r.output
    r = drain(drain_socket(DrainHandler(busy=100)), "--timeout=1")
    assert r.exit_code == 1 and "not drained within 1s" in r.output
    r = drain(drain_socket(object()))                # a server that cannot drain: 404
    assert r.exit_code == 1 and "no such endpoint: POST /v1/drain" in r.output
    import socket
    import threading
    garbage = str(tmp_path / "garbage.sock")            # something that is not our daemon
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(garbage)
        listener.listen()

        def answer():
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"SSH-2.0-OpenSSH\r\n")
        t = threading.Thread(target=answer)
        t.start()
        r = drain(garbage)
        t.join()
    assert r.exit_code == 1 and "drain failed" in r.output and "bad reply" in r.output
    assert "Traceback" not in r.output
    assert drain(tmp_path / "x", "--timeout=0").exit_code == 2


def test_daemon_drain_restores_the_conflist_and_is_refused_while_starting(tmp_path):
    import threading
    from types import SimpleNamespace

    from merbridge.daemon import runtime
    from merbridge.cni.errors import CniError
    conf, bindir = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    original = b'{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "bridge"}]}\n'
    (conf / "10-n.conflist").write_bytes(original)
    plugin = tmp_path / "plugin"
    plugin.write_text("#!/bin/sh\n")
    daemon = runtime.Daemon(SimpleNamespace(mode="istio", mesh="istio", cni_conf_dir=str(conf)))
    daemon.registry = SimpleNamespace(ready=True)
    daemon.installer = install.Installer(str(bindir), str(conf), str(plugin),
                                         install.plugin_entry("/run/s.sock"))
    watcher = threading.Thread(target=daemon.installer.watch)
    watcher.start()
    daemon._installer_thread = watcher
    assert daemon.installer.ready.wait(10)
    assert (conf / "10-n.conflist").read_bytes() != original
    with pytest.raises(CniError, match="not ready") as err:     # still starting
        daemon.drain()
    assert err.value.code == 11 and watcher.is_alive()
    daemon.ready.set()
    assert daemon.drain() == f"merbridge-cni removed from {conf}"
    assert not watcher.is_alive()                                # no re-installer any more
    assert (conf / "10-n.conflist").read_bytes() == original
    assert not (bindir / "merbridge-cni").exists()
    assert not daemon.ready.is_set() and daemon.registry.ready is False
    assert daemon.registry.draining is True                      # STATUS says so
    assert daemon.drain() == "already drained"


# ----------------------------------------------------------------- doctor

def test_doctor_reports_what_is_missing_and_how_to_fix(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw 0 0\nbpf /other/bpf bpf rw 0 0\n")
    checks = doctor.run_checks(bpffs_path="/sys/fs/bpf/merbridge", mounts_file=str(mounts),
                               kernel_release="5.4.0-100-generic", caps=1 << 21,
                               bcc=lambda: (False, "No module named 'bcc'"))
    by = {c.name: c for c in checks}
    assert by["kernel"].status == "fail" and "5.15" in by["kernel"].fix
    assert by["privileges"].status == "fail" and "without CAP_NET_ADMIN" in by["privileges"].detail
    assert "CAP_SYS_ADMIN" not in by["privileges"].detail
    assert by["cgroup v2"].status == "fail" and "mount -t cgroup2" in by["cgroup v2"].fix
    assert by["bpffs"].status == "fail" and "/other/bpf" in by["bpffs"].detail
    assert "mount -t bpf" in by["bpffs"].fix
    assert by["bcc"].status == "fail" and "python3-bpfcc" in by["bcc"].fix
    assert by["program type sk_msg"].status == "skip" and "root's capabilities" in by["program type sk_msg"].detail
    assert not doctor.passed(checks)
    text = doctor.render_text(checks)
    assert "FAIL kernel" in text and "fix: " in text and "cannot run here" in text


def test_doctor_flags_missing_kernel_features(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n")
    features = {"program_types": {f"have_{t}_prog_type": True for t in doctor.PROGRAM_TYPES},
                "map_types": {f"have_{t}_map_type": t != "sockhash" for t in doctor.MAP_TYPES}}
    checks = doctor.run_checks(mounts_file=str(mounts), cgroup_path=str(tmp_path), caps=(1 << 64) - 1,
                               kernel_release="6.1.0", probe=lambda: features, bcc=lambda: (True, "0.26"))
    by = {c.name: c for c in checks}
    assert by["map type sockhash"].status == "fail"
    assert "CONFIG_BPF_STREAM_PARSER" in by["map type sockhash"].fix
    assert by["cgroup v2"].status == "fail"       # tmp_path is not a cgroup directory
    assert by["program type xdp"].status == "ok"


def test_default_attach_point_is_the_kubelets_pods_cgroup(tmp_path):
    """kubepods (cgroupfs) or kubepods.slice (systemd) under the cgroup2
    mount when there is one, so node processes never run the programs; the
    cgroup2 root otherwise, or with --ambient. Each answer says why."""
    mount = tmp_path / "cg"
    mount.mkdir()
    (mount / "cgroup.procs").write_text("")
    path, why = config.default_attach_point(str(mount))
    assert path == str(mount) and "no kubepods" in why
    for name in ("kubepods.slice", "kubepods"):
        (mount / name).mkdir()
        (mount / name / "cgroup.procs").write_text("")
    path, why = config.default_attach_point(str(mount))
    assert path == str(mount / "kubepods") and "kubelet's pods cgroup (kubepods)" in why
    (mount / "kubepods" / "cgroup.procs").unlink()
    assert config.default_attach_point(str(mount))[0] == str(mount / "kubepods.slice")
    path, why = config.default_attach_point(str(mount), ambient=True)
    assert path == str(mount) and "--ambient" in why
    # explicit --cgroup-path wins, and says so
    cfg = config.DaemonConfig(node_name="n", cgroup_path=str(mount)).validate()
    assert (cfg.cgroup_path, cfg.cgroup_reason) == (str(mount), "--cgroup-path")


def test_doctor_says_where_it_would_attach_and_why(tmp_path):
    mount = tmp_path / "cg"
    (mount / "kubepods.slice").mkdir(parents=True)
    for d in (mount, mount / "kubepods.slice"):
        (d / "cgroup.procs").write_text("")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"cgroup2 {mount} cgroup2 rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n")
    checks = doctor.run_checks(mounts_file=str(mounts), caps=(1 << 64) - 1, kernel_release="6.1.0",
                               probe=lambda: None, bcc=lambda: (True, "0.26"))
    by = {c.name: c for c in checks}
    assert by["attach point"].status == "ok"
    assert str(mount / "kubepods.slice") in by["attach point"].detail
    assert "node processes never run the programs" in by["attach point"].detail
    checks = doctor.run_checks(mounts_file=str(mounts), cgroup_path=str(mount), caps=(1 << 64) - 1,
                               kernel_release="6.1.0", probe=lambda: None, bcc=lambda: (True, "0.26"))
    assert "(--cgroup-path)" in {c.name: c for c in checks}["attach point"].detail
