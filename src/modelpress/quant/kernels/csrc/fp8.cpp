// fp8 weights x fp8 activations through bf16 dot products (AVX512-BF16: vdpbf16ps), outputs along the vector.
// Every fp8 value (E4M3: 4 significant bits, exponents 2^-9 .. 2^8; E5M2: 3 bits, 2^-16 .. 2^15) is a normal bf16
// number, so the products of two of them are exact in fp32 and only the fp32 sums round, as in the reference path
// (which multiplies the scaled values in fp32). The activations come as the bf16 bits of their fp8 values (actq.cpp:
// quant_fp8, unscaled), pairs along k; the weights as the bf16 bits of their fp8 values in tiles of 32 columns,
// pairs of k interleaved (common.h: Fp8Gemm::wp); y = sum * ascale * wscale[n] + bias[n].
#include "common.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>


#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")
#endif

namespace mpk {
namespace {
#include "x86_traits.h"
#include "gemm_impl.h"
}  // namespace

// gemm_impl.h's fp8 product with the bf16 pairs, on 512-bit registers
void fp8_gemm_bf16(const Fp8Gemm& g, int64_t m0, int64_t m1) { fp8_gemm<V512<true>, true>(g, m0, m1); }

}  // namespace mpk

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace mpk {
bool fp8_bf16_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");  // (the target fp8.cpp is compiled for)
}
}  // namespace mpk

#else  // not x86-64 with GCC or Clang: no bf16 dot products
#include <stdexcept>

namespace mpk {
bool fp8_bf16_supported() { return false; }
void fp8_gemm_bf16(const Fp8Gemm&, int64_t, int64_t) { throw std::runtime_error("no bf16 fp8 products on this CPU"); }
}  // namespace mpk

#endif
