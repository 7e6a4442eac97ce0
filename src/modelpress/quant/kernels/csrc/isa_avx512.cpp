// AVX-512 (F, BW, VL, DQ) without VNNI: vpmaddwd + vpaddd.
// Compiled for avx2,fma,avx512f,avx512bw,avx512vl,avx512dq by the pragma below; the body is isa_x86.inc.
#include "common.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
#endif

#define MPK_TABLE table_avx512
#define MPK_NAME "avx512"
#define MPK_V V512<false>
#define MPK_V256 V256<0>
#include "isa_x86.inc"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64 with GCC or Clang: this instruction set is not available

namespace mpk {
const IsaTable* table_avx512() { return nullptr; }
}  // namespace mpk

#endif
