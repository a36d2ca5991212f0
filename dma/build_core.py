"""cffi builder for ``pyvirtiofsd.dma._core`` (out-of-line API mode).

Run by the package build (``cffi_modules`` in setup.py). The C sources live in
``dma/src/``; the declarations cffi exposes to Python are those of
``dma/src/core.h``: ``CDEF`` is derived from that header (preprocessor lines
dropped, integer ``#define``s turned into ``#define NAME ...``) so the two can
never drift apart.

API mode releases the GIL around every C call, which is what lets the
per-queue worker threads run the data path in parallel.
"""

from __future__ import annotations

import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"

SOURCES = sorted(str(p.relative_to(HERE.parent)) for p in SRC.glob("*.c"))

_DEFINE = re.compile(r"^#define\s+([A-Z_][A-Z0-9_]*)\s+-?\d+\s*$")


def _cdef_from_header(text: str) -> str:
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            m = _DEFINE.match(line)
            if m and not m.group(1).endswith("_H"):
                out.append(f"#define {m.group(1)} ...")
            continue
        out.append(line)
    return "\n".join(out) + "\n"


CDEF = _cdef_from_header((SRC / "core.h").read_text())

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "pyvirtiofsd.dma._core",
    '#include "core.h"\n',
    sources=SOURCES,
    include_dirs=[str(SRC)],
    extra_compile_args=[
        "-std=gnu11",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror=implicit-function-declaration",
    ],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
