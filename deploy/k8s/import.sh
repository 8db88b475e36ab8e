#!/usr/bin/env bash
# Loads a docker archive into the local cluster's containerd (namespace k8s.io, where the kubelet looks) unless
# the image is there already, and tags it REF's repository:local too. Usage: import.sh ARCHIVE REF
set -euo pipefail
archive=${1:?usage: import.sh ARCHIVE REF}
ref=${2:?usage: import.sh ARCHIVE REF}
: "${DSPARK_HOME:=$HOME/.cache/dspark}"
: "${K8S:=$DSPARK_HOME/k8s}"
c=(ctr -a "$K8S/run/containerd.sock" -n k8s.io)
[ -S "$K8S/run/containerd.sock" ] || { echo "import.sh: the local cluster is not up (make k8s-up)" >&2; exit 1; }
if ! "${c[@]}" images ls -q | grep -qxF "$ref"; then
  "${c[@]}" images import "$archive" >/dev/null
fi
"${c[@]}" images tag --force "$ref" "${ref%:*}:local" >/dev/null
# older builds of the same repository go (their layers are garbage-collected); running pods keep theirs
for old in $("${c[@]}" images ls -q | grep -F "${ref%:*}:" | grep -vxF -e "$ref" -e "${ref%:*}:local"); do
  "${c[@]}" images rm "$old" >/dev/null 2>&1 || true
done
echo "$ref"
