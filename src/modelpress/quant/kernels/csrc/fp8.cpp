// fp8 weights x fp8 activations through bf16 dot products (AVX512-BF16: vdpbf16ps), outputs along the vector.
// Every fp8 value (E4M3: 4 significant bits, exponents 2^-9 .. 2^8; E5M2: 3 bits, 2^-16 .. 2^15) is a normal bf16
// number, so the products of two of them are exact in fp32 and only the fp32 sums round, as in the reference path
// (which multiplies the scaled values in fp32). The activations come as the bf16 bits of their fp8 values (actq.cpp:
// quant_fp8, unscaled), pairs along k; the weights as the bf16 bits of their fp8 values in tiles of 32 columns,
// pairs of k interleaved (common.h: Fp8Gemm::wp); y = sum * ascale * wscale[n] + bias[n].
#include "common.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#endif

namespace mpk {
namespace {

// rows m0 .. m0 + MR, outputs n .. n + 32 (two vectors of 16), each pair of k one broadcast of the row's two
// activations times the columns' two weights. S sums per output over alternate pairs of k, added at the end: short
// blocks keep 16 chains of vdpbf16ps in flight (one sum per output would wait on its latency: a row alone, 3-6x
// slower per row than blocks of 8)
template <int MR, int S>
void fp8_rows(const Fp8Gemm& g, int64_t m0, int64_t n) {
  const int64_t kq = (g.K + 1) / 2;
  const int nv = n + 16 < g.N ? 2 : 1;
  __m512 acc[MR][2][S];
  for (int i = 0; i < MR; i++)
    for (int s = 0; s < S; s++) acc[i][0][s] = acc[i][1][s] = _mm512_setzero_ps();
  const uint16_t* wq = g.wp + (n / 32) * kq * 64;  // (n: a multiple of 32)
  int64_t q = 0;
  const auto step = [&](int s) {
    const __m512i b0 = _mm512_loadu_si512((const void*)wq);
    const __m512i b1 = nv > 1 ? _mm512_loadu_si512((const void*)(wq + 32)) : b0;
    for (int i = 0; i < MR; i++) {
      int32_t a2;
      std::memcpy(&a2, g.a + (m0 + i) * g.lda + 2 * q, 4);
      const __m512i ai = _mm512_set1_epi32(a2);
      acc[i][0][s] = _mm512_dpbf16_ps(acc[i][0][s], (__m512bh)ai, (__m512bh)b0);
      if (nv > 1) acc[i][1][s] = _mm512_dpbf16_ps(acc[i][1][s], (__m512bh)ai, (__m512bh)b1);
    }
    q++;
    wq += 64;
  };
  for (; q + S <= kq;)
    for (int s = 0; s < S; s++) step(s);
  for (int s = 0; q < kq; s++) step(s);
  for (int v = 0; v < nv; v++) {
    const int64_t c = n + 16 * v, cnt = g.N - c < 16 ? g.N - c : 16;
    const __mmask16 k = (__mmask16)((1u << cnt) - 1);
    const __m512 ws = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, g.wscale + c), _mm512_set1_ps(g.ascale));
    const __m512 bias = g.bias ? _mm512_maskz_loadu_ps(k, g.bias + c) : _mm512_setzero_ps();
    for (int i = 0; i < MR; i++) {
      __m512 t = acc[i][v][0];
      for (int s = 1; s < S; s++) t = _mm512_add_ps(t, acc[i][v][s]);
      _mm512_mask_storeu_ps(g.out + (m0 + i) * g.ldo + c, k, _mm512_fmadd_ps(t, ws, bias));
    }
  }
}

}  // namespace

// rows in chunks of about 64 KB of activations; in each, columns outermost: a step's weights (K x 32 values) stay
// in L1 while every row of the chunk reads them
void fp8_gemm_bf16(const Fp8Gemm& g, int64_t m0, int64_t m1) {
  const int64_t chunk = std::max<int64_t>(8, (32768 / std::max<int64_t>(g.lda, 1)) / 8 * 8);
  for (int64_t c0 = m0; c0 < m1; c0 += chunk) {
    const int64_t c1 = std::min(m1, c0 + chunk);
    for (int64_t n = 0; n < g.N; n += 32) {
      int64_t m = c0;
      for (; m + 8 <= c1; m += 8) fp8_rows<8, 1>(g, m, n);
      for (; m + 4 <= c1; m += 4) fp8_rows<4, 2>(g, m, n);
      for (; m + 2 <= c1; m += 2) fp8_rows<2, 4>(g, m, n);
      for (; m < c1; m++) fp8_rows<1, 8>(g, m, n);
    }
  }
}

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
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
}  // namespace mpk

#else  // not x86-64 with GCC or Clang: no bf16 dot products
#include <stdexcept>

namespace mpk {
bool fp8_bf16_supported() { return false; }
void fp8_gemm_bf16(const Fp8Gemm&, int64_t, int64_t) { throw std::runtime_error("no bf16 fp8 products on this CPU"); }
}  // namespace mpk

#endif
