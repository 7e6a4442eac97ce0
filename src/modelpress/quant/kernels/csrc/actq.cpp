// Activation fake quantization (quantize, then dequantize) for the per-call paths, bit-exact with
// modelpress.quant.activation.fake_quant: the same fp32 operations in the same order, without the half-dozen
// temporary tensors the torch version allocates. Inputs are contiguous fp32; a NaN or Inf anywhere makes a
// function return false with `y` unspecified (the caller then runs the torch version, which carries them as
// the float layer would).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"

namespace mpk {
namespace {

// The loops below are compiled once per instruction set (MPK_MULTI, common.h); each is written branch-free so
// the compiler vectorizes it.

inline uint32_t bits_of(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}

inline float float_of(uint32_t u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

// Largest |x| of [x, x + n), or -1 if a value is NaN or Inf. Reduced over the bit patterns: for finite floats the
// unsigned order of |x|'s bits is the order of |x|, and an integer max reduction vectorizes (a float one does not:
// the compiler must keep NaN and -0 semantics, and a chain of scalar maxss costs ~3 cycles per value).
MPK_INLINE float abs_max_body(const float* __restrict x, int64_t n) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(x);
  uint32_t a = 0;
  for (int64_t i = 0; i < n; ++i) a = std::max(a, u[i] & 0x7fffffffu);
  return a >= 0x7f800000u ? -1.f : float_of(a);
}
MPK_MULTI(float, abs_max, (const float* __restrict x, int64_t n),
          (x, n))

// The fp8 grid: `man` mantissa bits, normals from min_normal (below it the step stays that of min_normal's binade).
struct Fp8Grid {
  float s, m;
  uint32_t min_normal, magic;
  Fp8Grid(float s_, float m_, int man, float min_normal_)
      : s(s_), m(m_), min_normal(bits_of(min_normal_)), magic((static_cast<uint32_t>(23 - man) << 23) | 0x400000u) {}
};

// clamp(x / s, -m, m) rounded to the fp8 grid, ties to even, as torch's float8 casts. The grid's step at |v| is
// 2^(e - man), e the exponent of max(|v|, min_normal) (subnormals share the smallest normals' step), and adding
// c = 1.5 * 2^(e + 23 - man) moves |v| into the binade where fp32's own rounding (to nearest even) lands on that step;
// subtracting c is exact. c's pattern is e's exponent bits plus `magic`. m is on the grid, so nothing rounds past
// it; a value that rounds to zero keeps its sign. 11 vector operations per 16 values on AVX-512 (the version with
// separate normal and subnormal roundings took 30); checked equal to it for every finite fp32 v on both grids.
MPK_INLINE float fp8_value(float x, const Fp8Grid& g) {
  const float v = std::min(std::max(x / g.s, -g.m), g.m);
  const uint32_t b = bits_of(v), a = b & 0x7fffffffu;
  const float c = float_of((std::max(a, g.min_normal) & 0x7f800000u) + g.magic);
  return float_of(bits_of((float_of(a) + c) - c) | (b & 0x80000000u));
}

// y = the fp8 value of x / s times `mul` (s: the fake quantization; 1: the fp8 value itself, exact in fp32)
MPK_INLINE void fp8_loop_body(const float* __restrict x, float* __restrict y, int64_t n, Fp8Grid g, float mul) {
  for (int64_t i = 0; i < n; ++i) y[i] = fp8_value(x[i], g) * mul;
}
MPK_MULTI(void, fp8_loop, (const float* __restrict x, float* __restrict y, int64_t n, Fp8Grid g, float mul),
          (x, y, n, g, mul))

// the fp8 value as the upper half of its fp32 pattern (a bf16 number: at most 4 significant bits, exponents well
// inside bf16's range, so the lower half is zero)
MPK_INLINE void fp8_bits_loop_body(const float* __restrict x, uint16_t* __restrict q, int64_t n, Fp8Grid g) {
  for (int64_t i = 0; i < n; ++i) q[i] = static_cast<uint16_t>(bits_of(fp8_value(x[i], g)) >> 16);
}
MPK_MULTI(void, fp8_bits_loop, (const float* __restrict x, uint16_t* __restrict q, int64_t n, Fp8Grid g),
          (x, q, n, g))

// (lo, hi) = (min(x, 0), max(x, 0)) of a row; false if a value is NaN or Inf. Reduced over order-preserving integer
// keys of the bit patterns (key = bits, with the magnitude bits flipped for negatives: signed integer order is float
// order, -0 just below +0), which vectorizes; NaN and Inf keys lie beyond those of every finite value.
inline int32_t order_key(float v) {
  const int32_t s = static_cast<int32_t>(bits_of(v));
  return s ^ ((s >> 31) & 0x7fffffff);
}

MPK_INLINE bool row_range(const float* __restrict x, int64_t n, float* lo, float* hi) {
  const int32_t* b = reinterpret_cast<const int32_t*>(x);
  int32_t kmin = 0, kmax = 0;  // the key of +0: min(x, 0) and max(x, 0)
  for (int64_t i = 0; i < n; ++i) {
    const int32_t k = b[i] ^ ((b[i] >> 31) & 0x7fffffff);
    kmin = std::min(kmin, k);
    kmax = std::max(kmax, k);
  }
  if (kmax >= order_key(INFINITY) || kmin <= order_key(-INFINITY)) return false;
  const auto value = [](int32_t k) { return float_of(static_cast<uint32_t>(k ^ ((k >> 31) & 0x7fffffff))); };
  *lo = kmin < -1 ? value(kmin) : 0.f;  // -0 alone gives +0, as min(x, 0) on floats
  *hi = value(kmax);
  return true;
}

MPK_INLINE void uint_loop(const float* __restrict x, float* __restrict y, int64_t n, float scale, float zero, float qmax) {
  for (int64_t i = 0; i < n; ++i) {
    const float t = std::min(std::max(x[i] / scale, -4194304.f), 4194304.f);  // beyond: clamped below anyway
    const float q = std::min(std::max(round_int(t) + zero, 0.f), qmax);
    y[i] = (q - zero) * scale;
  }
}

constexpr int64_t kRowBlock = 64;

// Rows [r0, r1) of fake_quant_uint, in one function per instruction set (the row helpers above inline into it:
// short rows, e.g. 64 values, would otherwise pay a dispatched call twice per row). Dynamic rows go
// in blocks, each step over the whole block: ranges, then the parameters (a vector loop across rows: per row they
// are a chain of two divisions and a rounding, ~30 cycles of latency that short rows cannot hide), then values.
MPK_INLINE void uint_rows_body(const float* x, float* y, int64_t r0, int64_t r1, int64_t cols, float qmax, bool dynamic,
                          float s_scale, float s_zero, char* ok) {
  float lo[kRowBlock], hi[kRowBlock], scale[kRowBlock], zero[kRowBlock];
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(kRowBlock, 4096 / std::max<int64_t>(cols, 1)));
  for (int64_t b0 = r0; b0 < r1; b0 += block) {  // (a block's rows, up to 16 KB, stay in L1 for the second pass)
    const int64_t nb = std::min(block, r1 - b0);
    for (int64_t i = 0; i < nb; ++i) {
      if (!row_range(x + (b0 + i) * cols, cols, &lo[i], &hi[i])) {
        ok[b0 + i] = 0;
        lo[i] = hi[i] = 0.f;  // (its values are not written: the caller falls back)
      }
    }
    for (int64_t i = 0; i < nb; ++i) {
      float s = (hi[i] - lo[i]) / qmax;
      s = s > 0.f ? s : 1.f;
      scale[i] = dynamic ? s : s_scale;
      zero[i] = dynamic ? std::min(std::max(std::nearbyint(-lo[i] / s), 0.f), qmax) : s_zero;
    }
    for (int64_t i = 0; i < nb; ++i)
      if (ok[b0 + i]) uint_loop(x + (b0 + i) * cols, y + (b0 + i) * cols, cols, scale[i], zero[i], qmax);
  }
}
MPK_MULTI(void, uint_rows, (const float* x, float* y, int64_t r0, int64_t r1, int64_t cols, float qmax, bool dynamic, float s_scale, float s_zero, char* ok),
          (x, y, r0, r1, cols, qmax, dynamic, s_scale, s_zero, ok))

}  // namespace

// E5M2: 2 mantissa bits, normals from 2^-14 (subnormal step 2^-16); E4M3: 3 bits, 2^-6 (2^-9)
static Fp8Grid fp8_grid(bool e5m2, float s) {
  return e5m2 ? Fp8Grid(s, 57344.f, 2, 0x1p-14f) : Fp8Grid(s, 448.f, 3, 0x1p-6f);
}

// the scale fake_quant_fp8 uses: `scale` when > 0, else max|x| / m (1 when 0); false if x holds NaN or Inf
static bool fp8_scale(const float* x, int64_t n, float m, float scale, float* s_out) {
  const int64_t grain = 1 << 14, chunks = (n + grain - 1) / grain;
  std::vector<float> amax(chunks, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) amax[c] = abs_max(x + c * grain, std::min(n, (c + 1) * grain) - c * grain);
  });
  float a = 0.f;
  for (float v : amax) {
    if (v < 0.f) return false;
    a = std::max(a, v);
  }
  float s = scale;
  if (!(s > 0.f)) {
    s = a / m;
    if (!(s > 0.f)) s = 1.f;
  }
  *s_out = s;
  return true;
}

// the fp8 values of x / s (s: fp8_scale) into q [M, ldq]: bf16 bits (uint16_t) or fp32 values, zeros beyond K
template <class T>
static bool fp8_values(const float* x, T* q, int64_t M, int64_t K, int64_t ldq, bool e5m2, float scale,
                             float* s_out) {
  const float m = e5m2 ? 57344.f : 448.f;
  float s;
  if (!fp8_scale(x, M * K, m, scale, &s)) return false;
  *s_out = s;
  const Fp8Grid grid = fp8_grid(e5m2, s);
  const auto run = [&](const float* xi, T* qi, int64_t n) {
    if constexpr (sizeof(T) == 2) fp8_bits_loop(xi, qi, n, grid);
    else fp8_loop(xi, qi, n, grid, 1.f);
  };
  if (ldq == K) {  // one flat pass
    at::parallel_for(0, M * K, 1 << 14, [&](int64_t i0, int64_t i1) { run(x + i0, q + i0, i1 - i0); });
    return true;
  }
  at::parallel_for(0, M, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      run(x + r * K, q + r * ldq, K);
      for (int64_t k = K; k < ldq; ++k) q[r * ldq + k] = 0;
    }
  });
  return true;
}

namespace {
// fp8 codes (E5M2: 2 mantissa bits, bias 15; E4M3: 3 bits, bias 7) -> the same values as bf16 bits, exactly: normals
// move the exponent to bf16's bias and the mantissa to the top of bf16's 7 bits; subnormals (exponent field 0) are
// m x 2^-16 (E5M2) or m x 2^-9 (E4M3), exact in fp32, whose upper half is the bf16 number. The NaN / Inf codes,
// which quantization never stores, come out as finite numbers (fp8.Fp8Tiles checks the codes first). Branch-free: the
// compiler vectorizes it. (A template body, inlined into the versions MPK_MULTI makes of fp8_codes_loop.)
template <bool E5M2>
MPK_INLINE void fp8_codes_body(const uint8_t* __restrict c, uint16_t* __restrict o, int64_t n) {
  constexpr uint32_t man = E5M2 ? 2 : 3, add = E5M2 ? 112 : 120;
  constexpr float sub = E5M2 ? 0x1p-16f : 0x1p-9f;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = c[i], s = (b & 0x80u) << 8, e = (b & 0x7fu) >> man, m = b & ((1u << man) - 1);
    const uint32_t normal = s | ((e + add) << 7) | (m << (7 - man));
    const uint32_t subnormal = s | (bits_of((float)m * sub) >> 16);
    o[i] = (uint16_t)(e ? normal : subnormal);
  }
}

MPK_INLINE void fp8_codes_loop_body(const uint8_t* __restrict c, uint16_t* __restrict o, int64_t n, bool e5m2) {
  if (e5m2) fp8_codes_body<true>(c, o, n);
  else fp8_codes_body<false>(c, o, n);
}
MPK_MULTI(void, fp8_codes_loop, (const uint8_t* __restrict c, uint16_t* __restrict o, int64_t n, bool e5m2),
          (c, o, n, e5m2))
}  // namespace

void fp8_codes_to_bf16(const uint8_t* c, uint16_t* o, int64_t n, bool e5m2) {
  at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) { fp8_codes_loop(c + b, o + b, e - b, e5m2); });
}

bool quant_fp8(const float* x, uint16_t* q, int64_t M, int64_t K, int64_t ldq, bool e5m2, float scale, float* s_out) {
  return fp8_values(x, q, M, K, ldq, e5m2, scale, s_out);
}

bool quant_fp8(const float* x, float* q, int64_t M, int64_t K, int64_t ldq, bool e5m2, float scale, float* s_out) {
  return fp8_values(x, q, M, K, ldq, e5m2, scale, s_out);
}

// y = fp8(clamp(x / s, -m, m)) * s over the whole tensor; s = max|x| / m (1 when 0), or `scale` when > 0.
bool fake_quant_fp8(const float* x, float* y, int64_t n, bool e5m2, float scale) {
  const float m = e5m2 ? 57344.f : 448.f;
  const int64_t grain = 1 << 14;
  float s;
  if (!fp8_scale(x, n, m, scale, &s)) return false;
  const Fp8Grid grid = fp8_grid(e5m2, s);
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) { fp8_loop(x + i0, y + i0, i1 - i0, grid, s); });
  return true;
}

// Unsigned `bits`-bit codes: per row of `cols` values (dynamic: lo = min(x, 0), hi = max(x, 0),
// scale = (hi - lo) / qmax, 1 when 0, zero = clamp(round(-lo / scale))), or one static (scale, zero) for all;
// y = (clamp(round(x / scale) + zero, 0, qmax) - zero) * scale.
bool fake_quant_uint(const float* x, float* y, int64_t rows, int64_t cols, int64_t bits, bool dynamic,
                     float s_scale, float s_zero) {
  const float qmax = (float)((1 << bits) - 1);
  std::vector<char> ok(rows, 1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    uint_rows(x, y, r0, r1, cols, qmax, dynamic, s_scale, s_zero, ok.data());
  });
  for (int64_t r = 0; r < rows; ++r)
    if (!ok[r]) return false;
  return true;
}

}  // namespace mpk
