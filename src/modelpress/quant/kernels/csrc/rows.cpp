// Rows of a quantized weight decoded to fp32 in column order, exactly as modelpress.formats.qtensor
// .dequantize_tensor decodes them (the same fp32 products in the same order), without its Python-level gather /
// unpack / scale steps: embedding lookups and bags in memory mode, and the weight of the "native-decode" path.
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MPK_NIBBLES_AVX2 1
#endif

namespace mpk {

namespace {

// bag b: ids [start(b), end(b)) with offsets (offsets[b], offsets[b + 1] or n for the last entry) or fixed-size bags
// of `len` ids (offsets null)
struct Bags {
  const int64_t* offsets;
  int64_t noff, len, n;
  inline int64_t start(int64_t b) const { return offsets ? offsets[b] : b * len; }
  inline int64_t end(int64_t b) const { return offsets ? (b + 1 < noff ? offsets[b + 1] : n) : (b + 1) * len; }
};

constexpr int64_t PREFETCH = 16;  // bags: the row and scale this many ids ahead are prefetched (random lookups miss)

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

// scale number `at` of the table, stored as fp32 (kind 0), bf16 (1) or a code of t.slut times t.gscale (2)
inline float scale_at(const RowTable& t, int kind, int64_t at) {
  return kind == 0   ? ((const float*)t.scale)[at]
         : kind == 1 ? bf16_to_float(((const uint16_t*)t.scale)[at])
                     : t.slut[((const uint8_t*)t.scale)[at]] * t.gscale;
}

#ifdef MPK_NIBBLES_AVX2
// 16 4-bit codes (8 bytes, low nibble first) decoded into two registers of 8 floats in column order: integers
// ((u ^ flip) - z) * s (LUT false), or float elements lut[u] * s (LUT true: the table's two halves permuted by the
// low 3 bits, the half picked by bit 3, moved to the sign bit for blendv). The scalar loop's fp32 products.
template <bool LUT>
__attribute__((target("avx2"))) inline void nib16(const uint8_t* w, int32_t flip, int32_t z, __m256 ss, __m256 t0,
                                                  __m256 t1, __m256& v0, __m256& v1) {
  const __m128i b = _mm_loadl_epi64((const __m128i*)w), m = _mm_set1_epi8(15);
  __m128i u = _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
  if (!LUT) u = _mm_xor_si128(u, _mm_set1_epi8((char)flip));
  __m256 v[2];
  for (int h = 0; h < 2; h++) {
    const __m256i i = _mm256_cvtepu8_epi32(h ? _mm_srli_si128(u, 8) : u);
    v[h] = LUT ? _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, i), _mm256_permutevar8x32_ps(t1, i),
                                  _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)))
               : _mm256_cvtepi32_ps(_mm256_sub_epi32(i, _mm256_set1_epi32(z)));
    v[h] = _mm256_mul_ps(v[h], ss);
  }
  v0 = v[0];
  v1 = v[1];
}

// the same, stored to o[0 .. 16)
__attribute__((target("avx2"))) void nibbles16_avx2(const uint8_t* w, float* o, int32_t flip, int32_t z, float s) {
  __m256 v0, v1;
  nib16<false>(w, flip, z, _mm256_set1_ps(s), v0, v0, v0, v1);
  _mm256_storeu_ps(o, v0);
  _mm256_storeu_ps(o + 8, v1);
}

__attribute__((target("avx2"))) inline void lut16(const uint8_t* w, float* o, __m256 t0, __m256 t1, float s) {
  __m256 v0, v1;
  nib16<true>(w, 0, 0, _mm256_set1_ps(s), t0, t1, v0, v1);
  _mm256_storeu_ps(o, v0);
  _mm256_storeu_ps(o + 8, v1);
}

// o[c] += r[c] (r null: += +0, which turns -0 into +0) with 8-lane loads, the width the row decoders store with (a
// wider load of two fresh 8-lane stores cannot be forwarded from them: a stall of ~20 cycles per row)
__attribute__((target("avx2"))) void add_row_avx2(float* o, const float* r, int64_t n) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8)
    _mm256_storeu_ps(o + c, _mm256_add_ps(_mm256_loadu_ps(o + c), r ? _mm256_loadu_ps(r + c) : _mm256_setzero_ps()));
  for (; c < n; c++) o[c] += r ? r[c] : 0.f;
}

// columns [c0, c1) of a 4-bit row through the table (starting on a whole byte), 16 at a time; returns where it stopped
__attribute__((target("avx2"))) int64_t lut_run_avx2(const uint8_t* codes, int64_t k0, float* o, int64_t c0,
                                                     int64_t c1, const float* lut, float s) {
  const __m256 t0 = _mm256_loadu_ps(lut), t1 = _mm256_loadu_ps(lut + 8);
  int64_t c = c0;
  for (; c + 16 <= c1; c += 16) lut16(codes + ((k0 + c) >> 1), o + c, t0, t1, s);
  return c;
}

// For 8 int8 codes and their fp32 products p = w[c] * s: o[c] = p (ADD 0: a decoded row), o[c] = +0 + p (ADD 1:
// a bag's first row, as the reference's sum from +0, which turns a -0 product into +0), or o[c] += p (ADD 2), the
// product rounded to fp32 first: the barrier keeps the compiler from fusing the two into an FMA
template <int ADD>
__attribute__((target("avx2"))) inline void int8x8_avx2(const int8_t* w, float* o, __m256 s) {
  __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)w))), s);
  if (ADD) {
    __asm__("" : "+x"(p));
    p = _mm256_add_ps(ADD == 1 ? _mm256_setzero_ps() : _mm256_loadu_ps(o), p);
  }
  _mm256_storeu_ps(o, p);
}

// one int8 row of `cols` values (a multiple of 8) times s
__attribute__((target("avx2"))) void int8_row_avx2(const int8_t* w, float* o, int64_t cols, float s) {
  const __m256 ss = _mm256_set1_ps(s);
  for (int64_t c = 0; c < cols; c += 8) int8x8_avx2<0>(w + c, o + c, ss);
}

// int8 rows of `cols` values (a multiple of 8), one fp32 scale per row: bags b0 .. b1 summed in id order, as
// int8_bags below (the same rounded products, the same order of sums), 8 lanes at a time
__attribute__((target("avx2"))) void int8_bags_avx2(const RowTable& t, const int64_t* idx, const Bags& bags, int64_t b0,
                                                    int64_t b1, float* out) {
  const int8_t* codes = (const int8_t*)t.codes;
  const float* scale = (const float*)t.scale;
  const int64_t cols = t.cols;
  for (int64_t b = b0; b < b1; b++) {
    float* o = out + b * cols;
    const int64_t i0 = bags.start(b), i1 = bags.end(b);
    if (i0 + PREFETCH < bags.n) {  // the row and scale a few ids ahead: lookups in a large table miss the cache
      const int64_t r = idx[i0 + PREFETCH];
      _mm_prefetch((const char*)(codes + r * t.row_codes), _MM_HINT_T0);
      _mm_prefetch((const char*)(scale + r), _MM_HINT_T0);
    }
    if (i1 == i0) {
      for (int64_t c = 0; c < cols; c += 8) _mm256_storeu_ps(o + c, _mm256_setzero_ps());
      continue;
    }
    const int8_t* w = codes + idx[i0] * t.row_codes;
    __m256 s = _mm256_set1_ps(scale[idx[i0]]);
    for (int64_t c = 0; c < cols; c += 8) int8x8_avx2<1>(w + c, o + c, s);  // (+0 first: bag_range's closing +0)
    for (int64_t i = i0 + 1; i < i1; i++) {
      w = codes + idx[i] * t.row_codes;
      s = _mm256_set1_ps(scale[idx[i]]);
      for (int64_t c = 0; c < cols; c += 8) int8x8_avx2<2>(w + c, o + c, s);
    }
  }
}

// 4-bit rows of one group each (integers with a scale and optional zero point per row, or float elements through
// the table: LUT), cols a multiple of 16, row_codes even: bags b0 .. b1 summed in registers, 16 columns at a time,
// in id order. The same rounded products and order of sums as bag_range's generic loop (the barrier keeps each
// product rounded before its sum, as int8x8_avx2), and the same closing +0.
template <bool LUT, int KIND, bool ZERO>
__attribute__((target("avx2"))) void nib_bags_avx2(const RowTable& t, const int64_t* idx, const Bags& bags, int64_t b0,
                                                   int64_t b1, float* out) {
  const int64_t cols = t.cols, half = t.row_codes >> 1;
  const __m256 t0 = LUT ? _mm256_loadu_ps(t.lut) : _mm256_setzero_ps();
  const __m256 t1 = LUT ? _mm256_loadu_ps(t.lut + 8) : _mm256_setzero_ps();
  constexpr int64_t scale_bytes = KIND == 0 ? 4 : KIND == 1 ? 2 : 1;
  for (int64_t b = b0; b < b1; b++) {
    float* o = out + b * cols;
    const int64_t i0 = bags.start(b), i1 = bags.end(b);
    if (i0 + PREFETCH < bags.n) {
      const int64_t r = idx[i0 + PREFETCH];
      _mm_prefetch((const char*)(t.codes + r * half), _MM_HINT_T0);
      _mm_prefetch((const char*)t.scale + r * scale_bytes, _MM_HINT_T0);
    }
    for (int64_t c = 0; c < cols; c += 16) {
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      for (int64_t i = i0; i < i1; i++) {
        const int64_t r = idx[i];
        const int32_t z = ZERO ? (int32_t)t.zero[r] : 8, flip = ZERO ? 0 : 8;
        __m256 v0, v1;
        nib16<LUT>(t.codes + r * half + (c >> 1), flip, z, _mm256_set1_ps(scale_at(t, KIND, r)), t0, t1, v0, v1);
        __asm__("" : "+x"(v0), "+x"(v1));
        if (i == i0) {
          a0 = v0;
          a1 = v1;
          continue;
        }
        a0 = _mm256_add_ps(a0, v0);
        a1 = _mm256_add_ps(a1, v1);
      }
      a0 = _mm256_add_ps(a0, _mm256_setzero_ps());  // the closing +0 (bag_range); an empty bag stays +0
      a1 = _mm256_add_ps(a1, _mm256_setzero_ps());
      _mm256_storeu_ps(o + c, a0);
      _mm256_storeu_ps(o + c + 8, a1);
    }
  }
}

#endif

// the AVX2 nibble path: the CPU has AVX2 and the build chosen for this process (RowTable::avx2, set from
// kernels/cpu.py, which follows ATEN_CPU_CAPABILITY and MODELPRESS_ISA) is an x86 one; else the scalar loops
inline bool use_avx2(const RowTable& t) {
#ifdef MPK_NIBBLES_AVX2
  static const bool cpu = __builtin_cpu_supports("avx2");
  return t.avx2 && cpu;
#else
  (void)t;
  return false;
#endif
}


MPK_INLINE bool int8_rows(const RowTable& t) {  // int8 codes, one fp32 scale per row: the common table
  return t.bits == 8 && !t.zero && !t.lut && t.groups == 1 && t.scale_kind == 0;
}

// row r of t into o[0 .. cols)
MPK_INLINE void decode_row(const RowTable& t, int64_t r, float* __restrict o) {
  if (int8_rows(t)) {  // int8 per row: the common table
    const int8_t* __restrict w = (const int8_t*)t.codes + r * t.row_codes;
    const float s = ((const float*)t.scale)[r];
#ifdef MPK_NIBBLES_AVX2
    if (!(t.cols & 7) && use_avx2(t)) {
      int8_row_avx2(w, o, t.cols, s);
      return;
    }
#endif
    for (int64_t c = 0; c < t.cols; c++) o[c] = (float)w[c] * s;
    return;
  }
#ifdef MPK_NIBBLES_AVX2
  if (t.bits == 4 && !t.lut && t.groups == 1 && t.scale_kind != 2 && !(t.row_codes & 1) && use_avx2(t)) {
    const uint8_t* w = t.codes + ((r * t.row_codes) >> 1);  // 4-bit rows of one group (small embedding tables)
    const float s = scale_at(t, t.scale_kind, r);
    const int32_t z = t.zero ? (int32_t)t.zero[r] : 8, flip = t.zero ? 0 : 8;
    int64_t c = 0;
    for (; c + 16 <= t.cols; c += 16, w += 8) nibbles16_avx2(w, o + c, flip, z, s);
    for (; c < t.cols; c++) o[c] = (float)((int32_t)(((c & 1 ? w[(c & 15) >> 1] >> 4 : w[(c & 15) >> 1]) & 15u) ^ flip) - z) * s;
    return;
  }
#endif
  const uint32_t mask = (1u << t.bits) - 1, sign = 1u << (t.bits - 1);
  const int shift = t.bits == 8 ? 0 : t.bits == 4 ? 1 : t.bits == 2 ? 2 : 3;  // log2(codes per byte)
  const int64_t per_mask = (1 << shift) - 1, base = r * t.row_codes;
  for (int64_t gi = 0; gi < t.groups; gi++) {
    const int64_t at = r * t.groups + gi, c0 = gi * t.g, c1 = std::min(t.cols, c0 + t.g);
    const float s = scale_at(t, t.scale_kind, at);
    if (t.lut) {  // float elements: value = lut[code] * s
      int64_t c = c0;
#ifdef MPK_NIBBLES_AVX2
      if (t.bits == 4 && !((base + c0) & 1) && use_avx2(t))  // 16 codes at a time from a whole byte on
        c = lut_run_avx2(t.codes, base, o, c0, c1, t.lut, s);
#endif
      for (; c < c1; c++) {
        const int64_t k = base + c;
        const uint32_t u = t.bits == 8 ? t.codes[k] : (t.codes[k >> shift] >> (t.bits * (k & per_mask))) & mask;
        o[c] = t.lut[u] * s;
      }
      continue;
    }
    if (t.bits == 8) {
      const uint8_t* __restrict w = t.codes + base;
      if (t.zero) {
        const int32_t z = t.zero[at];
        for (int64_t c = c0; c < c1; c++) o[c] = (float)((int32_t)w[c] - z) * s;
      } else {
        for (int64_t c = c0; c < c1; c++) o[c] = (float)(int8_t)w[c] * s;
      }
      continue;
    }
    const int32_t z = t.zero ? (int32_t)t.zero[at] : (int32_t)sign;
    const uint32_t flip = t.zero ? 0u : sign;  // two's complement: (u ^ sign) - sign
    if (t.bits == 4 && !(base & 1) && !(c0 & 1)) {  // whole bytes: low nibble first
      const uint8_t* __restrict w = t.codes + ((base + c0) >> 1);
      int64_t c = c0;
#ifdef MPK_NIBBLES_AVX2
      if (use_avx2(t))
        for (; c + 16 <= c1; c += 16, w += 8) nibbles16_avx2(w, o + c, (int32_t)flip, z, s);
#endif
      for (; c + 1 < c1; c += 2, w++) {
        o[c] = (float)((int32_t)((*w & 15u) ^ flip) - z) * s;
        o[c + 1] = (float)((int32_t)((*w >> 4) ^ flip) - z) * s;
      }
      if (c < c1) o[c] = (float)((int32_t)((*w & 15u) ^ flip) - z) * s;
      continue;
    }
    for (int64_t c = c0; c < c1; c++) {
      const int64_t k = base + c;
      const uint32_t u = (t.codes[k >> shift] >> (t.bits * (k & per_mask))) & mask;
      o[c] = (float)((int32_t)(u ^ flip) - z) * s;
    }
  }
}

MPK_INLINE void decode_range_body(const RowTable& t, const int64_t* idx, int64_t i0, int64_t i1, float* out) {
  for (int64_t i = i0; i < i1; i++) decode_row(t, idx[i], out + i * t.cols);
}
MPK_MULTI(void, decode_range, (const RowTable& t, const int64_t* idx, int64_t i0, int64_t i1, float* out),
          (t, idx, i0, i1, out))

// bag_range for int8 rows of W values (W a compile-time width, so each row is a few whole vectors): the same
// products and the same order of sums as the generic loop, without its per-row format checks and call
template <int W>
MPK_INLINE void int8_bags(const RowTable& t, const int64_t* idx, const Bags& bags, int64_t b0, int64_t b1, bool mean,
                      float* out) {
  const float* scale = (const float*)t.scale;
  for (int64_t b = b0; b < b1; b++) {
    float* __restrict o = out + b * W;
    const int64_t i0 = bags.start(b), i1 = bags.end(b);
    if (i1 == i0) {
      for (int c = 0; c < W; c++) o[c] = 0.f;
      continue;
    }
    const int8_t* w = (const int8_t*)t.codes + idx[i0] * t.row_codes;
    float s = scale[idx[i0]];
    for (int c = 0; c < W; c++) {
      const float p = (float)w[c] * s;
      o[c] = 0.f + p;  // the sum from +0, as the reference's (bag_range's closing +0)
    }
    for (int64_t i = i0 + 1; i < i1; i++) {
      w = (const int8_t*)t.codes + idx[i] * t.row_codes;
      s = scale[idx[i]];
      for (int c = 0; c < W; c++) o[c] += (float)w[c] * s;
    }
    if (mean) {
      const float k = (float)(i1 - i0);
      for (int c = 0; c < W; c++) o[c] /= k;
    }
  }
}

// mode "mean": each bag's sum divided by its number of ids (bags of one or none unchanged)
inline void divide_by_sizes(const Bags& bags, int64_t b0, int64_t b1, int64_t cols, float* out) {
  for (int64_t b = b0; b < b1; b++) {
    const int64_t k = bags.end(b) - bags.start(b);
    for (int64_t c = 0; k > 1 && c < cols; c++) out[b * cols + c] /= (float)k;
  }
}

MPK_INLINE void bag_range_body(const RowTable& t, const int64_t* idx, const Bags& bags, int64_t b0, int64_t b1, bool mean,
                          float* out, float* row) {
  const int64_t cols = t.cols;
#ifdef MPK_NIBBLES_AVX2
  if (int8_rows(t) && !(cols & 7) && use_avx2(t)) {
    int8_bags_avx2(t, idx, bags, b0, b1, out);
    if (mean) divide_by_sizes(bags, b0, b1, cols, out);
    return;
  }
  if (t.bits == 4 && t.groups == 1 && !(t.row_codes & 1) && !(cols & 15) && (t.lut || t.scale_kind < 2) &&
      use_avx2(t)) {
    const bool zero = t.zero != nullptr;
    if (t.lut && t.scale_kind == 2) nib_bags_avx2<true, 2, false>(t, idx, bags, b0, b1, out);
    else if (t.lut && t.scale_kind == 1) nib_bags_avx2<true, 1, false>(t, idx, bags, b0, b1, out);
    else if (t.lut) nib_bags_avx2<true, 0, false>(t, idx, bags, b0, b1, out);
    else if (t.scale_kind == 1) zero ? nib_bags_avx2<false, 1, true>(t, idx, bags, b0, b1, out)
                                     : nib_bags_avx2<false, 1, false>(t, idx, bags, b0, b1, out);
    else zero ? nib_bags_avx2<false, 0, true>(t, idx, bags, b0, b1, out)
              : nib_bags_avx2<false, 0, false>(t, idx, bags, b0, b1, out);
    if (mean) divide_by_sizes(bags, b0, b1, cols, out);
    return;
  }
#endif
  if (int8_rows(t) && (cols == 16 || cols == 32 || cols == 64)) {
    if (cols == 16) int8_bags<16>(t, idx, bags, b0, b1, mean, out);
    else if (cols == 32) int8_bags<32>(t, idx, bags, b0, b1, mean, out);
    else int8_bags<64>(t, idx, bags, b0, b1, mean, out);
    return;
  }
  const int64_t scale_bytes = t.scale_kind == 0 ? 4 : t.scale_kind == 1 ? 2 : 1;
  for (int64_t b = b0; b < b1; b++) {
    float* o = out + b * cols;
    const int64_t i0 = bags.start(b), i1 = bags.end(b);
    if (i0 + PREFETCH < bags.n) {  // as int8_bags_avx2: the row and scales a few ids ahead
      const int64_t r = idx[i0 + PREFETCH];
      __builtin_prefetch(t.codes + ((r * t.row_codes * t.bits) >> 3));
      __builtin_prefetch((const char*)t.scale + r * t.groups * scale_bytes);
    }
    if (i1 == i0) {
      for (int64_t c = 0; c < cols; c++) o[c] = 0.f;
      continue;
    }
#ifdef MPK_NIBBLES_AVX2
    const bool narrow = use_avx2(t);
#endif
    decode_row(t, idx[i0], o);
    for (int64_t i = i0 + 1; i < i1; i++) {
      decode_row(t, idx[i], row);
#ifdef MPK_NIBBLES_AVX2
      if (narrow) {
        add_row_avx2(o, row, cols);
        continue;
      }
#endif
      for (int64_t c = 0; c < cols; c++) o[c] += row[c];
    }
    // the reference sums from +0: a row can decode to -0 (float elements, or a code of 0 times a negative scale,
    // which symmetric formats of 4 bits or fewer use), which that sum (never -0 itself) turns into +0; adding +0
    // once at the end gives the same bits
#ifdef MPK_NIBBLES_AVX2
    if (narrow) add_row_avx2(o, nullptr, cols);
    else
#endif
      for (int64_t c = 0; c < cols; c++) o[c] += 0.f;
    if (mean) {
      const float k = (float)(i1 - i0);
      for (int64_t c = 0; c < cols; c++) o[c] /= k;
    }
  }
}
MPK_MULTI(void, bag_range, (const RowTable& t, const int64_t* idx, const Bags& bags, int64_t b0, int64_t b1, bool mean, float* out, float* row),
          (t, idx, bags, b0, b1, mean, out, row))

}  // namespace

bool RowTable::ids_ok(const int64_t* idx, int64_t n) const {
  bool ok = true;
  for (int64_t i = 0; i < n; i++) ok &= idx[i] >= 0 && idx[i] < rows;
  return ok;
}

bool RowTable::decode(int64_t idx_ptr, int64_t n, int64_t out) const {
  const int64_t* idx = (const int64_t*)idx_ptr;
  if (!ids_ok(idx, n)) return false;
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)),
                   [&](int64_t b, int64_t e) { decode_range(*this, idx, b, e, (float*)out); });
  return true;
}

bool RowTable::bags(int64_t idx_ptr, int64_t n, int64_t offsets_ptr, int64_t noff, int64_t len, bool include_last,
                    bool mean, int64_t out) const {
  const int64_t* idx = (const int64_t*)idx_ptr;
  const Bags bags{(const int64_t*)offsets_ptr, noff, len, n};
  int64_t nbags;
  if (bags.offsets) {
    nbags = include_last ? noff - 1 : noff;
    // include_last with a closing offset short of n: torch's mean divides the last bag by n - its start (ids it did
    // not sum); left to the reference, which is torch's own bag
    if (nbags < 0 || bags.offsets[0] != 0 || (include_last && bags.offsets[noff - 1] != n)) return false;
    bool ok = true;
    for (int64_t b = 0; b + 1 < noff; b++) ok &= bags.offsets[b] <= bags.offsets[b + 1];
    if (!ok || bags.offsets[noff - 1] > n) return false;
  } else {
    if (len <= 0 || n % len) return false;
    nbags = n / len;
  }
  if (!ids_ok(idx, n)) return false;
  at::parallel_for(0, nbags, std::max<int64_t>(1, 4096 / std::max<int64_t>(cols, 1)), [&](int64_t b0, int64_t b1) {
    std::vector<float> row(cols);
    bag_range(*this, idx, bags, b0, b1, mean, (float*)out, row.data());
  });
  return true;
}

}  // namespace mpk
