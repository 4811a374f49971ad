# Two entry points, both self-installing into ./.venv:  `make demo` (the comparison)  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
OUT    ?= results/compare
STAMP  := $(VENV)/.gequiv-installed

.PHONY: demo test bench install clean-venv

demo: $(STAMP)
	$(VENV)/bin/gequiv-timm compare --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

install: $(STAMP)

# torch/torchvision first (this machine serves torch 2.14.1 from local disk; PyPI's torchvision does not import
# beside the CPU-only torch file). escnn is installed without py3nj (it needs a Fortran compiler and escnn uses it
# for SO(3) only); its other needs, and numpy<2 for lie_learn, come explicitly.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e '.[bench,dev]' 'numpy<2' 'matplotlib<3.11'
	$(PIP) install 'lie_learn>=0.0.2' joblib pymanopt autograd scipy requests 'numpy<2'
	$(PIP) install --no-deps 'escnn==1.0.11'
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
