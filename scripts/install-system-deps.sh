#!/bin/sh
# Install the Debian 12 packages pyvirtiofsd needs, only if some are missing.
# Idempotent and silent when everything is present; a clear error when a
# package is missing and we are not root (no sudo prompt in CI).
set -eu

PACKAGES="
qemu-system-x86
qemu-utils
busybox-static
linux-source-6.1
linux-source-6.12
build-essential
flex
bison
bc
libelf-dev
libssl-dev
xz-utils
cpio
patch
libfuse3-dev
fuse3
pkg-config
python3-venv
python3-dev
debootstrap
libseccomp2
libvirt-daemon
libvirt-daemon-driver-qemu
libvirt-clients
uidmap
udev
e2fsprogs
mount
util-linux
passwd
"

missing=""
for p in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing system packages:$missing" >&2
    echo "       run as root: apt-get install$missing" >&2
    exit 1
fi
echo "installing system packages:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
echo "system packages installed" >&2
