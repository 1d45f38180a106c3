# Developer shortcuts. `make bench` runs every benchmark and refreshes docs/performance.md (see bench/__main__.py).
PYTHON ?= python
DEVICE ?= cpu

.PHONY: bench bench-quick

bench:
	$(PYTHON) -m bench --device $(DEVICE) $(BENCH_ARGS)

# smoke run of the tables (tiny K and B, one round); leaves the kernel suites out
bench-quick:
	$(PYTHON) -m bench --device $(DEVICE) --quick --skip kernels --results /tmp/pyens-bench-quick --readme /tmp/pyens-bench-quick/README.md $(BENCH_ARGS)
