#!/usr/bin/env bash
# Makes sure the Debian packages the local cluster and `make image` run on are on this machine, installing the
# missing ones with apt-get (needs root; their services are not started: no systemd here, policy-rc.d refuses).
# Usage: host-packages.sh COMMAND...   (the commands wanted; default: everything the cluster, the image and the
# cluster test, which reads the image's config with skopeo, need)
set -euo pipefail
declare -A pkg=(
  [containerd]=containerd [containerd-shim-runc-v2]=containerd [ctr]=containerd [runc]=runc [etcd]=etcd-server
  [iptables]=iptables [iptables-save]=iptables [buildah]=buildah [debootstrap]=debootstrap [gcc]=gcc
  [ip]=iproute2 [openssl]=openssl [/usr/lib/cni/bridge]=containernetworking-plugins [skopeo]=skopeo
)
want=("$@")
[ ${#want[@]} -gt 0 ] || want=("${!pkg[@]}")
present() { if [ "${1:0:1}" = / ]; then [ -x "$1" ]; else command -v "$1" >/dev/null; fi; }
missing=()
for c in "${want[@]}"; do
  [ -n "${pkg[$c]:-}" ] || { echo "host-packages: no package known for $c" >&2; exit 1; }
  present "$c" || missing+=("${pkg[$c]}")
done
[ ${#missing[@]} -gt 0 ] || exit 0
missing=($(printf '%s\n' "${missing[@]}" | sort -u))
if [ "$(id -u)" != 0 ]; then
  echo "host-packages: missing ${missing[*]} and this is not root: apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "host-packages: apt-get install ${missing[*]}" >&2
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
install || { apt-get update -q >&2 && install; }
for c in "${want[@]}"; do  # what the packages were installed for is there now, or the caller stops here
  present "$c" || { echo "host-packages: $c still missing after apt-get install ${pkg[$c]}" >&2; exit 1; }
done
