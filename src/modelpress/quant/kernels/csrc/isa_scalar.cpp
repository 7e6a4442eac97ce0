// Portable C++ (any CPU; on ARM the compiler vectorises it for NEON). The same integer arithmetic as the
// vector files, so it computes the same codes and sums; its 4-bit activation layout is the natural order.
#include "common.h"

namespace mpk {
namespace {

static void s16s8(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n++) {
    const int8_t* w = (const int8_t*)(g.w + n * g.ldw);
    for (int64_t m = m0; m < m1; m++) {
      const int16_t* a = g.a16 + m * g.lda;
      int64_t acc = 0;
      for (int64_t k = 0; k < g.K; k++) acc += (int32_t)a[k] * w[k];
      store_out(g, m, n, (float)acc * g.ascale[m] * g.wscale[n] + (g.bias ? g.bias[n] : 0.f));
    }
  }
}

static void u8s8(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n++) {
    const int8_t* w = (const int8_t*)(g.w + n * g.ldw);
    for (int64_t m = m0; m < m1; m++) {
      const uint8_t* a = g.a8 + m * g.lda;
      int64_t acc = 0;
      for (int64_t k = 0; k < g.K; k++) acc += (int32_t)a[k] * w[k];
      acc -= (int64_t)g.azero[m] * g.colsum[n];
      store_out(g, m, n, (float)acc * g.ascale[m] * g.wscale[n] + (g.bias ? g.bias[n] : 0.f));
    }
  }
}

template <bool SYM>
static void s16u4(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* w = g.w + n * g.ldw;
    for (int64_t m = m0; m < m1; m++) {
      const int16_t* a = g.a16 + m * g.lda;
      float y = 0.f;
      for (int64_t gi = 0; gi < g.G; gi++) {
        int64_t acc = -(int64_t)(SYM ? 8 : g.gzero[n * g.G + gi]) * g.asum[m * g.G + gi];
        for (int64_t k = gi * g.gsize; k < (gi + 1) * g.gsize; k += 2) {
          const int32_t b = w[k / 2], lo = b & 15, hi = b >> 4;
          acc += (int32_t)a[k] * (SYM ? lo ^ 8 : lo) + (int32_t)a[k + 1] * (SYM ? hi ^ 8 : hi);
        }
        y += (float)acc * g.gscale[n * g.G + gi];
      }
      store_out(g, m, n, y * g.ascale[m] + (g.bias ? g.bias[n] : 0.f));
    }
  }
}

static int u4_chunk(int64_t gsize) { return gsize % 2 == 0 ? 2 : 0; }

}  // namespace

const IsaTable* table_scalar() {
  static const IsaTable t = {"scalar", s16s8, u8s8, s16u4<true>, s16u4<false>, u4_chunk};
  return &t;
}
}  // namespace mpk
