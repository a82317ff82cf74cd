"""Datapath.cflags carries the chosen mesh's ports and proxy identity into
the C programs, and merbridge.h really takes them (no root, no kernel).

The flags are compiled by the host gcc against bpf/include/merbridge.h, which
prints the values the programs would see, so a flag the header ignored (a
misspelt -D, a missing #ifndef) fails here for every mesh, not only Istio,
whose values are also the header's defaults.
"""
import json
import shutil
import subprocess

import pytest

from merbridge.bpf import loader, mesh

SEEN = ("MB_OUT_PORT", "MB_IN_PORT", "MB_PROXY_UID", "MB_PROXY_GID", "MB_MESH",
        "MB_CNI_MODE", "MB_MARK_PORT")


def _header_view(cflags: list[str], tmp_path) -> dict[str, int]:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is required (Debian package gcc)")
    body = ",".join(f'\\"{n}\\": %lld' for n in SEEN)
    args = ", ".join(f"(long long)({n})" for n in SEEN)
    src = tmp_path / "flags.c"
    src.write_text('#include <stdio.h>\n#include "merbridge.h"\n'
                   f'int main(void) {{ printf("{{{body}}}\\n", {args}); return 0; }}\n')
    flags = [f for f in cflags if f.startswith(("-I", "-D"))]
    subprocess.run(["gcc", "-Wall", "-Werror", *flags, "-o", str(tmp_path / "flags"), str(src)],
                   check=True)
    out = subprocess.run([str(tmp_path / "flags")], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("name", ["linkerd", "kuma", "osm"])
def test_non_istio_mesh_flags_reach_the_programs(name, tmp_path):
    m = mesh.get(name)
    dp = loader.Datapath(str(tmp_path / "pins"), m, cni_mode=True)   # builds nothing yet
    flags = dp.cflags()
    assert f"-DMB_OUT_PORT={m.out_port}" in flags and f"-DMB_IN_PORT={m.in_port}" in flags
    assert f"-DMB_PROXY_UID={m.proxy_uid}" in flags and f"-DMB_MESH={m.code}" in flags
    assert _header_view(flags, tmp_path) == {
        "MB_OUT_PORT": m.out_port, "MB_IN_PORT": m.in_port, "MB_PROXY_UID": m.proxy_uid,
        "MB_PROXY_GID": m.proxy_gid, "MB_MESH": m.code, "MB_CNI_MODE": 1,
        "MB_MARK_PORT": mesh.MARK_LISTENER_PORT}


def test_linkerd_differs_from_the_header_defaults(tmp_path):
    """The check above could pass by accident only if linkerd's values were
    the header's (Istio's) defaults: they are not."""
    istio, linkerd = mesh.get("istio"), mesh.get("linkerd")
    assert (linkerd.out_port, linkerd.in_port, linkerd.proxy_uid) != (
        istio.out_port, istio.in_port, istio.proxy_uid)
    assert _header_view([f"-I{loader.INCLUDE_DIR}"], tmp_path)["MB_PROXY_UID"] == istio.proxy_uid
