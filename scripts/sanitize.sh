#!/bin/bash
# The C core's tests under AddressSanitizer and UndefinedBehaviorSanitizer.
#
# Builds dma/src/*.c with -fsanitize=address,undefined into
# $BUILD/sanitize/pyvirtiofsd/dma (the Python modules are symlinked next to
# it), preloads the sanitizer runtimes into the venv's Python, and runs the
# tests that drive the C core: every DMA test, the fast path and the device
# through a fake front-end. Any report aborts the run (non-zero exit).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${PYVIRTIOFSD_BUILD_DIR:-$root/build}/sanitize
py=$root/.venv/bin/python
pkg=$build/pyvirtiofsd
rm -rf "$build"
mkdir -p "$pkg/dma"
# every other package of pyvirtiofsd as it is in the tree (pyproject's package-dir)
for d in daemon vm bench; do [ -d "$root/$d" ] && ln -s "$root/$d" "$pkg/$d"; done
for f in "$root"/dma/*.py "$root"/dma/py.typed; do ln -s "$f" "$pkg/dma/"; done
ln -s "$root/dma/src" "$pkg/dma/src"

start=$(date +%s)
"$py" - "$root" "$build" <<'PY'
import sys
from pathlib import Path

from cffi import FFI

root, build = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(root / "dma"))
import build_core  # the one place that knows the sources and declarations

ffi = FFI()
ffi.cdef(build_core.CDEF)
ffi.set_source(
    "pyvirtiofsd.dma._core",
    '#include "core.h"\n',
    sources=[str(root / s) for s in build_core.SOURCES],
    include_dirs=[str(root / "dma" / "src")],
    extra_compile_args=["-std=gnu11", "-O1", "-g", "-fno-omit-frame-pointer",
                        "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
    extra_link_args=["-pthread", "-fsanitize=address,undefined"],
)
ffi.compile(tmpdir=str(build), verbose=False)
PY
echo "sanitized C core built in $(( $(date +%s) - start )) s"

asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
export LD_PRELOAD="$asan:$ubsan"
# CPython itself is not instrumented and keeps its arenas until exit: leak
# checking would only report the interpreter.  Every other check is on.
# Reports go to files: a sanitizer that halts the interpreter mid-test would
# otherwise take pytest's captured stderr with it.
reports=$build/reports
mkdir -p "$reports"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:detect_stack_use_after_return=1:log_path=$reports/asan
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$reports/ubsan
export PYTHONPATH=$build
cd "$root"
"$py" -c 'import pyvirtiofsd.dma._core as c, sys; sys.exit(0 if "/sanitize/" in c.__file__ else 1)' \
    || { echo "error: the sanitized core was not the one imported" >&2; exit 1; }
rc=0
"$py" -m pytest -q -p no:cacheprovider -m "not vm" \
    tests/unit/test_dma_virtqueue.py tests/unit/test_dma_memory.py tests/unit/test_dma_windows.py \
    tests/unit/test_dma_fuzz.py tests/unit/test_device_engine.py tests/unit/test_device_frontend.py \
    "$@" || rc=$?
if compgen -G "$reports/*" >/dev/null; then
    echo "error: sanitizer reports:" >&2
    cat "$reports"/* >&2
    exit 1
fi
exit $rc
