#!/usr/bin/env bash
# A local Debian 12 + Python 3.11 base image, made with debootstrap (no registry needed): the CPU image's BASE
# on machines without one. Usage: base.sh IMAGE_NAME   (buildah storage from $BUILDAH_ROOT, see image.sh)
set -euo pipefail
name=${1:?usage: base.sh IMAGE_NAME}
: "${DSPARK_HOME:=$HOME/.cache/dspark}"
images=$DSPARK_HOME/images
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
bh=(buildah --root "$images/storage" --runroot "$images/run" --storage-driver overlay)

if "${bh[@]}" inspect --type image "$name" >/dev/null 2>&1; then exit 0; fi
command -v debootstrap >/dev/null || { echo "base.sh: debootstrap missing (apt-get install debootstrap)" >&2; exit 1; }
rootfs=$images/base-rootfs
rm -rf "$rootfs" "$rootfs.partial"
echo "base.sh: debootstrap bookworm (python3, python3-venv) from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs.partial" "$mirror" \
  >"$images/debootstrap.log" 2>&1 || { tail -20 "$images/debootstrap.log" >&2; exit 1; }
chroot "$rootfs.partial" apt-get clean
rm -rf "$rootfs.partial"/var/lib/apt/lists/* "$rootfs.partial"/var/cache/apt/*.bin
mv "$rootfs.partial" "$rootfs"
ctr=$("${bh[@]}" from scratch)
trap '"${bh[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
tar -C "$rootfs" -cf "$images/base-rootfs.tar" .
"${bh[@]}" add "$ctr" "$images/base-rootfs.tar" /
"${bh[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
"${bh[@]}" commit -q "$ctr" "$name" >/dev/null
rm -rf "$rootfs" "$images/base-rootfs.tar"
echo "base.sh: $name"
