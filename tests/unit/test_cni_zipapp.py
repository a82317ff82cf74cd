"""The node executable: a stdlib-only zipapp of merbridge.cni run by the host's python3."""
from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys
import time
import zipfile

import pytest

import merbridge.cni
from merbridge.cni.zipapp import build_zipapp
from merbridge.daemon.cniserver import CniServer
from test_cniserver import FakeHandler

HOST_PYTHON = "/usr/bin/python3"
CNI_DIR = pathlib.Path(merbridge.cni.__file__).parent


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return build_zipapp(str(tmp_path_factory.mktemp("bin") / "merbridge-cni"))


def run_exe(exe, environ, stdin=b"", argv0=(HOST_PYTHON, "-IS")):
    return subprocess.run([*argv0, exe], input=stdin, capture_output=True, timeout=30,
                          env=environ)


def test_contents_are_only_the_cni_package(exe):
    with open(exe, "rb") as f:
        assert f.readline() == b"#!/usr/bin/env -S python3 -IS\n"
    names = zipfile.ZipFile(exe).namelist()
    files = [n for n in names if not n.endswith("/")]
    assert "__main__.py" in files and "merbridge/__init__.py" not in files
    sources = {p.name for p in CNI_DIR.glob("*.py")}
    assert {n.rsplit("/", 1)[1] for n in files if n.endswith(".py") and "/" in n} == sources
    assert all(n == "__main__.py" or n.startswith("merbridge/cni/") for n in files)
    assert os.stat(exe).st_mode & 0o777 == 0o755


def test_version_under_env_i_isolated_host_python(exe):
    p = run_exe(exe, {"CNI_COMMAND": "VERSION"})
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0",
                                                         "1.1.0"]


def test_runs_through_its_shebang(exe):
    p = subprocess.run([exe], capture_output=True, timeout=30,
                       env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0 and b"supportedVersions" in p.stdout


def test_add_round_trip_and_errors_as_a_process(exe, tmp_path):
    handler = FakeHandler()
    sock = str(tmp_path / "mb.sock")
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/p"}],
            "ips": [{"interface": 0, "address": "10.244.1.2/24"}], "dns": {}}
    conf = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "merbridge-cni",
                       "socketPath": sock, "prevResult": prev, "failOpen": False}).encode()
    environ = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/p",
               "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
               "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"}
    with CniServer(sock, handler, allowed_uids=(os.getuid(),), owner=None):
        p = run_exe(exe, environ, conf)
        assert p.returncode == 0, p.stderr
        assert p.stdout == json.dumps(prev).encode() + b"\n"
        assert handler.enrolled["c1"].ips == ("10.244.1.2/24",)
    p = run_exe(exe, environ, conf)            # daemon gone now
    assert p.returncode == 1 and json.loads(p.stdout)["code"] == 11
    assert b"Traceback" not in p.stderr
    p = run_exe(exe, dict(environ, CNI_COMMAND="DEL"), conf)
    assert (p.returncode, p.stdout) == (0, b"")
    for bad in (b"\xff\xfe", b"{", b"x" * (2 << 20)):
        p = run_exe(exe, environ, bad)
        assert p.returncode == 1 and json.loads(p.stdout)["code"] == 6
        assert b"Traceback" not in p.stderr


def test_closed_stdio_does_not_crash(exe):
    p = subprocess.run(f"exec {HOST_PYTHON} -I {exe} <&- 2>&-", shell=True, capture_output=True,
                       timeout=30, env={"CNI_COMMAND": "ADD"})
    assert p.returncode == 1 and json.loads(p.stdout)["code"] == 4


def test_add_imports_only_what_it_needs(exe, tmp_path):
    """The modules that made every pod start ~30 ms slower stay out of an ADD."""
    conf = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "merbridge-cni",
                       "socketPath": str(tmp_path / "absent.sock"), "failOpen": False,
                       "prevResult": {"cniVersion": "1.0.0",
                                      "ips": [{"address": "10.244.1.2/24"}]}}).encode()
    environ = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/p",
               "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
               "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"}
    p = run_exe(exe, environ, conf, argv0=(HOST_PYTHON, "-IS", "-X", "importtime"))
    assert json.loads(p.stdout)["code"] == 11        # it went as far as the daemon socket
    imported = {line.rsplit("|", 1)[1].strip() for line in p.stderr.decode().splitlines()
                if line.startswith("import time:") and "|" in line}
    assert {"merbridge.cni.client", "merbridge.cni.protocol", "socket"} <= imported
    assert not imported & {"http.client", "email", "ssl", "dataclasses", "inspect", "site"}


def test_version_start_up_is_quick(exe):
    best = min(_timed(exe) for _ in range(5))
    print(f"VERSION start-up via {HOST_PYTHON} -IS: {best * 1000:.0f} ms")
    assert best < 0.5


def _timed(exe):
    t0 = time.perf_counter()
    run_exe(exe, {"CNI_COMMAND": "VERSION"})
    return time.perf_counter() - t0


def test_cni_package_imports_only_the_standard_library():
    for path in CNI_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    continue
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or name.startswith("merbridge.cni"), \
                    f"{path.name} imports {name}"


def test_version_imports_no_plugin_machinery():
    code = ("import os, sys, io; os.environ['CNI_COMMAND'] = 'VERSION'\n"
            "from merbridge.cni import main\n"
            "try:\n    main.main()\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('merbridge.cni.protocol', 'http.client', 'bcc', 'kubernetes',"
            " 'pyroute2', 'click', 'yaml') if m in sys.modules]\n"
            "print(bad, file=sys.stderr); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
