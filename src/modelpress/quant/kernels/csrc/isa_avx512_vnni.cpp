// AVX-512 (F, BW, VL, DQ) with VNNI: vpdpwssd / vpdpbusd.
// Compiled for avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni by the pragma below; everything here has internal linkage (see common.h).
#include "common.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#endif

namespace mpk {
namespace {
#include "x86_traits.h"
#include "gemm_impl.h"

// Group sizes that are a multiple of 64 use 512-bit registers; a multiple of 32 (g32) the 256-bit ones.
template <bool SYM>
static void s16u4(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (g.gsize % 64 == 0) k_s16u4<V512<true>, SYM>(g, m0, m1, n0, n1);
  else k_s16u4<V256<2>, SYM>(g, m0, m1, n0, n1);
}

}  // namespace

const IsaTable* table_avx512_vnni() {
  static const IsaTable t = {"avx512_vnni", k_s16s8<V512<true>>, u8s8_fn<V512<true>>(), s16u4<true>, s16u4<false>, u4_chunk_512, quant_fns<V512<true>>(), conv_u8_fn<V512<true>>(), k_conv<V512<true>, false>, deq_bf16, p8u4_fn<V512<true>>(true), p8u4_fn<V512<true>>(false), p8_chunk_512, deq_f32};
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
const IsaTable* table_avx512_vnni() { return nullptr; }
}  // namespace mpk

#endif
