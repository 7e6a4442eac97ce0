// AVX2 + FMA without VNNI (e.g. AMD Zen 2/3, Intel before Alder Lake): vpmaddwd + vpaddd.
// Compiled for avx2,fma by the pragma below; everything here has internal linkage (see common.h).
#include "common.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace mpk {
namespace {
#include "x86_traits.h"
#include "gemm_impl.h"

}  // namespace

const IsaTable* table_avx2() {
  static const IsaTable t = {"avx2", k_s16s8<V256<0>>, u8s8_fn<V256<0>>(), k_s16u4<V256<0>, true>, k_s16u4<V256<0>, false>, u4_chunk_256, quant_fns<V256<0>>(), conv_u8_fn<V256<0>>(), k_conv<V256<0>, false>, deq_bf16, nullptr, nullptr, nullptr, deq_f32};
  return &t;
}
}  // namespace mpk

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64 with GCC or Clang: this instruction set is not available

namespace mpk {
const IsaTable* table_avx2() { return nullptr; }
}  // namespace mpk

#endif
