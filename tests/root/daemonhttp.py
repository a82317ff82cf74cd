"""The daemon's metrics/health endpoint, fetched from inside the lab's node
netns (the daemon runs there with ``--metrics-addr=127.0.0.1:0`` and logs the
port it got)."""
from __future__ import annotations

import re
import subprocess
import sys

from daemonenv import Env
from merbridge.lab import netns

_FETCH = """\
import sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=10)
except urllib.error.HTTPError as e:
    r = e
sys.stdout.write(f"{r.status}\\n" + r.read().decode())
"""


def get(env: Env, proc: subprocess.Popen, path: str) -> tuple[int, str]:
    """(HTTP status, body) of GET ``path`` on the daemon ``proc``."""
    found = re.search(r"metrics and health on ([\d.]+):(\d+)", env.log(proc))
    assert found, "the daemon logged no metrics address"
    res = netns.run([sys.executable, "-c", _FETCH, f"http://{found[1]}:{found[2]}{path}"],
                    ns=env.lab.nodes[0].ns)
    assert res.returncode == 0, res.stderr
    status, _, body = res.stdout.partition("\n")
    return int(status), body


def scrape(env: Env, proc: subprocess.Popen) -> dict[str, float]:
    """/metrics as {"name{labels}": value}."""
    status, text = get(env, proc, "/metrics")
    assert status == 200, text
    return {name: float(value) for name, _, value in
            (line.rpartition(" ") for line in text.splitlines())
            if name and not name.startswith("#")}
