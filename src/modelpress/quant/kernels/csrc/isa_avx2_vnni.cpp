// AVX2 with AVX-VNNI (VEX-encoded vpdpwssd / vpdpbusd, e.g. Alder Lake and later).
// Compiled for avx2,fma,avxvnni by the pragma below; the body is isa_x86.inc.
#include "common.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avxvnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avxvnni")
#endif

#define MPK_TABLE table_avx2_vnni
#define MPK_NAME "avx2_vnni"
#define MPK_V V256<1>
#define MPK_V256 V256<1>
#include "isa_x86.inc"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64 with GCC or Clang: this instruction set is not available

namespace mpk {
const IsaTable* table_avx2_vnni() { return nullptr; }
}  // namespace mpk

#endif
