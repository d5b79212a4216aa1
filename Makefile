# Two-command quick start: `make demo` and `make test` each set themselves up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pointclora-installed
RUN    ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install demo test lint bench gpu-check clean

install: $(STAMP)

$(STAMP): setup.py scripts/bootstrap.sh scripts/install_system_deps.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/bootstrap.sh

demo: $(STAMP)
	$(PY) tools/train.py --config configs/demo.yaml --set output_dir=$(RUN)

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check pointclora tools tests benchmarks

bench: $(STAMP)
	for b in ops cache train_step inference pipeline demo contention; do \
		$(PY) benchmarks/bench_$$b.py || exit 1; done

gpu-check: $(STAMP)
	PYTHON=$(PY) bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
