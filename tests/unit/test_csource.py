"""bpf/csource.py: the program text bcc compiles has our headers written in
(bcc rewrites map accesses only in that text), once each, with #line marks
that keep clang's messages pointing at the real files. No root, no bcc."""
import re

import pytest

from merbridge.bpf import csource, loader, programs
from merbridge.bpf import ambient


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
