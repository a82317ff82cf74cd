"""bpf/csource.py: the program text bcc compiles has our headers written in
(bcc rewrites map accesses only in that text), once each, with #line marks
that keep clang's messages pointing at the real files. No root, no bcc."""
import re

import pytest

from merbridge.bpf import csource, loader, programs
from merbridge.bpf import ambient
from merbridge.bpf.mesh import MESHES


def test_headers_are_written_in_once_with_line_marks(tmp_path):
    inc = tmp_path / "include"
    inc.mkdir()
    (inc / "a.h").write_text('#include "b.h"\nint a;\n')
    (inc / "b.h").write_text('#include <linux/types.h>\nint b;\n#include "a.h"\n')
    prog = tmp_path / "p.c"
    prog.write_text('#include "a.h"\n#include "b.h"\nint main;\n')
    assert csource.assemble(prog, inc).splitlines() == [
        f'#line 1 "{prog}"',
        f'#line 1 "{inc / "a.h"}"',
        f'#line 1 "{inc / "b.h"}"',
        "#include <linux/types.h>",
        "int b;",
        "",                             # a.h is being written: its include drops out
        f'#line 2 "{inc / "a.h"}"',
        "int a;",
        f'#line 2 "{prog}"',
        "",                             # so does b.h's, written already
        "int main;",
    ]


def test_several_files_are_one_text_with_each_header_once(tmp_path):
    inc = tmp_path / "include"
    inc.mkdir()
    (inc / "maps.h").write_text("int m;\n")
    one, two = tmp_path / "one.c", tmp_path / "two.c"
    one.write_text('#include "maps.h"\nint f1;\n')
    two.write_text('#include "maps.h"\nint f2;\n')
    text = csource.assemble_many([one, two], inc)
    assert text.count("int m;") == 1
    assert text.index("int m;") < text.index("int f1;") < text.index("int f2;")
    assert f'#line 1 "{two}"' in text


@pytest.mark.parametrize("cni_mode", [True, False])
def test_the_loader_compiles_its_sources_as_one_text(cni_mode):
    """load() compiles one text; in CNI mode inbound.c is part of it."""
    dp = loader.Datapath("/nonexistent", MESHES["istio"], cni_mode=cni_mode,
                         ambient=True)
    sources = dp.sources()
    assert len(sources) == len(set(sources))
    assert {p.source for p in dp.programs} <= set(sources)
    assert (loader.XDP_SOURCE in sources) == cni_mode
    text = csource.assemble_many([f"{loader.PROGS_DIR}/{s}" for s in sources],
                                 loader.INCLUDE_DIR)
    assert text.count("BPF_TABLE_PINNED(") == \
        csource.assemble(f"{loader.PROGS_DIR}/redir.c", loader.INCLUDE_DIR).count(
            "BPF_TABLE_PINNED(")                    # every map declared once


def test_a_missing_header_is_named(tmp_path):
    prog = tmp_path / "p.c"
    prog.write_text('\n#include "nope.h"\n')
    with pytest.raises(FileNotFoundError, match=r"p\.c:2: nope\.h"):
        csource.assemble(prog, tmp_path)


@pytest.mark.parametrize("source", sorted({p.source for p in loader.ALL_PROGRAMS}
                                          | {loader.XDP_SOURCE}))
def test_every_program_text_has_no_local_include_left(source):
    text = csource.assemble(f"{loader.PROGS_DIR}/{source}", loader.INCLUDE_DIR)
    assert not re.search(r'^\s*#\s*include\s+"', text, re.M)
    assert "BPF_TABLE_PINNED(" in text   # maps.h is in every program


def test_every_hook_is_known_to_the_loader():
    for p in programs.PROGRAMS + ambient.PROGRAMS:
        assert p.hook in loader.HOOKS, p
    assert set(loader.FEATURES) == {"ambient"}
    assert {p.func for p in ambient.PROGRAMS} == {"mb_ambient4", "mb_ambient6"}
