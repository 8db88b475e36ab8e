# The local single-node Kubernetes (deploy/k8s/cluster-up.sh) and the chart on it. State under DSPARK_HOME/k8s.
K8S ?= $(DSPARK_HOME)/k8s
export K8S
# the v1.20.2 binaries: this tarball when it lies beside the clone (a CI cache), else built from Debian's source
K8S_TARBALL ?= $(firstword $(wildcard $(CURDIR)/../shared/k8s/kubernetes-1.20.2-linux-amd64.tar.gz))
export K8S_TARBALL
KUBECONFIG_LOCAL := $(K8S)/pki/admin.kubeconfig
HELM_LOCAL = $$(bash deploy/helm/helm-bin.sh)/helm --kubeconfig $(KUBECONFIG_LOCAL)
K8S_VALUES ?= helm/dspark/ci/local-cluster-values.yaml

.PHONY: k8s-up k8s-down k8s-install k8s-test

help::
	@echo "make k8s-up        start a single-node Kubernetes 1.20 here (root; containerd, kubelet, CNI bridge on 10.244.0.0/16)"
	@echo "make k8s-install   make image, import it, helm upgrade --install dspark helm/dspark with K8S_VALUES"
	@echo "make k8s-test      k8s-install, then helm test dspark"
	@echo "make k8s-down      stop the local cluster and put the host back (sysctls, iptables, bridge, mounts)"

k8s-up:
	@bash deploy/k8s/cluster-up.sh
	@echo "kubectl: $(K8S)/bin/kubectl --kubeconfig $(KUBECONFIG_LOCAL) get pods -o wide"

k8s-down:
	@bash deploy/k8s/cluster-down.sh

k8s-install: install
	@test -S $(K8S)/run/containerd.sock || $(MAKE) -s k8s-up
	@archive=$$(bash deploy/docker/image.sh) && ref=$$(cat $(DSPARK_HOME)/images/dspark.ref) && \
	  bash deploy/k8s/import.sh "$$archive" "$$ref" && \
	  $(HELM_LOCAL) upgrade --install dspark helm/dspark -f $(K8S_VALUES) --set image.tag=$${ref##*:} \
	    --wait --timeout 10m
	$(K8S)/bin/kubectl --kubeconfig $(KUBECONFIG_LOCAL) get pods -o wide

k8s-test: k8s-install
	$(HELM_LOCAL) test dspark
