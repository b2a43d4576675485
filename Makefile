# kiln — the two commands a user needs: `make chat` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
KILN := $(VENV)/bin/kiln
PYTEST_ARGS ?=

.PHONY: install build test chat bench pull clean ctest crosstools

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

# The standalone C kernel harness: x86 variants natively, ASan+UBSan, NEON under qemu.
ctest: crosstools
	$(MAKE) -C tests/c

# Debian's aarch64 cross compiler and qemu-user, for the NEON part of the C harness.
# Installed when missing and apt-get can run (root); otherwise the harness skips NEON
# with a note.
crosstools:
	@if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || ! command -v qemu-aarch64 >/dev/null 2>&1; then \
	    if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	        echo "installing the aarch64 cross compiler and qemu-user (apt-get)"; \
	        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	            gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null; \
	    fi; \
	fi

pull: install
	$(KILN) pull

chat: install pull
	$(KILN) chat

bench: install pull
	$(KILN) bench

clean:
	rm -rf build ckernels/_ext.c ckernels/*.so tests/c/build *.egg-info
