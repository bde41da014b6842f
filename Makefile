# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# pytest workers: 2 on the 2-core CI machine; override with `make test PYTEST_WORKERS=1`.
PYTEST_WORKERS ?= 2

.PHONY: demo test venv clean bench

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# tf-keras (needed by tensorflow-probability) declares a dependency on the full
	# `tensorflow` wheel; tensorflow-cpu already provides it, so skip its deps.
	$(PY) -m pip install -q --no-deps tf-keras==2.21.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) launch/sinusoid.py --preset=demo --logdir=runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

bench: $(STAMP)
	$(PY) -m benchmarks.meta_step --workload sinusoid --iters 200 --warmup 20

clean:
	rm -rf $(VENV) runs .pytest_cache
