#!/bin/sh
# mypy sees the installed names (pyvirtiofsd.daemon, .dma, .vm) through a tree
# of symlinks: it cannot follow setuptools' editable-install import hook.
set -eu
root="$(cd "$(dirname "$0")/.." && pwd)"
tree="$root/build/typecheck"
mkdir -p "$tree/pyvirtiofsd"
for p in bench daemon dma vm; do ln -sfn "$root/$p" "$tree/pyvirtiofsd/$p"; done
cd "$tree"
exec "$root/.venv/bin/mypy" --config-file "$root/pyproject.toml" \
    -p pyvirtiofsd.bench -p pyvirtiofsd.daemon -p pyvirtiofsd.dma -p pyvirtiofsd.vm "$@"
