#!/usr/bin/env bash
# Kubernetes v1.20.2 binaries (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy,
# kubectl) into K8S_DIR/bin, once. From K8S_TARBALL when it is given and its sha256 matches (a CI cache of the
# same build), else built from Debian's source package (~18 min on 2 cores; the Go build cache is kept).
# Usage: binaries.sh K8S_DIR
set -euo pipefail
k8s=${1:?usage: binaries.sh K8S_DIR}
bins="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl"
sha=0d66426b363bce47423c32a5693031f180c6edf4729e0dbe79fa06959afc4f69
version=1.20.5+really1.20.2-1.1+deb12u1
mkdir -p "$k8s/bin"
have() { for b in $bins; do [ -x "$k8s/bin/$b" ] || return 1; done; }
have && exit 0

if [ -n "${K8S_TARBALL:-}" ] && [ -s "$K8S_TARBALL" ]; then
  if [ "$(sha256sum "$K8S_TARBALL" | cut -d' ' -f1)" = "$sha" ]; then
    echo "binaries.sh: unpacking $K8S_TARBALL" >&2
    tar -C "$k8s/bin" -xzf "$K8S_TARBALL" $bins
    have && exit 0
  fi
  echo "binaries.sh: $K8S_TARBALL does not hash to $sha; building from source instead" >&2
fi

echo "binaries.sh: building Kubernetes $version from Debian's source package (~18 min)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q golang-1.19-go golang-github-modern-go-reflect2-dev rsync dpkg-dev >&2
# deb-src through a private apt configuration: the system's sources stay untouched
apt=$k8s/apt
mkdir -p "$apt/srcparts" "$apt/lists/partial" "$apt/src"
# the system's Debian mirror: a URI ending in /debian of an enabled *.sources file (not nodesource, security, ...)
mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -oE '^URIs: *\S+/debian/?$' | head -1 | awk '{print $2}') || true
: "${mirror:=http://deb.debian.org/debian}"
cat >"$apt/srcparts/src.sources" <<EOF
Types: deb-src
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
apto=(-o Dir::Etc::sourcelist=/dev/null -o "Dir::Etc::sourceparts=$apt/srcparts" -o "Dir::State::Lists=$apt/lists")
apt-get "${apto[@]}" update >&2
(cd "$apt/src" && apt-get "${apto[@]}" source --download-only "kubernetes=$version" >&2)
src=$k8s/src/kubernetes
if [ ! -d "$src" ]; then
  # dpkg-source copies the orig tarball beside the tree it unpacks, into a folder that must exist; it unpacks into
  # a .part folder first, so an interrupted run is not mistaken for a whole tree next time
  mkdir -p "$(dirname "$src")" && rm -rf "$src.part"
  dpkg-source -x "$apt/src/kubernetes_${version#*:}.dsc" "$src.part" >&2
  mv "$src.part" "$src"
  # the vendored reflect2 1.0.1 breaks with Go >= 1.18; Debian's 1.0.2 replaces it
  rm -rf "$src/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/"
  mkdir -p "$src/.go/src/k8s.io" && ln -s ../../.. "$src/.go/src/k8s.io/kubernetes"
fi
what=$(for b in $bins; do printf 'cmd/%s ' "$b"; done)
(cd "$src" && mkdir -p "$k8s/home" && GOPATH=$src/.go PATH=/usr/lib/go-1.19/bin:$PATH CGO_ENABLED=0 HOME=$k8s/home \
  make WHAT="$what" >&2)
for b in $bins; do install -m 0755 "$src/_output/local/bin/linux/amd64/$b" "$k8s/bin/$b"; done
have
