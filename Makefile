# Two entry points: `make demo` (the main job on the embedded default) and `make test`.
# Both create/refresh .venv; torch is pinned to the local CPU build so nothing pulls a CUDA one.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]" $(TORCH)
	touch $(STAMP)

install: $(STAMP)

# train the embedded default (class-conditional digits), sample it, then the exact-mixture sampler demo
demo: $(STAMP)
	$(PY) -m unifusion train
	$(PY) -m unifusion sample --checkpoint runs/digits --sampler dpmpp_2m --nfe 20 --seeds 0-99 \
		--out runs/digits/samples.npz --grid runs/digits/samples_grid.png
	$(PY) -m unifusion demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

# peers for the side-by-side benchmark (never runtime dependencies)
$(VENV)/.bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[bench]" $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps k-diffusion==0.1.1.post1
	touch $@

bench: $(VENV)/.bench
	$(PY) benchmarks/samplers.py

clean:
	rm -rf $(VENV) build src/*.egg-info
