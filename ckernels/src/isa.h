/* Naming for sources in isa/, which setup.py compiles once per ISA variant with
 * -DKILN_ISA=<variant>: KILN_FN(f) expands to f_<variant>, so the variants of one
 * source link side by side in one extension. */
#ifndef KILN_ISA_H
#define KILN_ISA_H

#define KILN_CAT2(a, b) a##_##b
#define KILN_CAT(a, b) KILN_CAT2(a, b)
#define KILN_STR2(x) #x
#define KILN_STR(x) KILN_STR2(x)

#ifdef KILN_ISA
#define KILN_FN(name) KILN_CAT(name, KILN_ISA)
#endif

#endif
