#!/usr/bin/env bash
# The local cluster's PKI with openssl: a CA, a front-proxy CA, the service-account key pair, serving and client
# certificates and one kubeconfig per component. Usage: pki.sh K8S_DIR NODE_NAME. Idempotent (kept once made).
set -euo pipefail
k8s=${1:?usage: pki.sh K8S_DIR NODE_NAME}
node=${2:?usage: pki.sh K8S_DIR NODE_NAME}
pki=$k8s/pki
# kept once made, unless its kubeconfigs point at an older apiserver address
[ -s "$pki/.done" ] && grep -q "https://10.244.0.1:6443" "$pki/admin.kubeconfig" 2>/dev/null && exit 0
rm -rf "$pki" && mkdir -p "$pki" && cd "$pki"
days=3650

ca() { # name CN
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.crt" -days $days -subj "/CN=$2" 2>/dev/null
}
cert() { # name CA subject [SANs] [usage]
  local name=$1 ca=$2 subj=$3 san=${4:-} usage=${5:-clientAuth}
  openssl req -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "$subj" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    [ -n "$san" ] && echo "subjectAltName=$san"
  } >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA "$ca.crt" -CAkey "$ca.key" -CAcreateserial -out "$name.crt" -days $days \
    -extfile "$name.ext" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}
kubeconfig() { # name user-cert
  cat >"$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: dspark-local
  cluster: {certificate-authority: $pki/ca.crt, server: "https://10.244.0.1:6443"}
users:
- name: $2
  user: {client-certificate: $pki/$2.crt, client-key: $pki/$2.key}
contexts:
- name: dspark-local
  context: {cluster: dspark-local, user: $2}
current-context: dspark-local
EOF
}

ca ca dspark-local-ca
ca front-proxy-ca dspark-local-front-proxy-ca
openssl genrsa -out sa.key 2048 2>/dev/null && openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
cert apiserver ca "/CN=kube-apiserver" \
  "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:10.96.0.1,IP:10.244.0.1" \
  serverAuth
cert apiserver-kubelet-client ca "/O=system:masters/CN=kube-apiserver-kubelet-client"
cert front-proxy-client front-proxy-ca "/CN=front-proxy-client"
cert kubelet-serving ca "/CN=$node" "DNS:$node,IP:10.244.0.1,IP:127.0.0.1" serverAuth
cert admin ca "/O=system:masters/CN=kubernetes-admin"
cert controller-manager ca "/CN=system:kube-controller-manager"
cert scheduler ca "/CN=system:kube-scheduler"
cert kubelet ca "/O=system:nodes/CN=system:node:$node"
cert kube-proxy ca "/CN=system:kube-proxy"
for c in admin controller-manager scheduler kubelet kube-proxy; do kubeconfig "$c" "$c"; done
chmod 600 ./*.key
echo ok >.done
