// Portable C++ (any CPU; on ARM the compiler vectorises it for NEON). The same integer arithmetic as the
// vector files, so it computes the same codes and sums; its 4-bit activation layout is the natural order.
#include "common.h"

namespace mpk {
namespace {

static inline float load_x(const void* x, int bf16, int64_t k) {
  return bf16 ? bf16_to_f32(((const uint16_t*)x)[k]) : ((const float*)x)[k];
}
static inline int32_t round_even(float v) {  // v within int32 range; ties to even (as cvtps2dq / torch.round)
  return (int32_t)__builtin_nearbyintf(v);  // a builtin, not <cmath>: no inline function shared across targets
}
static inline int32_t u8_code(float v, float scale, int32_t zero) {  // the vector files' q_u8, one value
  float q = v / scale;
  q = q < -512.f ? -512.f : (q > 512.f ? 512.f : q);
  int32_t u = round_even(q) + zero;
  return u < 0 ? 0 : (u > 255 ? 255 : u);
}

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

// fp8 values in fp32 (common.h: Fp8Gemm af; wp, the bf16 bits of the weights' fp8 values in tiles of 32 columns)
static void fp8_f32(const Fp8Gemm& g, int64_t m0, int64_t m1) {
  const int64_t kq = (g.K + 1) / 2;
  for (int64_t m = m0; m < m1; m++)
    for (int64_t n = 0; n < g.N; n++) {
      const uint16_t* w = g.wp + (n / 32) * kq * 64 + (n % 32) * 2;
      float acc = 0.f;
      for (int64_t k = 0; k < g.K; k++) acc += g.af[m * g.lda + k] * bf16_to_f32(w[(k / 2) * 64 + k % 2]);
      g.out[m * g.ldo + n] = acc * (g.ascale * g.wscale[n]) + (g.bias ? g.bias[n] : 0.f);
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
        // codes read as c + 8 (SYM) or u, corrected by the zero point; or the table's values (g.lut), uncorrected
        int64_t acc = g.lut ? 0 : -(int64_t)(SYM ? 8 : g.gzero[n * g.G + gi]) * g.asum[m * g.G + gi];
        for (int64_t k = gi * g.gsize; k < (gi + 1) * g.gsize; k += 2) {
          const int32_t b = w[k / 2], lo = b & 15, hi = b >> 4;
          acc += g.lut ? (int32_t)a[k] * g.lut[lo] + (int32_t)a[k + 1] * g.lut[hi]
                       : (int32_t)a[k] * (SYM ? lo ^ 8 : lo) + (int32_t)a[k + 1] * (SYM ? hi ^ 8 : hi);
        }
        y += (float)acc * g.gscale[n * g.G + gi];
      }
      store_out(g, m, n, y * g.ascale[m] + (g.bias ? g.bias[n] : 0.f));
    }
  }
}

static inline void put_deq(uint16_t* o, float v) { *o = f32_to_bf16(v); }
static inline void put_deq(float* o, float v) { *o = v; }

template <class T>  // T = uint16_t (bf16) or float
static void deq_rows(const Gemm& g, int bits, int sym, int64_t n0, int64_t n1, T* out) {
  const int64_t kg = bits == 8 ? g.K : g.G * g.gsize;  // rows in their natural order
  for (int64_t n = n0; n < n1; n++) {
    T* o = out + (n - n0) * kg;
    for (int64_t k = 0; k < kg; k++) {
      if (bits == 8) {
        put_deq(o + k, (float)((const int8_t*)g.w)[n * g.ldw + k] * g.wscale[n]);
        continue;
      }
      const int64_t gi = k / g.gsize;
      const int32_t b = g.w[n * g.ldw + (k >> 1)], u = (k & 1) ? b >> 4 : b & 15;
      const int32_t z = sym ? 8 : g.gzero[n * g.G + gi];
      const int32_t v = g.lut ? g.lut[u] : (sym ? (u ^ 8) : u) - z;
      put_deq(o + k, (float)v * g.gscale[n * g.G + gi]);
    }
  }
}
static void deq_bf16(const Gemm& g, int bits, int sym, int64_t n0, int64_t n1, uint16_t* out) {
  deq_rows<uint16_t>(g, bits, sym, n0, n1, out);
}
static void deq_f32(const Gemm& g, int bits, int sym, int64_t n0, int64_t n1, float* out) {
  deq_rows<float>(g, bits, sym, n0, n1, out);
}

template <bool U8>
static void conv(const ConvGemm& c, int64_t o0, int64_t o1) {
  const int P = U8 ? 4 : 2;
  if (!U8 && c.gscale) {  // grouped scales (4-bit weights): exact int sums per group, scaled and summed in fp32
    for (int64_t o = o0; o < o1; o++)
      for (int64_t l = 0; l < c.L; l++) {
        float accf = 0.f;
        for (int64_t g = 0; g < c.G && g * c.gq * 2 < c.Kp; g++) {
          int32_t acc = 0;
          const int64_t k1 = (g + 1) * c.gq * 2 < c.Kp ? (g + 1) * c.gq * 2 : c.Kp;
          for (int64_t k = g * c.gq * 2; k < k1; k++)
            acc += (int32_t)c.x16[((k / 2) * c.Lp + l) * 2 + k % 2] * c.w16[o * c.Kp + k];
          accf = __builtin_fmaf((float)acc, c.gscale[o * c.G + g], accf);
        }
        const float y = __builtin_fmaf(accf, c.xscale, c.bias ? c.bias[o] : 0.f);
        if (c.out16) c.out16[o * c.L + l] = f32_to_bf16(y);
        else c.out[o * c.L + l] = y;
      }
    return;
  }
  for (int64_t o = o0; o < o1; o++)
    for (int64_t l = 0; l < c.L; l++) {
      int64_t acc = 0;
      for (int64_t k = 0; k < c.Kp; k++) {
        const int64_t xi = ((k / P) * c.Lp + l) * P + k % P;
        acc += U8 ? (int32_t)c.x8[xi] * c.w8[o * c.Kp + k] : (int32_t)c.x16[xi] * c.w16[o * c.Kp + k];
      }
      if (U8) acc -= (int64_t)c.zero * c.colsum[o];
      const float y = (float)acc * c.xscale * c.wscale[o] + (c.bias ? c.bias[o] : 0.f);
      if (c.out16) c.out16[o * c.L + l] = f32_to_bf16(y);
      else c.out[o * c.L + l] = y;
    }
}

static int u4_chunk(int64_t gsize, int64_t) { return gsize % 2 == 0 ? 2 : 0; }

static bool q_range(const void* x, int bf16, int64_t K, int minmax, float* lo, float* hi) {
  float l = 0.f, h = 0.f;
  bool ok = true;
  for (int64_t k = 0; k < K; k++) {
    const float v = load_x(x, bf16, k);
    ok &= (v == v) && v - v == 0.f;
    const float a = minmax ? v : (v < 0 ? -v : v);
    l = a < l ? a : l;
    h = a > h ? a : h;
  }
  *lo = l;
  *hi = h;
  return ok;
}

static void q_s16(const void* x, int bf16, int64_t K, float inv, int16_t* out) {
  for (int64_t k = 0; k < K; k++) out[k] = (int16_t)round_even(load_x(x, bf16, k) * inv);
}

static void q_u8(const void* x, int bf16, int64_t K, float scale, int32_t zero, uint8_t* out8, int16_t* out16) {
  for (int64_t k = 0; k < K; k++) {
    const int32_t u = u8_code(load_x(x, bf16, k), scale, zero);
    if (out8) out8[k] = (uint8_t)u;
    else out16[k] = (int16_t)(u - zero);
  }
}

// depthwise convolution (common.h: DwConv), dw_lanes 0: plain loops over each plane
static void dw(const DwConv& d, int64_t p0, int64_t p1) {
  const int64_t ph = (d.kh - 1) / 2, pw = (d.kw - 1) / 2;
  for (int64_t p = p0; p < p1; p++) {
    const int64_t c = d.oc(p);
    const float* x = d.in(p);
    const float* w = d.w + c * d.taps;
    for (int64_t oy = 0; oy < d.H; oy++)
      for (int64_t ox = 0; ox < d.W; ox++) {
        float acc = d.bias ? d.bias[c] : 0.f;
        for (int64_t ky = 0; ky < d.kh; ky++) {
          const int64_t iy = oy + ky - ph;
          if (iy < 0 || iy >= d.H) continue;
          for (int64_t kx = 0; kx < d.kw; kx++) {
            const int64_t ix = ox + kx - pw;
            if (ix >= 0 && ix < d.W) acc += w[ky * d.kw + kx] * x[iy * d.W + ix];
          }
        }
        d.out[p * d.P + oy * d.W + ox] = acc;
      }
  }
}

}  // namespace

const IsaTable* table_scalar() {
  static const IsaTable t = {"scalar", s16s8, u8s8, s16u4<true>, s16u4<false>, u4_chunk, {q_range, q_s16, q_u8}, conv<true>, conv<false>, deq_bf16, nullptr, nullptr, nullptr, deq_f32, s16u4<true>, nullptr, nullptr, dw, 0, fp8_f32, nullptr};
  return &t;
}
}  // namespace mpk
