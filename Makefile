# kiln — the two commands a user needs: `make chat` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
KILN := $(VENV)/bin/kiln
PYTEST_ARGS ?=

.PHONY: install build test chat bench pull clean ctest

# The venv is (re)made when the project's metadata changes; the extension is rebuilt
# in place whenever a C/Cython source changed (setuptools checks timestamps).
$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed build

build: $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace

test: install ctest
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The standalone C kernel harness: x86 variants natively, ASan+UBSan, NEON under qemu
# (skipped with a note when the aarch64 cross tools are not installed).
ctest:
	$(MAKE) -C tests/c

pull: install
	$(KILN) pull

chat: install pull
	$(KILN) chat

bench: install pull
	$(KILN) bench

clean:
	rm -rf build ckernels/_ext.c ckernels/*.so tests/c/build *.egg-info
