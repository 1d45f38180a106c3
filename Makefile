# Developer shortcuts. `make bench` runs every benchmark and refreshes docs/performance.md (see bench/__main__.py).
PYTHON ?= python
DEVICE ?= cpu

.PHONY: bench bench-quick sanitize mutation

bench:
	$(PYTHON) -m bench --device $(DEVICE) $(BENCH_ARGS)

# smoke run of the tables (tiny K and B, one round); leaves the kernel suites out
bench-quick:
	$(PYTHON) -m bench --device $(DEVICE) --quick --skip kernels --results /tmp/pyens-bench-quick --readme /tmp/pyens-bench-quick/README.md $(BENCH_ARGS)

# the C++ kernels under AddressSanitizer + UBSan: built in a copy of the tree (this checkout's
# extension is untouched), then the tests that call them; run it before a change to csrc/ lands
# (docs/install.md, "Sanitizer build"). SANITIZE_ARGS go to pytest.
sanitize:
	PYTHON=$(PYTHON) tools/sanitize.sh $(SANITIZE_ARGS)

# mutation testing (mutmut 3, in a scratch copy; docs/testing.md): AREA=attacks|training|eval|all
AREA ?= all
mutation:
	tools/mutation.sh $(AREA)
