"""Build the kiln C extension (ckernels._ext).

One extension holds all C code. Sources in ckernels/src/*.c are compiled once with
baseline flags; sources in ckernels/src/isa/*.c are compiled once per ISA variant with
that variant's flags and -DKILN_ISA=<name> (so each function gets a per-variant name),
and the dispatcher picks a variant at run time from cpuid / getauxval. Never
-march=native: the wheel must run on any CPU of the target architecture.
"""
import glob
import os
import platform
import re

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join("ckernels", "src")

# ISA variant -> compiler flags, per target architecture, from ckernels/src/isa_variants.h
# (tests/c/Makefile reads the same lines).
VARIANT_LINE = re.compile(r'^KILN_VARIANT\((\w+), (\w+), "([^"]*)"\)$')


def read_variants(path=os.path.join(ROOT, SRC, "isa_variants.h")):
    """{arch: {variant: [flags]}} from the KILN_VARIANT lines of isa_variants.h."""
    out = {}
    with open(path) as f:
        for line in f:
            m = VARIANT_LINE.match(line.strip())
            if m:
                out.setdefault(m[1], {})[m[2]] = m[3].split()
    return out


def isa_variants():
    machine = platform.machine().lower()
    if os.environ.get("KILN_BUILD_SCALAR_ONLY"):
        return {"scalar": []}
    arch = {"amd64": "x86_64", "i686": "x86_64", "x86": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return read_variants().get(arch, {"scalar": []})


# -ffp-contract=off: the compiler must not fuse a separate multiply and add into one
# rounding (it would on FMA targets only), so the arithmetic is what the source says on
# every ISA; kernels that want fused multiply-adds ask for them by intrinsic.
# -fno-trapping-math: nothing reads the floating-point exception flags, so the compiler
# may if-convert the clamps and selects of float loops (exp, SiLU) and vectorize them;
# it changes no value (no reassociation, no contraction).
COMMON_FLAGS = ["-O3", "-std=gnu11", "-pthread", "-fno-strict-aliasing", "-fno-math-errno",
                "-fno-trapping-math", "-ffp-contract=off", "-Wall", "-Wno-unused-function"]
LINK_FLAGS = ["-pthread"]

# KILN_SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer in every C file, the
# extension's own code (forward pass, loaders, thread pool) as well as the kernels, for
# `make test-asan`. The first undefined-behaviour report aborts, so a report cannot
# scroll past unnoticed. -O1 keeps the stack traces readable; the run needs libasan
# preloaded into the (uninstrumented) interpreter.
SANITIZE_FLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                  "-fno-sanitize-recover=undefined"]
if os.environ.get("KILN_SANITIZE"):
    COMMON_FLAGS += SANITIZE_FLAGS
    LINK_FLAGS += ["-fsanitize=address,undefined"]


class build_ext_isa(build_ext):
    """build_ext that first compiles the per-ISA sources once per variant."""

    def build_extension(self, ext):
        variants = isa_variants()
        isa_sources = sorted(glob.glob(os.path.join(SRC, "isa", "*.c")))
        depends = sorted(glob.glob(os.path.join(SRC, "*.h")))
        objects = []
        for name, flags in variants.items():
            out_dir = os.path.join(self.build_temp, "isa_" + name)
            objects += self.compiler.compile(
                isa_sources,
                output_dir=out_dir,
                macros=[("KILN_ISA", name)],
                include_dirs=[SRC],
                extra_postargs=COMMON_FLAGS + flags,
                depends=depends,
            )
        ext.extra_objects = objects
        ext.define_macros = list(ext.define_macros or []) + [
            ("KILN_HAVE_" + name.upper(), "1") for name in variants
        ]
        super().build_extension(ext)


def extension():
    sources = ["ckernels/_ext.pyx"] + sorted(glob.glob(os.path.join(SRC, "*.c")))
    return Extension(
        "ckernels._ext",
        sources=sources,
        include_dirs=[SRC, numpy.get_include()],
        extra_compile_args=COMMON_FLAGS,
        extra_link_args=LINK_FLAGS,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        depends=sorted(glob.glob(os.path.join(SRC, "*.h"))
                       + glob.glob(os.path.join(SRC, "isa", "*.c"))
                       + glob.glob("ckernels/*.pxi")),
    )


setup(
    ext_modules=cythonize([extension()], language_level=3,
                          compiler_directives={"boundscheck": False, "wraparound": False}),
    cmdclass={"build_ext": build_ext_isa},
)
