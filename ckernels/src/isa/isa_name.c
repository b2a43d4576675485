/* Per-variant identity: proves the per-ISA compile path. Compiled once per variant. */
#include "isa.h"

const char *KILN_FN(kiln_isa_name)(void) { return KILN_STR(KILN_ISA); }
