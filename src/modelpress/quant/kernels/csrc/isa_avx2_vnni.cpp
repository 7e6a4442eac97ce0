// AVX2 with AVX-VNNI (VEX-encoded vpdpwssd / vpdpbusd, e.g. Alder Lake and later).
// Compiled for avx2,fma,avxvnni by the pragma below; everything here has internal linkage (see common.h).
#include "common.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avxvnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avxvnni")
#endif

namespace mpk {
namespace {
#include "x86_traits.h"
#include "gemm_impl.h"

}  // namespace

const IsaTable* table_avx2_vnni() {
  static const IsaTable t = {"avx2_vnni", k_s16s8<V256<1>>, u8s8_fn<V256<1>>(), k_s16u4<V256<1>, true>, k_s16u4<V256<1>, false>, u4_chunk_256, quant_fns<V256<1>>(), conv_u8_fn<V256<1>>(), k_conv<V256<1>, false>, deq_bf16, p8u4_fn<V256<1>>(true), p8u4_fn<V256<1>>(false), p8_chunk_256, deq_f32};
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
const IsaTable* table_avx2_vnni() { return nullptr; }
}  // namespace mpk

#endif
