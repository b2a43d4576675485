# kiln — the two commands a user needs: `make chat` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
KILN := $(VENV)/bin/kiln
PYTEST_ARGS ?=

.PHONY: install build test chat bench pull clean ctest crosstools test-asan fuzz

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

test: install ctest test-asan
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The extension itself built with AddressSanitizer + UndefinedBehaviorSanitizer (into
# build/asan, apart from the in-place build) and run over the kernel tests and the forward
# passes of every architecture and block type. The interpreter is not instrumented, so the
# sanitizer runtimes are preloaded; -P keeps the source tree's ckernels off sys.path, and
# KILN_SANITIZED makes conftest.py check that the sanitized build is the one loaded.
ASAN_TESTS := tests/test_kernels.py tests/test_forward_isas.py tests/test_model_batch.py \
	tests/test_model.py tests/test_reference.py tests/test_model_rope.py \
	tests/test_arch_qwen.py tests/test_arch_phi3.py tests/test_arch_gemma3.py \
	tests/test_codecs.py tests/test_codecs_k.py tests/test_codecs_5bit_iq.py tests/test_gguf_corrupt.py tests/test_fuzz.py
test-asan: install
	KILN_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib build/asan --build-temp build/asan-temp
	cp ckernels/__init__.py build/asan/ckernels/
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	KILN_SANITIZED=1 PYTHONPATH=build/asan $(PY) -P -m pytest -q -p no:cacheprovider -m "not oracle" $(ASAN_TESTS)

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

# A long fuzz run over the GGUF loaders (the CI-sized ones are tests/test_fuzz.py and
# tests/test_fuzz_atheris.py): the mutation fuzzer through load and generation, whose
# findings are kept in build/fuzz-crashers, then the coverage-guided one (atheris) over
# the reader, config and tokenizer loaders, whose findings are crash-* files in build/.
FUZZ_SECONDS ?= 1800
fuzz: install pull
	$(PY) tools/fuzz_gguf.py --seconds $(FUZZ_SECONDS)
	mkdir -p build && cd build && ../$(PY) ../tools/fuzz_atheris.py -max_total_time=$(FUZZ_SECONDS)

pull: install
	$(KILN) pull

chat: install pull
	$(KILN) chat

bench: install pull
	$(KILN) bench

clean:
	rm -rf build ckernels/_ext.c ckernels/*.so tests/c/build *.egg-info
