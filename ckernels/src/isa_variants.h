/* The ISA variants and their compiler flags, per target architecture: the one list
 * setup.py and tests/c/Makefile build from (each reads the KILN_VARIANT lines below, one
 * variant per line, flags in one string) and the one the extension names
 * (ckernels.ISA_NAMES). Each isa/ source is compiled once per variant of the target with
 * these flags and -DKILN_ISA=<name>. "scalar" is the portable reference, always built.
 * A new variant also needs its CPU check and table in dispatch.c.
 *
 * Included with KILN_VARIANT(arch, name, flags) defined by the includer. */
KILN_VARIANT(x86_64, scalar, "")
KILN_VARIANT(x86_64, avx2, "-mavx2 -mfma -mf16c")
KILN_VARIANT(x86_64, avxvnni, "-mavx2 -mfma -mf16c -mavxvnni")
KILN_VARIANT(x86_64, avx512vnni, "-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni")
KILN_VARIANT(x86_64, amx, "-mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mamx-tile -mamx-int8")
KILN_VARIANT(aarch64, scalar, "")
KILN_VARIANT(aarch64, neon, "-march=armv8.2-a+dotprod+fp16")
