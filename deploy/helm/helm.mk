# The Helm chart helm/dspark: a pinned helm binary, lint, the values table of its README, its unit tests.
HELM_BIN := $(DSPARK_HOME)/tools/bin/helm

.PHONY: helm-bin helm-lint helm-docs helm-test

help::
	@echo "make helm-bin      fetch helm $(shell sed -n 's/^HELM_VERSION=//p' deploy/helm/helm-bin.sh) + kubectl into \$$DSPARK_HOME/tools/bin (once)"
	@echo "make helm-lint     helm lint helm/dspark"
	@echo "make helm-docs     regenerate the values table in helm/dspark/README.md from the # -- comments"
	@echo "make helm-test     the chart's unit tests (helm template, lint, schema, kubernetes-validate)"

$(HELM_BIN): deploy/helm/helm-bin.sh
	DSPARK_HOME=$(DSPARK_HOME) PY=$(PY) bash deploy/helm/helm-bin.sh

helm-bin: $(HELM_BIN)

helm-lint: $(HELM_BIN)
	$(HELM_BIN) lint helm/dspark

helm-docs: $(STAMP)
	$(PY) deploy/helm/values_table.py --write

helm-test: install $(HELM_BIN)
	$(PY) -m pytest -q --durations=10 tests/test_helm_chart.py tests/test_serving_health.py tests/test_router_serve_config.py
