"""cffi builder for ``pyvirtiofsd.dma._core`` (out-of-line API mode).

Run by the package build (``cffi_modules`` in setup.py). The C sources live in
``dma/src/``; the declarations cffi exposes to Python are in ``CDEF`` below.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"

SOURCES = sorted(str(p.relative_to(HERE.parent)) for p in SRC.glob("*.c"))

CDEF = """
int pvd_core_abi_version(void);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "pyvirtiofsd.dma._core",
    '#include "core.h"\n',
    sources=SOURCES,
    include_dirs=[str(SRC)],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
