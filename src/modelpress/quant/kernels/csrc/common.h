// modelpress native CPU kernels: what every instruction-set file and the binding share.
//
// Plain C++ only (no torch, no standard library): the instruction-set files are compiled with
// `#pragma GCC target(...)`, and any inline function they shared with other files could be merged by the
// linker into one copy built for the wrong instruction set.
#pragma once
#include <stdint.h>
#include <type_traits>

// Helpers a multi-versioned loop calls: forced inline, so that they are compiled into each version for its
// instruction set (an out-of-line helper is compiled once, for the baseline target, and its loops stay SSE2).
#if defined(__GNUC__)
#define MPK_INLINE inline __attribute__((always_inline))
#else
#define MPK_INLINE inline
#endif

namespace mpk {
// The instruction-set level the plain loops run at (2: AVX-512, 1: AVX2, 0: baseline): the best this CPU has, lowered
// by ATEN_CPU_CAPABILITY and MODELPRESS_ISA as kernels/cpu.py lowers the build the layers run (cpu.cpp).
int loop_level();
}  // namespace mpk

// Plain loops (actq.cpp, rows.cpp) compiled once per instruction set (x86-64 GCC / clang on Linux; elsewhere once,
// for the baseline): MPK_MULTI(RET, NAME, (PARAMS), (ARGS)) defines NAME, which runs NAME_body (an MPK_INLINE
// function, inlined into each version) in the version for loop_level(). (target_clones chose by the CPU alone, so
// the AVX2 switches of the tests and benchmarks did not reach these loops.) A lambda defined inside a body is not
// compiled for the version's instruction set (it is a function of its own).
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define MPK_MULTI(RET, NAME, PARAMS, ARGS)                                                        \
  __attribute__((target("avx512f"))) RET NAME##_avx512 PARAMS { return NAME##_body ARGS; }      \
  __attribute__((target("avx2"))) RET NAME##_avx2 PARAMS { return NAME##_body ARGS; }           \
  RET NAME##_base PARAMS { return NAME##_body ARGS; }                                            \
  RET NAME PARAMS {                                                                              \
    const int level = loop_level();                                                              \
    return level >= 2 ? NAME##_avx512 ARGS : level == 1 ? NAME##_avx2 ARGS : NAME##_base ARGS;  \
  }
#else
#define MPK_MULTI(RET, NAME, PARAMS, ARGS) \
  RET NAME PARAMS { return NAME##_body ARGS; }
#endif

namespace mpk {

// One matrix product y[m, n] = sum_k a[m, k] * w[n, k] with the scales of its format, for rows m of the
// activations and rows n of the weights (the stored codes, row-major, never repacked).
struct Gemm {
  int64_t M, N, K;         // logical sizes
  int64_t lda;             // activation row stride in elements; rows are zero-padded up to lda
  const int16_t* a16;      // int16 activations: round(x / ascale) (weight-only) or u - zero (int8 activations)
  const uint8_t* a8;       // uint8 activation codes (int8 activations on VNNI)
  const float* ascale;     // [M] activation scale per row
  const int32_t* azero;    // [M] activation zero point per row (uint8 codes only)
  const int32_t* asum;     // [M, G] sum of a16 per row and weight group (4-bit weights)
  const int8_t* alo;       // 4-bit weights, planes kernel: a16 = 128 * ahi + alo (alo in [0, 127]), same layout
  const int8_t* ahi;
  const uint8_t* w;        // weight codes; row n starts at w + n * ldw (bytes)
  int64_t ldw;
  const float* wscale;     // [N] per-channel scale (8-bit weights)
  const float* gscale;     // [N, G] group scales (4-bit weights)
  const uint8_t* gzero;    // [N, G] zero points of asymmetric 4-bit weights, else null
  const int8_t* lut;       // 4-bit codes read through a table of 16 integer values (s16l4: FP4 E2M1 x 2), else null
  int16_t* wide;           // 4-bit weights, WIDE_ROWS rows or more: room for WIDE_NR weight rows widened to int16,
                           // lda apart (one buffer per thread; gemm_impl.h: widen, W16), or null
  int64_t G, gsize;        // 4-bit weights: groups per row and group size (G * gsize >= K)
  const int32_t* colsum;   // [N] sum_k w[n, k] (uint8 activations)
  const int8_t* wp;        // the int8 weights interleaved by 4 values of k, [ceil(K / 4), Np, 4] with Np = N rounded
                           // up to 16 (zeros beyond N and K): the narrow uint8 product (gemm_impl.h), or null
  const int16_t* wp16;     // the same as int16 interleaved by 2 values of k, [ceil(K / 2), Np, 2]: the narrow int16
                           // product, or null (4-bit weights: their integers, code - zero or the table's values)
  const float* gsp;        // 4-bit weights in the narrow int16 product: group scales [G, Np] (zeros beyond N), else
                           // null (one scale per row: wscale)
  int64_t kmajor;          // the narrow products' activations: 0, rows lda apart; else k-major, lane q (4 bytes: 2
                           // int16 values of k) of row m at byte (q * kmajor + m) * 4 (bind.cpp im2col_pairs)
  const float* bias;       // [N] or null
  float* out;              // y[m, n] at out[m * ldo_m + n * ldo_n] (fp32) ...
  uint16_t* out16;         // ... or at out16[...] as bf16 when out16 is set
  int64_t ldo_m, ldo_n;
};

typedef void (*gemm_fn)(const Gemm&, int64_t m0, int64_t m1, int64_t n0, int64_t n1);
constexpr int64_t WIDE_NR = 4, WIDE_ROWS = 16;  // Gemm::wide: weight rows per widened tile at most; activation rows
                                               // from which a block widens its weight tiles

// One convolution product for 8-bit weights, "broadcast" style: out[o, l] = sum_k w[o, k] x[l, k] for output
// channels o (rows of w, zero-padded to Kp) and pixels l. The pixels' activations are packed by groups of
// P = 4 (uint8, VNNI) or P = 2 (int16) values of k: x at xp[((k / P) * Lp + l) * P + k % P], Lp = L rounded up to a
// multiple of 16. Each product broadcasts P weights of a row against P values of 16 (or 8) pixels, so the
// results land as vectors of consecutive pixels of one channel: the NCHW output is written directly.
struct ConvGemm {
  int64_t O, L, Lp, Kp;
  const uint8_t* x8;       // u8 codes (P = 4), with the zero point subtracted through colsum
  const int16_t* x16;      // int16 values (P = 2): u - zero (int8 activations) or 14-bit codes (weight-only)
  const int8_t* w8;        // [O, Kp] int8 rows (P = 4)
  const int16_t* w16;      // [O, Kp] int16 rows (P = 2)
  const float* wscale;     // [O]
  const int32_t* colsum;   // [O] (P = 4)
  int32_t zero;            // activation zero point (P = 4)
  float xscale;            // activation scale of the sample
  const float* bias;       // [O] or null
  float* out;              // out[o * L + l] (fp32) or out16 (bf16)
  uint16_t* out16;
  // 4-bit weights (as int16 code - zero in w16, P = 2): a scale per group of 2 * gq values of k instead of wscale,
  // gscale[o * G + g]; each group's exact int32 sum is scaled and summed in fp32 (null: one scale per row)
  const float* gscale;
  int64_t G, gq;
};
typedef void (*conv_fn)(const ConvGemm&, int64_t o0, int64_t o1);

// Activation quantization of one row x[0..K) (fp32, or bf16 when `bf16`), the same arithmetic everywhere:
// q_range: max |x| (minmax = 0) or min(x, 0) / max(x, 0) (minmax = 1); false when x holds NaN or Inf.
// q_s16: out = round_half_even(x * inv) (|x * inv| <= 8128).
// q_u8: u = clamp(round_half_even(x / scale) + zero, 0, 255) as in modelpress.quant.activation; stored as
//       uint8 (out8) or as u - zero in int16 (out16).
struct QuantFns {
  bool (*range)(const void* x, int bf16, int64_t K, int minmax, float* lo, float* hi);
  void (*s16)(const void* x, int bf16, int64_t K, float inv, int16_t* out);
  void (*u8)(const void* x, int bf16, int64_t K, float scale, int32_t zero, uint8_t* out8, int16_t* out16);
};

// Depthwise 2-D convolution in fp32 (one filter per channel, stride 1, dilation 1, "same" zero padding: the output
// plane has the input's H x W), computed on each plane as a flat vector of P = H * W values: output lanes [j * LF,
// (j + 1) * LF) of plane p (chunk j) sum, over the taps t, w[c, t] * x[p, i + off[t]] with the lanes whose tap falls
// outside the plane (a row above or below it, or a column wrapped to the next row) masked to zero. Output plane p
// is channel o = p % O (O = C * mult) of its sample, computed from input channel o / mult of that sample (mult > 1:
// a channel multiplier, e.g. a stem convolution over one input channel).
struct DwConv {
  int64_t C, P, chunks, taps;
  const float* x;          // [samples, C, P]
  const float* w;          // [O, taps]
  const float* bias;       // [O] or null
  float* out;              // [samples, O, P] (output planes)
  const int64_t* off;      // [taps] offset of each tap in the flat plane: (ky - pad_y) * W + (kx - pad_x)
  const uint16_t* mbits;   // [chunks, taps] the lanes each tap reads, as bits (AVX-512)
  const int32_t* mvec;     // [chunks, taps, lanes] the same as 0 / -1 (AVX2)
  int64_t H, W, kh, kw;    // the geometry itself (the scalar build)
  int64_t mult;            // output channels per input channel
  // output plane p: its input plane, and its channel (weights and bias)
  const float* in(int64_t p) const {
    return x + (mult == 1 ? p : (p / (C * mult)) * C + (p % (C * mult)) / mult) * P;
  }
  int64_t oc(int64_t p) const { return p % (C * mult); }
};
typedef void (*dw_fn)(const DwConv&, int64_t plane0, int64_t plane1);

// fp8 x fp8 products through bf16 dot products (fp8.cpp; AVX512-BF16 only: fp8_bf16_supported), or as fp32
// values (every build: IsaTable::fp8_f32); either way the products are exact and only the fp32 sums round
struct Fp8Gemm {
  const uint16_t* a;       // [M, lda] activations: bf16 bits of their fp8 values (lda even, zeros beyond K) ...
  const float* af;         // ... or (fp8_f32) their fp8 values in fp32
  int64_t lda;
  const uint16_t* wp;      // [ceil(N / 32), ceil(K / 2), 32, 2] weights: bf16 bits of their fp8 values, in tiles of
                           // 32 columns read one after the other (zeros beyond N and K)
  const float* wscale;     // [N rounded up to 32] per output (zeros beyond N)
  const float* bias;       // [N rounded up to 32] or null
  float ascale;            // the activations' scale (one per tensor)
  int64_t M, N, K;
  float* out;              // [M, ldo]
  int64_t ldo;
};
struct IsaTable {
  const char* name;
  gemm_fn s16s8;           // int8 weights x int16 activations (exact int32 products)
  gemm_fn u8s8;            // int8 weights x uint8 activations with VNNI (null without VNNI)
  gemm_fn s16u4_sym;       // 4-bit weights (two's complement codes) x int16 activations
  gemm_fn s16u4_asym;      // 4-bit weights (unsigned codes, zero points) x int16 activations
  int (*u4_chunk)(int64_t gsize, int64_t kg);  // activation layout chunk for 4-bit rows of kg values (0: unsupported)
  QuantFns q;
  conv_fn conv_u8;         // P = 4 (VNNI only, else null)
  conv_fn conv_s16;        // P = 2
  // dequantized weight rows [n0, n1) as bf16 into out, row-major, k order: bits 8 (per-channel scale; K per row) or 4
  // (group scales; the padded grid G * gsize per row; gsize a multiple of 16)
  void (*deq_bf16)(const Gemm& g, int bits, int sym, int64_t n0, int64_t n1, uint16_t* out);
  // 4-bit weights x int16 activations split in two int8 planes (fewer instructions per weight); chunk of the
  // activation layout it needs for a group size (0: not available, use s16u4)
  gemm_fn p8u4_sym, p8u4_asym;
  int (*p8_chunk)(int64_t gsize);
  // as deq_bf16, in fp32 (tiles for an fp32 matrix product, on CPUs without bf16 hardware)
  void (*deq_f32)(const Gemm& g, int bits, int sym, int64_t n0, int64_t n1, float* out);
  gemm_fn s16l4;           // 4-bit codes through g.lut (values in [-128, 127]) x int16 activations
  gemm_fn u8s8_narrow;     // int8 weights (g.wp) x uint8 activations, outputs along the vector (VNNI, else null)
  gemm_fn s16s8_narrow;    // int8 weights (g.wp16) x int16 activations, outputs along the vector (x86 builds, else null)
  dw_fn dw;                // depthwise convolution of planes [plane0, plane1) (DwConv)
  int dw_lanes;            // its LF: output values per chunk (0: no chunks, the scalar loops)
  void (*fp8_f32)(const Fp8Gemm& g, int64_t m0, int64_t m1);  // fp8 values in fp32 (Fp8Gemm af, wp), rows m0 .. m1
  gemm_fn p8s8;            // int8 weights x int16 activations split in two planes (VNNI only, else null)
};

static inline float bf16_to_f32(uint16_t v) {
  union { uint32_t u; float f; } c;
  c.u = (uint32_t)v << 16;
  return c.f;
}

// |t| <= 2^22 rounded to an integer, ties to even, as (t + 1.5 * 2^23) - 1.5 * 2^23: inline on every build (in files
// built for the baseline instruction set nearbyintf is a library call), never folded (no -ffast-math: build.py)
static inline float round_int(float t) { return (t + 0x1.8p23f) - 0x1.8p23f; }

const IsaTable* table_avx512_vnni();
const IsaTable* table_avx512();
const IsaTable* table_avx2_vnni();
const IsaTable* table_avx2();
const IsaTable* table_scalar();

// Activation layout for 4-bit weights: a byte holds the codes of k (low nibble) and k + 1 (high nibble).
// In each chunk of `chunk` values, the even k come first, then the odd k, so that one vector of low
// nibbles and one of high nibbles meet the activations at the same lanes.
static inline int64_t u4_pos(int64_t k, int64_t chunk) {
  int64_t c0 = k - k % chunk, r = k % chunk;
  return c0 + (r & 1) * (chunk / 2) + (r >> 1);
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch's .to(bfloat16)
  union { float f; uint32_t u; } v;
  v.f = f;
  if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);  // NaN stays NaN
  return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

static inline void store_out(const Gemm& g, int64_t m, int64_t n, float y) {
  int64_t o = m * g.ldo_m + n * g.ldo_n;
  if (g.out16) g.out16[o] = f32_to_bf16(y);
  else g.out[o] = y;
}

// activation fake quantization, bit-exact with modelpress.quant.activation.fake_quant (actq.cpp); false: NaN/Inf seen
bool fake_quant_fp8(const float* x, float* y, int64_t n, bool e5m2, float scale);
bool fake_quant_uint(const float* x, float* y, int64_t rows, int64_t cols, int64_t bits, bool dynamic, float s_scale,
                     float s_zero);

bool fp8_bf16_supported();
void fp8_gemm_bf16(const Fp8Gemm& g, int64_t m0, int64_t m1);
// q[m, 0 .. K) = bf16 bits of fp8(clamp(x[m, :] / s, -max, max)) for x [M, K] contiguous fp32, q[m, K .. ldq) = 0;
// s = max|x| / max (1 when 0), or `scale` when > 0, as fake_quant_fp8 (actq.cpp), into *s_out; false on NaN / Inf
bool quant_fp8(const float* x, uint16_t* q, int64_t M, int64_t K, int64_t ldq, bool e5m2, float scale, float* s_out);
// n fp8 codes (E5M2 or E4M3 bit patterns) -> their values as bf16 bits (exact; actq.cpp)
void fp8_codes_to_bf16(const uint8_t* c, uint16_t* o, int64_t n, bool e5m2);
// the same values as fp32 (q[m, K .. ldq) = 0)
bool quant_fp8(const float* x, float* q, int64_t M, int64_t K, int64_t ldq, bool e5m2, float scale, float* s_out);

// y[b, c, r] = x[b, r, c] for b < B (layout.cpp): NCHW <-> NHWC of fp32 activations (R, C = channels, pixels);
// avx2: the build chosen for the process is an x86 one (else the portable loops run).
void transpose_batched(const float* x, float* y, int64_t B, int64_t R, int64_t C, bool avx2);

// A quantized weight read row by row (rows.cpp). Codes `bits` wide (8, 4, 2 or 1: whole codes per byte, code j of
// a byte in bits [bits*j, bits*(j+1))), row r's codes from code r * row_codes of the packed stream; per group of g
// codes one scale: fp32 (scale_kind 0), bf16 (1), or a uint8 code whose value is slut[code] * gscale (2: mx's
// e8m0, nvfp4's fp8 block scales). Elements: lut[code] (float formats) or, with lut null, integers: two's
// complement, or code - zero[group] for asymmetric tables. Value = element * scale, in fp32.
struct RowTable {
  const uint8_t* codes;
  const void* scale;
  int scale_kind;
  const uint8_t* zero;
  const float *lut, *slut;
  float gscale;
  int64_t rows, row_codes, groups, g, cols, bits;
  bool avx2;  // 4-bit rows may take the AVX2 path (the build chosen for this process is x86 and the CPU has AVX2)

  bool ids_ok(const int64_t* idx, int64_t n) const;
  // rows idx[0 .. n) into out [n, cols]; false (nothing written) if an id lies outside [0, rows)
  bool decode(int64_t idx, int64_t n, int64_t out) const;
  // bags of ids summed in id order (mean: divided by the bag's size; empty: zeros), as F.embedding_bag over the
  // decoded rows: with offsets (noff entries; bag b = idx[offsets[b] .. offsets[b + 1]), the last bag up to n
  // unless include_last, when the last entry only closes the bag before it), or bags of `len` ids (offsets 0).
  // False (nothing written) for a bad id, offsets not starting at 0, decreasing or beyond n
  bool bags(int64_t idx, int64_t n, int64_t offsets, int64_t noff, int64_t len, bool include_last, bool mean,
            int64_t out) const;
};

}  // namespace mpk
