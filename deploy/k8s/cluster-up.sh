#!/usr/bin/env bash
# A real single-node Kubernetes 1.20 on this machine: containerd + runc, etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kube-proxy (iptables) and a CNI bridge. Everything listens on
# 127.0.0.1 or the bridge (cni0, 10.244.0.1; the apiserver there, so pods reach it through the kubernetes Service
# 10.96.0.1, as a router with discovery `kubernetes` must); pods 10.244.0.0/16, Services 10.96.0.0/12, forwarded
# pod traffic to anything off the bridge is dropped. No DNS, no registry (images come from `ctr images import`).
# State under $K8S (default $DSPARK_HOME/k8s); what it changes on the host is saved first and put back by
# cluster-down.sh. Prints the admin kubeconfig's path when the node is Ready.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${DSPARK_HOME:=$HOME/.cache/dspark}"
: "${K8S:=$DSPARK_HOME/k8s}"
export K8S
node=dspark-local
pki=$K8S/pki
run=$K8S/run
logs=$K8S/logs
bin=$K8S/bin
sock=$run/containerd.sock
pause_ref=docker.io/library/dspark-pause:1
t0=$(date +%s.%N)
say() { awk -v t0="$t0" -v t1="$(date +%s.%N)" -v m="$*" 'BEGIN { printf "cluster-up %5.1fs: %s\n", t1 - t0, m }' >&2; }
die() { echo "cluster-up: $*" >&2; exit 1; }

# --- can this machine run it? (fail loudly, never silently skip) ---
[ "$(id -u)" = 0 ] || die "must run as root (containerd, kubelet, iptables, bridges)"
[ -e /dev/kmsg ] || die "/dev/kmsg missing (the kubelet needs it)"
[ -d /sys/fs/cgroup/memory ] || [ -f /sys/fs/cgroup/cgroup.controllers ] || die "no memory cgroup"
# the tools it runs, apt-get'ed where a fresh Debian machine lacks them (host-packages.sh fails when it cannot)
bash "$here/host-packages.sh" containerd containerd-shim-runc-v2 runc ctr etcd iptables iptables-save ip openssl gcc \
  buildah /usr/lib/cni/bridge || die "the host packages above are missing"
if [ -s "$run/kube-apiserver.pid" ] && kill -0 "$(cat "$run/kube-apiserver.pid")" 2>/dev/null; then
  say "already up"; echo "$pki/admin.kubeconfig"; exit 0
fi
for port in 2379 2380 6443 10250 10257 10259; do
  ! (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null || die "port $port on 127.0.0.1 is taken (another cluster?)"
done
mkdir -p "$run" "$logs" "$K8S/cni/net.d" "$K8S/cni/ipam" "$K8S/etcd" "$K8S/kubelet" "$K8S/images"

# --- save what the cluster changes on the host, once (a second up must not save the changed values) ---
if [ ! -s "$K8S/host-state" ]; then
  {
    for s in vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys \
      kernel.keys.root_maxbytes net.ipv4.ip_forward net.ipv4.conf.all.route_localnet \
      net.bridge.bridge-nf-call-iptables; do
      v=$(sysctl -n "$s" 2>/dev/null) && echo "sysctl $s $v"
    done
    for d in /var/log/pods /var/log/containers /run/containerd /run/netns /etc/kubernetes /var/lib/kubelet; do
      [ -e "$d" ] && echo "existed $d"
    done
    true
  } >"$K8S/host-state.partial"
  mv "$K8S/host-state.partial" "$K8S/host-state"
fi

# --- binaries, PKI, sandbox image ---
bash "$here/binaries.sh" "$K8S"
bash "$here/pki.sh" "$K8S" "$node"
say "binaries and PKI ready"
if [ ! -s "$K8S/images/pause.tar" ]; then
  gcc -static -O2 -o "$K8S/images/pause" "$here/pause.c"
  bh=(buildah --root "$K8S/images/storage" --runroot "$K8S/images/run" --storage-driver overlay)
  c=$("${bh[@]}" from scratch)
  "${bh[@]}" copy "$c" "$K8S/images/pause" /pause >/dev/null
  "${bh[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "$c"
  "${bh[@]}" commit -q "$c" "$pause_ref" >/dev/null && "${bh[@]}" rm "$c" >/dev/null
  "${bh[@]}" push -q "$pause_ref" "docker-archive:$K8S/images/pause.tar:$pause_ref"
fi

start() { # name command...: in its own session, logs to $logs/name.log, PID in $run/name.pid
  local name=$1
  shift
  setsid "$@" >"$logs/$name.log" 2>&1 </dev/null &
  echo $! >"$run/$name.pid"
}
wait_for() { # seconds description command...
  local secs=$1 what=$2
  shift 2
  local end=$(($(date +%s) + secs))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || die "$what not ready after ${secs}s (logs: $logs)"
    sleep 0.5
  done
}

# --- network: the bridge with the node address before the kubelet starts; pod egress stays on the bridge ---
if ! ip link show cni0 >/dev/null 2>&1; then
  ip link add cni0 type bridge
  ip addr add 10.244.0.1/16 dev cni0
fi
ip link set cni0 up
sysctl -qw net.ipv4.ip_forward=1 # pod -> ClusterIP -> pod is routed through the host
# mangle FORWARD runs before kube-proxy's filter rules (which accept the cluster CIDR): drop there
iptables -t mangle -N DSPARK-EGRESS 2>/dev/null || iptables -t mangle -F DSPARK-EGRESS
iptables -t mangle -A DSPARK-EGRESS -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j DROP
iptables -t mangle -A DSPARK-EGRESS -i cni0 ! -o cni0 -j DROP
iptables -t mangle -A DSPARK-EGRESS ! -i cni0 -o cni0 -j DROP
iptables -t mangle -C FORWARD -j DSPARK-EGRESS 2>/dev/null || iptables -t mangle -I FORWARD 1 -j DSPARK-EGRESS
cat >"$K8S/cni/net.d/10-dspark.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "dspark",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$K8S/cni/ipam", "ranges": [[{"subnet": "10.244.0.0/16",
              "rangeStart": "10.244.0.10", "gateway": "10.244.0.1"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF

# --- containerd ---
cat >"$K8S/containerd.toml" <<EOF
version = 2
root = "$K8S/containerd/root"
state = "$K8S/containerd/state"
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_ref"
  # root lacks CAP_SYS_RESOURCE here: runc cannot set a negative oom_score_adj
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$K8S/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
EOF
start containerd containerd --config "$K8S/containerd.toml"
wait_for 20 containerd ctr -a "$sock" version
ctr -a "$sock" -n k8s.io images import "$K8S/images/pause.tar" >/dev/null
say "containerd up"

# --- etcd, apiserver ---
start etcd etcd --name dspark --data-dir "$K8S/etcd" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster dspark=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381
start kube-apiserver "$bin/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
  --bind-address=10.244.0.1 --secure-port=6443 --insecure-port=0 --advertise-address=10.244.0.1 \
  --service-cluster-ip-range=10.96.0.0/12 --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
  --allow-privileged=true --client-ca-file="$pki/ca.crt" \
  --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
  --kubelet-client-key="$pki/apiserver-kubelet-client.key" --kubelet-certificate-authority="$pki/ca.crt" \
  --kubelet-preferred-address-types=InternalIP \
  --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
  --service-account-issuer=https://kubernetes.default.svc \
  --requestheader-client-ca-file="$pki/front-proxy-ca.crt" --requestheader-allowed-names=front-proxy-client \
  --requestheader-extra-headers-prefix=X-Remote-Extra- --requestheader-group-headers=X-Remote-Group \
  --requestheader-username-headers=X-Remote-User --proxy-client-cert-file="$pki/front-proxy-client.crt" \
  --proxy-client-key-file="$pki/front-proxy-client.key" --enable-aggregator-routing=true
kc=("$bin/kubectl" --kubeconfig "$pki/admin.kubeconfig")
wait_for 60 kube-apiserver "${kc[@]}" get --raw /readyz
say "apiserver ready"
# the apiserver's kubelet client may exec, read logs, port-forward
"${kc[@]}" create clusterrolebinding dspark-apiserver-kubelet --clusterrole=system:kubelet-api-admin \
  --user=kube-apiserver-kubelet-client >/dev/null 2>&1 || true

# --- controller-manager, scheduler ---
start kube-controller-manager "$bin/kube-controller-manager" --kubeconfig="$pki/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$pki/controller-manager.kubeconfig" \
  --authorization-kubeconfig="$pki/controller-manager.kubeconfig" \
  --port=0 --bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
  --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" --root-ca-file="$pki/ca.crt" \
  --service-account-private-key-file="$pki/sa.key" --client-ca-file="$pki/ca.crt" \
  --requestheader-client-ca-file="$pki/front-proxy-ca.crt" \
  --horizontal-pod-autoscaler-sync-period=5s --horizontal-pod-autoscaler-downscale-stabilization=20s \
  --horizontal-pod-autoscaler-cpu-initialization-period=10s --horizontal-pod-autoscaler-initial-readiness-delay=5s
start kube-scheduler "$bin/kube-scheduler" --kubeconfig="$pki/scheduler.kubeconfig" \
  --authentication-kubeconfig="$pki/scheduler.kubeconfig" --authorization-kubeconfig="$pki/scheduler.kubeconfig" \
  --port=0 --bind-address=127.0.0.1 --leader-elect=false

# --- kubelet, kube-proxy ---
cat >"$K8S/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 10.244.0.1
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $pki/kubelet-serving.crt
tlsPrivateKeyFile: $pki/kubelet-serving.key
cgroupDriver: cgroupfs
failSwapOn: false
oomScoreAdj: 0
protectKernelDefaults: false
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%}
EOF
start kubelet "$bin/kubelet" --config="$K8S/kubelet.yaml" --kubeconfig="$pki/kubelet.kubeconfig" \
  --container-runtime=remote --container-runtime-endpoint="unix://$sock" --node-ip=10.244.0.1 \
  --hostname-override=$node --root-dir="$K8S/kubelet" --cert-dir="$K8S/kubelet/pki" \
  --pod-infra-container-image=$pause_ref
cat >"$K8S/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
clientConnection: {kubeconfig: $pki/kube-proxy.kubeconfig}
hostnameOverride: $node
mode: iptables
clusterCIDR: 10.244.0.0/16
conntrack: {maxPerCore: 0}
nodePortAddresses: [127.0.0.0/8]
EOF
start kube-proxy "$bin/kube-proxy" --config="$K8S/kube-proxy.yaml"
wait_for 90 "node $node" "${kc[@]}" wait --for=condition=Ready "node/$node" --timeout=2s
# the default service account exists before anything is installed
wait_for 30 "default service account" "${kc[@]}" get serviceaccount default
say "node $node Ready"
echo "$pki/admin.kubeconfig"
