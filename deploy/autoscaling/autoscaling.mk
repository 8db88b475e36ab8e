# Autoscaling (issue 14): a real Prometheus for the tests, the chart's autoscaling and discovery tests.
.PHONY: prometheus-bin autoscaling-test

help::
	@echo "make prometheus-bin     Debian's prometheus server for the autoscaling tests (apt-get, once)"
	@echo "make autoscaling-test   router discovery, the chart's HPA/KEDA/adapter/RBAC, the metrics API stand-in"

prometheus-bin:
	bash deploy/autoscaling/prometheus-bin.sh

autoscaling-test: install prometheus-bin
	$(PY) -m pytest -q --durations=10 tests/test_router_discovery.py tests/test_helm_autoscaling.py \
		tests/test_metrics_api_standin.py
