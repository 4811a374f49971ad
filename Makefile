# Two entry points, both self-installing into ./.venv:  `make demo` (the comparison)  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
OUT    ?= results/compare
STAMP  := $(VENV)/.gequiv-installed
TIMM_SDIST ?= .cache/timm-sdist

.PHONY: demo test bench install clean-venv timm-sdist

demo: $(STAMP)
	$(VENV)/bin/gequiv-timm compare --out $(OUT)

test: $(STAMP) timm-sdist
	$(PY) -m pytest -q

# timm's own tests/test_models.py runs over our models (tests/models/test_timm_models_upstream.py): fetch the source
# distribution of the installed timm once into .cache/ (git-ignored)
timm-sdist: $(STAMP)
	@v=$$($(PY) -c 'import timm; print(timm.__version__)'); \
	test -f $(TIMM_SDIST)/timm-$$v.tar.gz || $(PIP) download --no-deps --no-binary :all: timm==$$v -d $(TIMM_SDIST)

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
