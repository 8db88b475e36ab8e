#!/usr/bin/env bash
# Stops the local cluster started by cluster-up.sh and puts the host back: every container and process it started
# (by PID file, then the shims of its own containerd socket), kube-proxy's iptables rules and any KUBE-* chain
# left, its own DSPARK-* chains, the cni0 bridge, pod network namespaces, mounts under $K8S, the sysctls the
# kubelet and kube-proxy changed (saved by cluster-up.sh in $K8S/host-state). Keeps binaries, PKI and images.
# Safe to run when nothing is up.
set -uo pipefail
: "${DSPARK_HOME:=$HOME/.cache/dspark}"
: "${K8S:=$DSPARK_HOME/k8s}"
run=$K8S/run
sock=$run/containerd.sock
bin=$K8S/bin

stop() { # name: SIGTERM by PID file, SIGKILL after 20 s
  local f=$run/$1.pid pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$f"
}

# the kubelet first, so nothing restarts the containers; then every container of this containerd
stop kube-proxy
stop kubelet
stop kube-scheduler
stop kube-controller-manager
if [ -S "$sock" ]; then
  for ns in k8s.io default; do
    for t in $(ctr -a "$sock" -n $ns tasks ls -q 2>/dev/null); do ctr -a "$sock" -n $ns tasks kill -s KILL "$t" 2>/dev/null; done
    sleep 0.5
    for t in $(ctr -a "$sock" -n $ns tasks ls -q 2>/dev/null); do ctr -a "$sock" -n $ns tasks rm -f "$t" >/dev/null 2>&1; done
    for c in $(ctr -a "$sock" -n $ns containers ls -q 2>/dev/null); do ctr -a "$sock" -n $ns containers rm "$c" >/dev/null 2>&1; done
  done
fi
stop kube-apiserver
stop etcd
stop containerd
# shims outlive containerd: end those of this cluster's socket only (matched by its full path, killed by PID)
for p in /proc/[0-9]*; do
  if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- "-address $sock "; then kill -KILL "${p#/proc/}" 2>/dev/null; fi
done

# iptables: kube-proxy's own cleanup, then whatever KUBE-* chain is left, then ours
[ -x "$bin/kube-proxy" ] && "$bin/kube-proxy" --cleanup >/dev/null 2>&1
for table in filter nat mangle raw; do
  rules=$(iptables-save -t $table 2>/dev/null) || continue
  # jumps into KUBE-*/DSPARK-* chains from built-in chains, then the chains themselves
  while read -r rule; do
    [ -n "$rule" ] && eval "iptables -t $table ${rule/-A /-D }" 2>/dev/null
  done < <(grep -E '^-A (INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) .*-j (KUBE-|DSPARK-|CNI-)' <<<"$rules")
  for chain in $(grep -oE '^:(KUBE-|DSPARK-|CNI-)[^ ]+' <<<"$rules" | tr -d :); do iptables -t $table -F "$chain" 2>/dev/null; done
  for chain in $(grep -oE '^:(KUBE-|DSPARK-|CNI-)[^ ]+' <<<"$rules" | tr -d :); do iptables -t $table -X "$chain" 2>/dev/null; done
done

# network namespaces the CNI made, the bridge and the veths on it
for ns in /run/netns/cni-*; do
  [ -e "$ns" ] || continue
  ip netns delete "$(basename "$ns")" 2>/dev/null || { umount "$ns" 2>/dev/null; rm -f "$ns"; }
done
ip link show cni0 >/dev/null 2>&1 && ip link delete cni0
rm -rf "$K8S/cni/ipam"

# mounts under $K8S (kubelet volumes, container rootfs, sandbox shm), deepest first
awk -v k="$K8S/" 'index($2, k) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
  umount "$m" 2>/dev/null || umount -l "$m"
done

# sysctls and folders as they were before cluster-up.sh
state=$K8S/host-state
if [ -s "$state" ]; then
  while read -r kind a b; do
    [ "$kind" = sysctl ] && sysctl -qw "$a=$b"
  done <"$state"
  for d in /var/log/pods /var/log/containers /run/containerd /run/netns; do
    grep -qx "existed $d" "$state" || rm -rf "$d"
  done
  rm -f "$state"
fi
# a fresh cluster next time: no objects, pods or containers kept (binaries, PKI, images stay)
rm -rf "$K8S/containerd/state" "$K8S/kubelet" "$K8S/etcd" "$run"
echo "cluster-down: host restored" >&2
