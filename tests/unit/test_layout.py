"""The ctypes mirrors in bpf/types.py match bpf/include/merbridge.h and
ambient.h.

gcc compiles a small program against the headers that prints sizeof/offsetof
of every mirrored struct and the value of every shared constant as JSON; the
test compares that with the mirrors; the struct-valued maps of maps.h and
ambient_maps.h must be in the pinned-layout guard (types.MAP_VALUES). No
root, no bcc.
"""
import ctypes as ct
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from merbridge.bpf import maps as bpfmaps
from merbridge.bpf import types as t

INCLUDE = Path(t.__file__).parent / "include"
#: the headers that declare what the daemon and the kernel share
HEADERS = (INCLUDE / "merbridge.h", INCLUDE / "ambient.h")
MAPS_HEADERS = (INCLUDE / "maps.h", INCLUDE / "ambient_maps.h")


def _text(paths) -> str:
    return "".join(p.read_text() for p in paths)


def _constants() -> dict[str, int]:
    """Every MB_* name types.py mirrors as a module constant, plus the counters."""
    names = {n: getattr(t, n) for n in dir(t)
             if n.startswith("MB_") and isinstance(getattr(t, n), int)}
    for idx, name in t.COUNTERS.items():
        names[f"MB_C_{name.upper()}"] = idx
    return names


def _program(consts: dict[str, int]) -> str:
    lines = ['#include <stdio.h>', '#include <stddef.h>',
             *[f'#include "{h.name}"' for h in HEADERS], 'int main(void) {', 'printf("{");']
    first = True
    for cname, cls in t.MIRRORS.items():
        items = ['\\"size\\": %zu', *[f'\\"{f}\\": %zu' for f, *_ in cls._fields_]]
        args = [f"sizeof(struct {cname})",
                *[f"offsetof(struct {cname}, {f})" for f, *_ in cls._fields_]]
        sep = "" if first else ","
        first = False
        lines.append(f'printf("{sep}\\"{cname}\\": {{{", ".join(items)}}}", {", ".join(args)});')
    for name in consts:
        lines.append(f'printf(",\\"{name}\\": %lld", (long long)({name}));')
    lines += ['printf("}\\n");', "return 0; }"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_view(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.fail("gcc is required (Debian package gcc)")
    d = tmp_path_factory.mktemp("layout")
    consts = _constants()
    (d / "layout.c").write_text(_program(consts))
    subprocess.run(["gcc", "-Wall", "-Werror", f"-I{INCLUDE}", "-o", str(d / "layout"),
                    str(d / "layout.c")], check=True)
    out = subprocess.run([str(d / "layout")], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("cname", sorted(t.MIRRORS))
def test_struct_layout(c_view, cname):
    cls = t.MIRRORS[cname]
    want = {"size": ct.sizeof(cls), **{f: getattr(cls, f).offset for f, *_ in cls._fields_}}
    assert c_view[cname] == want


def test_constants(c_view):
    consts = _constants()
    assert {n: c_view[n] for n in consts} == consts


def test_every_header_constant_is_mirrored():
    """A new MB_ constant or counter in the headers must show up in types.py."""
    text = _text(HEADERS)
    defined = set(re.findall(r"#define (MB_[A-Z0-9_]+) ", text))
    config = {"MB_OUT_PORT", "MB_IN_PORT", "MB_PROXY_UID", "MB_PROXY_GID", "MB_MESH",
              "MB_CNI_MODE", "MB_DEBUG", "MB_MARK_PORT", "MB_HBONE_PORT",
              "MB_DNS_PORT"}  # -D flags
    missing = defined - config - set(_constants())
    assert not missing


def test_every_header_struct_is_mirrored():
    """A new struct mb_* in the headers must get a ctypes mirror in types.py
    (registered in MIRRORS), or test_struct_layout would never see it."""
    declared = set(re.findall(r"^struct (mb_[a-z0-9_]+) \{", _text(HEADERS), re.M))
    assert declared, "no struct found: has the header's style changed?"
    assert declared - set(t.MIRRORS) == set()
    assert set(t.MIRRORS) - declared == set()   # and no mirror of a struct that is gone


def test_every_struct_valued_map_is_guarded_against_old_pins():
    """Each map of maps.h and ambient_maps.h whose value is a struct mb_* is
    in types.MAP_VALUES with the mirror of that very struct: loader.check_pinned_layouts then
    refuses a pin an older build left with other value sizes (mb_netns_ip
    once held one mb_addr per netns, now a struct mb_pod_ips)."""
    pattern = r'BPF_TABLE_PINNED\(\s*"\w+",\s*[\w ]+?,\s*struct (mb_\w+),\s*(mb_\w+),'
    declared = {name: cname for cname, name in re.findall(pattern, _text(MAPS_HEADERS))}
    assert declared[t.MAP_NETNS_IP] == "mb_pod_ips"
    assert declared[t.MAP_CGROUP_INFO] == "mb_cgroup_info"
    mirrors = {cls: cname for cname, cls in t.MIRRORS.items()}
    assert {name: mirrors[cls] for name, cls in t.MAP_VALUES.items()} == declared


def test_every_declared_map_is_named():
    """types.ALL_MAPS (pins removed, checked by open_maps, handed to Maps) is
    exactly the maps the headers declare."""
    text = _text(MAPS_HEADERS)
    declared = set(re.findall(r'BPF_TABLE_PINNED\(\s*"\w+",\s*[\w ]+?,\s*[\w ]+?,\s*(mb_\w+),', text))
    declared |= set(re.findall(r"^MB_SOCKHASH_PINNED\((mb_\w+),", text, re.M))
    assert declared == set(t.ALL_MAPS)


def test_pod_ips_one_per_family():
    v = t.MbPodIps.of(["fd00::5", "10.0.0.5"])
    assert v.ips() == ("10.0.0.5", "fd00::5")
    assert bytes(v.ip4) == t.addr_pack("10.0.0.5")
    assert t.MbPodIps.of(["fd00::5"]).ips() == ("fd00::5",)
    assert not any(t.MbPodIps.of(["fd00::5"]).ip4.ip)
    for bad in ([], ["10.0.0.5", "10.0.0.6"], ["fd00::5", "fd00::6"]):
        with pytest.raises(ValueError):
            t.MbPodIps.of(bad)


def test_netns_ip_values_are_pod_ips():
    """mb_netns_ip (legacy feedback) holds a netns' learned IPs, one per
    family; the handle and ``maps dump`` give both."""
    m = bpfmaps.Maps({n: bpfmaps.DictBackend() for n in t.ALL_MAPS})
    b = m.backends[t.MAP_NETNS_IP]
    b.put(struct.pack("=Q", 7), bytes(t.MbPodIps.of(["fd00::5", "10.0.0.5"])))
    b.put(struct.pack("=Q", 8), bytes(t.MbPodIps.of(["fd00::8"])))
    assert sorted(m.netns_ip.all_items()) == [(7, ("10.0.0.5", "fd00::5")), (8, ("fd00::8",))]
    assert sorted(m.netns_ip.items()) == [(7, "10.0.0.5"), (8, "fd00::8")]
    assert m.dump()[t.MAP_NETNS_IP] == {"7": ["10.0.0.5", "fd00::5"], "8": ["fd00::8"]}


def test_counter_names_unique():
    assert len(set(t.COUNTERS.values())) == len(t.COUNTERS)
    assert max(t.COUNTERS) < t.MB_C_XDP_FIRST < t.MB_N_COUNTERS
