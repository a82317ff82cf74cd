"""The lab's generated texts: istio-iptables rules and the sidecar log format."""
import subprocess

import pytest

from merbridge.lab import labconfig

# ISTIO_OUTPUT of istio's cni/pkg/plugin/testdata/basic.txt.golden, in order.
GOLDEN_OUTPUT_V4 = """\
-A ISTIO_OUTPUT -p tcp --dport 15020 -j RETURN
-A ISTIO_OUTPUT -p udp --dport 15020 -j RETURN
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
""".splitlines()


def chain(rules, name):
    return [r for r in rules.splitlines() if r.startswith(f"-A {name} ")]


def test_v4_matches_istio_cni_golden():
    rules = labconfig.istio_iptables(4)
    assert chain(rules, "ISTIO_OUTPUT") == GOLDEN_OUTPUT_V4
    assert chain(rules, "ISTIO_INBOUND") == [
        f"-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN" for p in (15008, 15020, 15021, 15090)
    ] + ["-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"]
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in rules
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in rules
    assert rules.startswith("*nat\n") and rules.endswith("COMMIT\n")


def test_v6_uses_v6_loopback_and_passthrough_and_filters_cidrs():
    rules = labconfig.istio_iptables(6, exclude_outbound_cidrs=("10.0.0.0/8", "fd00:1::/64"))
    out = chain(rules, "ISTIO_OUTPUT")
    assert "-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN" in out
    assert "-A ISTIO_OUTPUT -d ::1/128 -j RETURN" in out
    assert "-A ISTIO_OUTPUT -d fd00:1::/64 -j RETURN" in out
    assert not any("10.0.0.0" in r for r in out)
    assert out[-1] == "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"
    assert out.index("-A ISTIO_OUTPUT -d fd00:1::/64 -j RETURN") < len(out) - 1


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError):
        labconfig.istio_iptables(5)
    with pytest.raises(ValueError):
        labconfig.istio_iptables(4, exclude_outbound_cidrs=("nonsense",))
    with pytest.raises(ValueError):
        labconfig.sidecar(mode="udp")


def test_log_line_round_trip():
    line = ("mb fe=inbound4 src=::ffff:10.1.0.2 sport=4000 dst=10.1.0.3 dport=8080 "
            "bsrc=127.0.0.6 bsport=5000 server=10.1.0.3 sdport=8080 term=--\n")
    e = labconfig.parse_log_line(line)
    assert e == {"fe": "inbound4", "dir": "inbound", "src": "10.1.0.2", "sport": 4000,
                 "dst": "10.1.0.3", "dport": 8080, "bsrc": "127.0.0.6", "bsport": 5000,
                 "server": "10.1.0.3", "sdport": 8080, "term": "--"}
    assert labconfig.parse_log_line("[NOTICE] haproxy started\n") is None
    assert labconfig.LOG_FORMAT in labconfig.sidecar()


@pytest.mark.parametrize("text", [labconfig.sidecar(), labconfig.sidecar(mode="http", threads=2),
                                  labconfig.http_app(8080)],
                         ids=["sidecar-tcp", "sidecar-http", "http-app"])
def test_haproxy_accepts_the_config_and_loads_no_ca_store(tmp_path, text):
    """Every lab haproxy starts without reading the system CA store: 150-odd
    files that made its start take seconds in the vm tier's emulated CPU."""
    cfg = tmp_path / "h.cfg"
    cfg.write_text(text)
    trace = tmp_path / "trace"
    res = subprocess.run(["strace", "-f", "-e", "trace=openat", "-o", str(trace),
                          "haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    opened = trace.read_text()
    assert "/etc/resolv.conf" in opened      # the trace saw haproxy's start
    assert "/ssl/certs/" not in opened
