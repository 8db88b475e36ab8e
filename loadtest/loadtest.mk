# Locust load tests (loadtest/): included by the Makefile. Without HOST= each run starts its own local stack (what
# `make run` starts, on free ports) and stops it at the end; results under bench-results/loadtest/TIME/.
.PHONY: loadtest loadtest-chaos soak

LOADTEST := cd $(CURDIR) && $(PY) -m loadtest.drive
LOADTEST_TARGET = $(if $(HOST),--host $(HOST)) $(if $(HTTP),--http $(HTTP))
DURATION ?= 1800

help::
	@echo "make loadtest       Locust: concurrency + rate sweeps per policy, tables + PNGs (HOST= HTTP= LOADTEST_ARGS=)"
	@echo "make loadtest-chaos Locust while the draft service, then the verifier, is SIGKILLed and restarted"
	@echo "make soak           the saturating step for DURATION s (default 1800), memory + sessions every 10 s"

loadtest: setup
	$(LOADTEST) loadtest $(LOADTEST_TARGET) $(LOADTEST_ARGS)

loadtest-chaos: setup
	$(LOADTEST) chaos $(LOADTEST_ARGS)

soak: setup
	$(LOADTEST) soak --duration $(DURATION) $(LOADTEST_ARGS)
