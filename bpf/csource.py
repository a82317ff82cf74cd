"""The C text bcc compiles: a program file with our headers written into it.

bcc rewrites map accesses (``mb_counters.lookup(&idx)``, ``m.update(...)``)
only in the text it is given to compile, never in a header that text
includes: a map access left in a header compiles into a call the verifier
rejects. So that shared workers with map accesses can live in headers
(bpf/include/pod.h, connect.h, ...), the loader hands bcc one text: the
program file with each ``#include "name.h"`` of bpf/include/ replaced by that
header, once, recursively. ``#line`` marks keep clang's messages and the
verifier's source lines pointing at the real file and line. System headers
(``#include <...>``) are left to the compiler. Standard library only.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

_LOCAL = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def assemble(path: str | Path, include_dir: str | Path) -> str:
    """The text of the C file at path with its bpf/include/ headers inlined.
    FileNotFoundError for a quoted include that is not in include_dir."""
    return assemble_many([path], include_dir)


def assemble_many(paths: Iterable[str | Path], include_dir: str | Path) -> str:
    """The C files at paths, one after the other, as one text (one compile):
    each header written once, before the first file that includes it."""
    include_dir = Path(include_dir)
    seen: set[Path] = set()
    out: list[str] = []

    def emit(p: Path) -> None:
        out.append(f'#line 1 "{p}"')
        for n, line in enumerate(p.read_text().splitlines(), 1):
            m = _LOCAL.match(line)
            if m is None:
                out.append(line)
                continue
            header = include_dir / m.group(1)
            if not header.is_file():
                raise FileNotFoundError(f"{p}:{n}: {m.group(1)} is not in {include_dir}")
            if header in seen:   # written once, as its include guard would
                out.append("")   # keeps the lines that follow where they are
                continue
            seen.add(header)
            emit(header)
            out.append(f'#line {n + 1} "{p}"')

    for path in paths:
        emit(Path(path))
    return "\n".join(out) + "\n"
