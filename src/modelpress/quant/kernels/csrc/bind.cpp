// Python binding of the native kernels: activation quantization, im2col, threading (at::parallel_for) and
// the choice of instruction-set table. Tensors cross as data pointers: the Python side owns them, keeps
// them alive and checks shapes, dtypes and contiguity (modelpress/quant/kernels/native.py). The exceptions,
// Layer.linear_t / linear_tiles and RowTable.rows_t / bags_t, take and return tensors: they run at every call of a
// layer, where a Python-side allocation and pointer passing cost more than small layers' kernels (~1 us per call).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/utils/pybind.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "common.h"
#include "cpu.h"

namespace py = pybind11;
using namespace mpk;

namespace {

// ---- activation quantization (the vector code is in the instruction-set files: QuantFns) ----------------
inline int64_t roundup(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
// the 14-bit activations' scale for a row of largest |x| = hi: hi / 8128 (1 when 0), never below FLT_MIN: a smaller
// (subnormal) scale's inverse overflows to inf and the codes were junk (rows of |x| < 1e-34; with FLT_MIN they keep
// |a| < 8128 at a coarser step)
inline float s16_scale(float hi) { return hi > 0.f ? std::max(hi / 8128.f, FLT_MIN) : 1.f; }
// a row (sample) the integer products decline, as one with NaN / Inf: a value of |x| >= 1e30 (native.HUGE_ABS), where
// the sum's scaling (up to 127 K max|x| before the weight scale) could overflow to inf while float's stays finite
constexpr float kHugeAbs = 1e30f;
inline bool usable(bool finite, float lo, float hi) { return finite && -lo < kHugeAbs && hi < kHugeAbs; }

struct U8Params {  // uint8 activation parameters, as modelpress.quant.activation.uint8_params
  float scale;
  int32_t zero;
};

// lo = min(x, 0), hi = max(x, 0), scale = (hi - lo) / 255 (1 when 0), zero = round(-lo / scale) in [0, 255]
// (round_int: this file is built for the baseline instruction set, where nearbyintf is a library call per row)
U8Params u8_params(float lo, float hi) {
  float s = (hi - lo) / 255.f;
  if (!(s > 0.f)) s = 1.f;
  return {s, (int32_t)round_int(std::min(std::max(-lo / s, 0.f), 255.f))};
}

// ---- the layer ----------------------------------------------------------------------------------------
enum Act { WEIGHT_ONLY = 0, INT8_DYNAMIC = 1, INT8_STATIC = 2 };
constexpr int64_t NARROW_ROWS = 16;  // rows from which a layer with interleaved weights (set_narrow) runs the narrow product

// Channels-last: codes [C, H, W] -> padded [H + 2ph, W + 2pw, C] (border = pad), so that a row in (ky, kx, c)
// order is kh * kw copies of Cg contiguous codes.
template <class T>
void to_hwc(const T* codes, T pad, int64_t C, int64_t H, int64_t W, int64_t ph, int64_t pw, std::vector<T>& hwc) {
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  hwc.assign(Hp * Wp * C, pad);
  for (int64_t c = 0; c < C; c++)
    for (int64_t y = 0; y < H; y++)
      for (int64_t x = 0; x < W; x++) hwc[((y + ph) * Wp + x + pw) * C + c] = codes[(c * H + y) * W + x];
}

template <class T>
void hwc_row(const T* hwc, int64_t l, int64_t gi, int64_t Cg, int64_t C, int64_t Wp, int64_t Wo,
                    const int64_t* geo, T* row) {
  const int64_t kh = geo[0], kw = geo[1], sh = geo[2], sw = geo[3], dh = geo[6], dw = geo[7];
  const int64_t oy = l / Wo, ox = l % Wo;
  for (int64_t ky = 0; ky < kh; ky++)
    for (int64_t kx = 0; kx < kw; kx++, row += Cg) {
      const T* src = hwc + ((oy * sh + ky * dh) * Wp + ox * sw + kx * dw) * C + gi * Cg;
      for (int64_t c = 0; c < Cg; c++) row[c] = src[c];  // a loop, not memcpy: Cg is often a handful of codes
    }
}

// Channels-last rows [H, W, C] (C values per pixel) -> padded [H + 2ph, W + 2pw, C] with zeros around: the input of
// hwc_row for values that are already channels-last
template <class T>
void pad_hwc(const T* hwc, int64_t C, int64_t H, int64_t W, int64_t ph, int64_t pw, std::vector<T>& padded) {
  const int64_t Wp = W + 2 * pw;
  padded.assign((H + 2 * ph) * Wp * C, 0);
  for (int64_t y = 0; y < H; y++) std::memcpy(padded.data() + ((y + ph) * Wp + pw) * C, hwc + y * W * C, sizeof(T) * W * C);
}

// the build in use is an x86 one (the blocked transposes of layout.cpp)
inline bool x86_build(const IsaTable* t) { return std::strcmp(t->name, "scalar") != 0; }

struct Scratch {  // per call (or per thread in a parallel region)
  std::vector<int16_t> a16, tmp;
  std::vector<uint8_t> a8;
  std::vector<float> ascale;
  std::vector<int32_t> azero, asum;
};

class Layer {
 public:
  Layer(int64_t codes, int64_t wscale, int64_t gscale, int64_t gzero, int64_t colsum, int64_t bias, int64_t N,
        int64_t K, int64_t bits, int64_t gsize, bool sym, int64_t act, double s_scale, double s_zero,
        const std::string& isa, bool planes, bool conv)
      : N_(N), K_(K), bits_(bits), gsize_(gsize), sym_(sym), act_((int)act) {
    t_ = find_table(isa);
    if (!t_) throw std::runtime_error("instruction set '" + isa + "' is not available on this CPU or build");
    w_ = (const uint8_t*)codes;
    wscale_ = (const float*)wscale;
    gscale_ = (const float*)gscale;
    gzero_ = (const uint8_t*)gzero;
    colsum_ = (const int32_t*)colsum;
    bias_ = (const float*)bias;
    static_ = {(float)s_scale, (int32_t)s_zero};
    if (bits == 8) {
      ldw_ = K;
      if (act_ != WEIGHT_ONLY && t_->u8s8 && !colsum_) throw std::runtime_error("int8 activations need column sums");
      // the planes product (weight-only, VNNI): its correction needs the rows' sums (colsum)
      planes_ = planes && act_ == WEIGHT_ONLY && !conv && t_->p8s8 && colsum_;
    } else if (bits == 4) {
      G_ = (K + gsize - 1) / gsize;
      ldw_ = G_ * gsize / 2;
      chunk_ = t_->u4_chunk(gsize, G_ * gsize);
      if (act_ != WEIGHT_ONLY) throw std::runtime_error("4-bit weights take no int8 activations");
      if (!chunk_ && !conv) throw std::runtime_error("unsupported 4-bit layout");
      planes_ = planes && t_->p8_chunk && t_->p8u4_sym ? t_->p8_chunk(gsize) > 0 : false;
      if (planes_) chunk_ = t_->p8_chunk(gsize);  // the planes kernel reads chunks of one packed vector
    } else {
      throw std::runtime_error("only 8- and 4-bit weights");
    }
  }

  std::string isa() const { return t_->name; }
  bool planes() const { return planes_; }

  // 8-bit convolutions: weight rows zero-padded to Kp (a multiple of 4), as int8 and as int16 (the caller keeps
  // them alive); convolutions then run the broadcast-style product (ConvGemm).
  void set_conv_weights(int64_t w8, int64_t w16, int64_t Kp) {
    cw8_ = (const int8_t*)w8;
    cw16_ = (const int16_t*)w16;
    cKp_ = Kp;
  }

  // 4-bit codes that stand for the integers lut[code] (16 int8 values, e.g. FP4 E2M1 times 2), symmetric, no zero
  // points; the matrix product then runs s16l4 (no planes)
  // int8 weights interleaved by 4 values of k ([ceil(K / 4), N rounded up to 16, 4]; common.h: Gemm::wp), for the
  // narrow uint8 product at NARROW_ROWS rows or more; false where this build has no such product
  bool set_narrow(int64_t wp) {
    if (bits_ != 8 || !use_u8() || !t_->u8s8_narrow) return false;
    wp_ = (const int8_t*)wp;
    return true;
  }

  // the same for the int16 product (weight-only int8, or int8 activations without VNNI): int16 weights interleaved
  // by 2 values of k ([ceil(K / 2), N rounded up to 16, 2]); false where this build has no such product
  bool set_narrow16(int64_t wp16) {
    if (bits_ != 8 || use_u8() || !t_->s16s8_narrow) return false;
    wp16_ = (const int16_t*)wp16;
    return true;
  }

  // 4-bit weights in the same int16 product: their integers (code - zero, or the table's values) interleaved as
  // above, and their group scales gsp [G, N rounded up to 16] (zeros beyond N); groups of an even size, or one per
  // row. Activations then keep their natural order (no u4 layout) at NARROW_ROWS rows or more.
  bool set_narrow16_groups(int64_t wp16, int64_t gsp) {
    if (bits_ != 4 || !t_->s16s8_narrow || (G_ > 1 && gsize_ % 2)) return false;
    wp16_ = (const int16_t*)wp16;
    gsp_ = (const float*)gsp;
    return true;
  }

  void set_lut(int64_t lut) {
    if (bits_ != 4) throw std::runtime_error("a code table needs 4-bit codes");
    lut_ = (const int8_t*)lut;
    planes_ = false;
    if (chunk_) chunk_ = t_->u4_chunk(gsize_, G_ * gsize_);
  }

  // 4-bit convolutions: the same broadcast product on int16 rows (code - zero, set_conv_weights with w8 = 0), with a
  // scale per group of `gsize` values of k (even, or one group per row): gscale [N, G] fp32.
  void set_conv_groups(int64_t gscale, int64_t G, int64_t gsize) {
    if (G > 1 && gsize % 2) throw std::runtime_error("grouped 4-bit convolutions need an even group size");
    cgscale_ = (const float*)gscale;
    cG_ = G;
    cgq_ = G > 1 ? gsize / 2 : (cKp_ + 1) / 2;
  }

  // y[M, N] = x[M, K] (row stride ldx) through the kernel; false (y then unspecified) if x holds NaN or Inf.
  bool linear(int64_t x, int64_t M, int64_t ldx, bool x_bf16, int64_t out, bool out_bf16) const {
    if (bits_ == 4 && !chunk_ && !narrow_rows(M, out_bf16))
      throw std::runtime_error("this 4-bit layout runs as a convolution only (or the narrow product)");
    if (narrow_rows(M, out_bf16) && M >= 2 * narrow_block()) return narrow_blocks_of_rows(x, M, ldx, x_bf16, (float*)out);
    Scratch s;
    return rows_product(s, (const void*)x, M, ldx, x_bf16, (void*)out, out_bf16, narrow_rows(M, out_bf16));
  }

  // rows x[M, K] quantized into s, then multiplied into out [M, N] (fp32, or bf16 with out_bf16); false on NaN / Inf
  bool rows_product(Scratch& s, const void* x, int64_t M, int64_t ldx, bool x_bf16, void* out, bool out_bf16,
                    bool narrow) const {
    Gemm g = base(M, K_);
    g.out = out_bf16 ? nullptr : (float*)out;
    g.out16 = out_bf16 ? (uint16_t*)out : nullptr;
    g.ldo_m = N_;
    g.ldo_n = 1;
    if (!prep_rows(x, x_bf16, M, ldx, s, g, narrow)) return false;
    gemm(g, 0, N_);
    return true;
  }

  // The narrow products over many rows, block by block: each block's rows quantized into a scratch that stays in
  // cache, then multiplied. All rows first (as the tiles need) wrote, for a CTR model's 4096 rows of 64 values,
  // 0.5 MB of int16 codes and read them back; in a model, where the layers in between evict them, that made such
  // layers 1.5x slower than the same call timed alone. Every block has at least narrow_block() >= NARROW_ROWS rows
  // (the last one takes the remainder), so every row runs the narrow product, as in one call, and a multiple of 8
  // rows, so every row keeps its place in the product's blocks of 8 rows.
  int64_t narrow_block() const {
    const int64_t row_bytes = roundup(K_, 4) * (use_u8() ? 1 : 2);
    return std::max<int64_t>(NARROW_ROWS, std::min<int64_t>(256, (32 << 10) / row_bytes) / 8 * 8);  // (whole row blocks)
  }
  bool narrow_blocks_of_rows(int64_t x, int64_t M, int64_t ldx, bool x_bf16, float* out) const {
    const int64_t rows = narrow_block(), nb = M / rows, esize = x_bf16 ? 2 : 4;
    std::atomic<bool> ok{true};
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      Scratch s;
      for (int64_t b = b0; b < b1 && ok.load(std::memory_order_relaxed); b++) {
        const int64_t m0 = b * rows, m1 = b + 1 == nb ? M : m0 + rows;
        if (!rows_product(s, (const char*)x + m0 * ldx * esize, m1 - m0, ldx, x_bf16, out + m0 * N_, false, true))
          ok = false;
      }
    });
    return ok;
  }

  // y [M, N] = linear(x [M, K]) for a contiguous fp32 or bf16 x, in x's dtype (as_conv: the product of a layer
  // built for convolutions, as M samples of K channels, 1 x 1); nullopt where the kernel declines (NaN / Inf).
  std::optional<at::Tensor> linear_t(const at::Tensor& x, bool as_conv) const {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K_ && x.is_contiguous() &&
                    (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
                "linear_t: x must be a contiguous fp32 or bf16 [M, ", K_, "] tensor");
    const int64_t M = x.size(0);
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    at::Tensor out = at::empty({M, N_}, x.options());
    const int64_t xp = (int64_t)x.data_ptr(), yp = (int64_t)out.data_ptr();
    const bool cv = as_conv && !narrow_rows(M, bf16);  // (a 4-bit layer built for convolutions may have narrow rows)
    const bool ok = !M || (cv ? conv(xp, M, K_, 1, 1, bf16, yp, bf16, {1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0})
                              : linear(xp, M, K_, bf16, yp, bf16));
    if (!ok) return std::nullopt;
    return out;
  }

  // y [M, N] = x [M, K] (contiguous fp32 or bf16) times the weight, through tiles of weight rows dequantized to bf16
  // (oneDNN's product: AMX / AVX512-BF16 where the CPU has them) or fp32 (MKL's), each of about tile_bytes; y in x's
  // dtype, the bias added in it. One call instead of half a dozen torch calls from Python (their dispatch cost
  // ~0.04-0.1 ms of a 0.1-0.5 ms layer at 128 rows), and each thread reuses its tile buffer from call to call (a new
  // 1-4 MB allocation every call page-faulted). The layer keeps no copy of its weight; each calling thread keeps one
  // buffer for all layers, as large as the largest tile it has decoded (about tile_bytes, at least 16 rows: 1 MB of
  // bf16 or 4 MB of fp32 for the usual shapes), until the thread ends.
  at::Tensor linear_tiles(const at::Tensor& x, bool bf16, int64_t tile_bytes) const {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K_ && x.is_contiguous() &&
                    (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
                "linear_tiles: x must be a contiguous fp32 or bf16 [M, ", K_, "] tensor");
    TORCH_CHECK(!(x.requires_grad() && at::GradMode::is_enabled()),
                "linear_tiles: inference only (the tile buffer is reused: autograd must not keep it)");
    check_tiles();
    const auto dt = bf16 ? at::kBFloat16 : at::kFloat;
    const int64_t len = deq_len(), M = x.size(0), esize = bf16 ? 2 : 4;
    at::Tensor xb = x.to(dt);
    if (len > K_) xb = at::constant_pad_nd(xb, {0, len - K_});  // 4-bit rows: the padded grid
    xb = xb.contiguous();
    const int64_t rows = std::max<int64_t>(16, std::min<int64_t>(N_, tile_bytes / (esize * len)));
    thread_local std::vector<char> scratch;
    const size_t need = (size_t)(std::min(rows, N_) * len * esize + 64);
    if (scratch.size() < need) scratch.resize(need);
    void* tile = (void*)(((uintptr_t)scratch.data() + 63) & ~(uintptr_t)63);
    at::Tensor out;
    for (int64_t n0 = 0; n0 < N_; n0 += rows) {
      const int64_t n1 = std::min(N_, n0 + rows);
      if (bf16) dequant(t_->deq_bf16, n0, n1, (uint16_t*)tile);
      else dequant(t_->deq_f32, n0, n1, (float*)tile);
      at::Tensor y = at::mm(xb, at::from_blob(tile, {n1 - n0, len}, at::TensorOptions().dtype(dt)).t());
      if (n0 == 0 && n1 == N_ && dt == x.scalar_type()) {
        out = y;  // one tile, already in x's dtype
        break;
      }
      if (!out.defined()) out = at::empty({M, N_}, x.options());
      out.narrow(1, n0, n1 - n0).copy_(y);
    }
    if (!out.defined()) out = at::empty({M, N_}, x.options());  // (N = 0)
    if (bias_) out.add_(at::from_blob((void*)bias_, {N_}, at::TensorOptions().dtype(at::kFloat)).to(out.scalar_type()));
    return out;
  }

  // Weight rows [n0, n1) dequantized to bf16 (or fp32: dequant_f32) into out ((n1 - n0) x row length, row-major),
  // split across threads. Row length: K (8-bit), or the padded grid G * gsize for 4-bit weights; columns in k order.
  // the tile decoder's steps of 16 values stay inside a row only for 4-bit groups of a multiple of 16 (bf16_supported)
  void check_tiles() const {
    TORCH_CHECK(bits_ != 4 || gsize_ % 16 == 0, "tiles: 4-bit groups must be a multiple of 16 values, got ", gsize_);
  }
  void dequant_bf16(int64_t n0, int64_t n1, int64_t out) const {
    check_tiles();
    dequant(t_->deq_bf16, n0, n1, (uint16_t*)out);
  }
  void dequant_f32(int64_t n0, int64_t n1, int64_t out) const {
    check_tiles();
    dequant(t_->deq_f32, n0, n1, (float*)out);
  }

  // Convolution over x [B, C, H, W] (contiguous) into out [B, O, Ho, Wo]; weight rows are the flattened
  // [O, C / groups * kh * kw] filters. Activation scales are per sample (dynamic) or per tensor (static).
  // geo: kh kw sh sw ph pw dh dw groups Ho Wo hwc, where hwc = 1 says the weight rows are in (ky, kx, c) order
  // (8-bit weights, reordered by the caller) and the input is gathered channels-last.
  bool conv(int64_t x, int64_t B, int64_t C, int64_t H, int64_t W, bool x_bf16, int64_t out, bool out_bf16,
            std::vector<int64_t> geo) const {
    if (geo.size() != 12) throw std::runtime_error("conv geometry: kh kw sh sw ph pw dh dw groups Ho Wo hwc");
    return conv_t((const void*)x, x_bf16, B, C, H, W, out, out_bf16, geo);
  }

 private:
  Gemm base(int64_t M, int64_t K) const {
    Gemm g;
    std::memset(&g, 0, sizeof(g));
    g.M = M;
    g.N = N_;
    g.K = K;
    g.w = w_;
    g.ldw = ldw_;
    g.wscale = wscale_;
    g.gscale = gscale_;
    g.gzero = gzero_;
    g.lut = lut_;
    g.G = G_;
    g.gsize = gsize_;
    g.colsum = colsum_;
    g.wp = wp_;
    g.wp16 = wp16_;
    g.gsp = gsp_;
    g.bias = bias_;
    return g;
  }

  template <class T>
  void dequant(void (*fn)(const Gemm&, int, int, int64_t, int64_t, T*), int64_t n0, int64_t n1, T* o) const {
    Gemm g = base(0, K_);
    const int64_t len = deq_len();
    at::parallel_for(n0, n1, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(len, 1)), [&](int64_t b, int64_t e) {
      fn(g, (int)bits_, sym_ ? 1 : 0, b, e, o + (b - n0) * len);
    });
  }

  bool use_u8() const { return act_ != WEIGHT_ONLY && t_->u8s8; }
  int64_t deq_len() const { return bits_ == 4 ? G_ * gsize_ : K_; }  // a dequantized row: K, or the padded grid
  int64_t row_len(int64_t K) const { return bits_ == 4 ? roundup(G_ * gsize_, 64) : roundup(K, 64); }

  // n zeros starting on a 64-byte boundary inside v (the widened weight tiles: vector loads straddling cache lines
  // timed up to 1.3x slower; activation rows keep malloc's alignment: aligning them made NVFP4 at M = 1 1.4x slower)
  template <class T>
  static T* aligned(std::vector<T>& v, int64_t n) {
    v.assign(n + 64 / sizeof(T), 0);
    return (T*)(((uintptr_t)v.data() + 63) & ~(uintptr_t)63);
  }

  // (zero: the activation rows zero-filled; else left as they were, for callers that write every value of k.
  // narrow: rows for the narrow products only, which read k up to K rounded up to 4 (u8) or 2 (s16): K rounded up
  // to 4 values instead of 64, the tiles' row length (a CTR model's rows of 8 values were 8 times longer, the
  // zero-filling alone ~10 % of the layer's time at 4096 rows)
  void alloc(Scratch& s, Gemm& g, int64_t M, bool zero = true, bool narrow = false) const {
    g.lda = narrow ? roundup(g.K, 4) : row_len(g.K);
    if (g.lda % 1024 == 0) g.lda += 64;  // rows 2 KB-periodic would share cache sets: K = 4096 swung by 1.3x per process
    s.ascale.assign(M, 1.f);
    g.ascale = s.ascale.data();
    if (use_u8()) {
      if (zero) s.a8.assign(M * g.lda, 0);
      else s.a8.resize(M * g.lda);
      s.azero.assign(M, 0);
      g.a8 = s.a8.data();
      g.azero = s.azero.data();
    } else {
      if (zero) s.a16.assign(M * g.lda, 0);
      else s.a16.resize(M * g.lda);
      g.a16 = s.a16.data();
    }
    if (bits_ == 4) {
      s.asum.assign(M * G_, 0);
      g.asum = s.asum.data();
    }
  }

  // rows' quantization parameters from their ranges (q.range): weight-only, the int16 scale (max |x| / 8128, 1 when
  // 0); int8 activations, the uint8 scale and zero point (dynamic: from the row's range; static: the calibrated ones)
  void row_params(int64_t n, const float* lo, const float* hi, U8Params* u, float* wscale) const {
    if (act_ == WEIGHT_ONLY) {
      for (int64_t i = 0; i < n; i++) wscale[i] = s16_scale(hi[i]);
    } else if (act_ == INT8_DYNAMIC) {
      for (int64_t i = 0; i < n; i++) u[i] = u8_params(lo[i], hi[i]);
    } else {
      for (int64_t i = 0; i < n; i++) u[i] = static_;
    }
  }

  // activation row x (K values, fp32 or bf16), quantized with its parameters, into row m of the product's buffers
  void put_row(const void* x, int bf16, int64_t m, const Gemm& g, const U8Params& u, float wscale,
               std::vector<int16_t>& tmp) const {
    const QuantFns& q = t_->q;
    if (act_ == WEIGHT_ONLY) {
      ((float*)g.ascale)[m] = wscale;
      const float inv = 1.f / wscale;
      int16_t* a = (int16_t*)g.a16 + m * g.lda;
      if (bits_ != 4 || narrow(g)) {  // (the narrow product reads rows in their natural order)
        q.s16(x, bf16, g.K, inv, a);
        return;
      }
      tmp.resize(g.K);
      q.s16(x, bf16, g.K, inv, tmp.data());
      u4_layout(tmp.data(), g.K, a, (int32_t*)g.asum + m * G_);
      return;
    }
    ((float*)g.ascale)[m] = u.scale;
    if (use_u8()) {
      ((int32_t*)g.azero)[m] = u.zero;
      q.u8(x, bf16, g.K, u.scale, u.zero, (uint8_t*)g.a8 + m * g.lda, nullptr);
    } else {
      q.u8(x, bf16, g.K, u.scale, u.zero, nullptr, (int16_t*)g.a16 + m * g.lda);
    }
  }

  // natural-order int16 activations -> the u4 chunk layout (u4_pos) and per-group sums (4-bit weights)
  void u4_layout(const int16_t* t, int64_t K, int16_t* a, int32_t* asum) const {
    for (int64_t gi = 0; gi < G_; gi++) {
      const int64_t k0 = gi * gsize_, k1 = std::min(K, k0 + gsize_);
      int32_t sum = 0;
      for (int64_t k = k0; k < k1; k++) sum += t[k];
      asum[gi] = sum;
    }
    const int64_t C = chunk_, H = chunk_ / 2;  // per chunk: evens, then odds
    for (int64_t c0 = 0; c0 < K; c0 += C) {
      const int64_t n = std::min(C, K - c0);
      for (int64_t r = 0; r < n; r++) a[c0 + (r & 1) * H + (r >> 1)] = t[c0 + r];
    }
  }

  bool prep_rows(const void* x, int bf16, int64_t M, int64_t ldx, Scratch& s, Gemm& g, bool narrow) const {
    alloc(s, g, M, true, narrow);
    bool ok = true;
    const int64_t grain = 1 + (1 << 16) / (g.K + 1);
    const int64_t esize = bf16 ? 2 : 4;
    // rows in blocks: every row's parameters, then every row's values. Row by row, each row's range, divisions and
    // rounding form a chain of latency that short rows cannot hide (as actq.cpp's uint_rows).
    at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
      constexpr int64_t kRows = 64;
      const int64_t block = std::max<int64_t>(1, std::min<int64_t>(kRows, 16384 / std::max<int64_t>(g.K * esize, 1)));
      std::vector<int16_t> tmp;
      U8Params u[kRows] = {};
      float ws[kRows] = {}, lo[kRows], hi[kRows];
      const auto row = [&](int64_t m) { return (const void*)((const char*)x + m * ldx * esize); };
      for (int64_t b0 = m0; b0 < m1; b0 += block) {  // (a block's rows, up to 16 KB, stay in L1 for the values)
        const int64_t n = std::min(block, m1 - b0);
        bool good = true;
        for (int64_t i = 0; i < n; i++) {
          const bool finite = t_->q.range(row(b0 + i), bf16, g.K, act_ != WEIGHT_ONLY, &lo[i], &hi[i]);
          good &= usable(finite, lo[i], hi[i]);
        }
        if (!good) {  // NaN / Inf, or a value too large for the integer sums' scaling
          ok = false;  // benign race: every writer stores false
          return;
        }
        row_params(n, lo, hi, u, ws);
        for (int64_t i = 0; i < n; i++) put_row(row(b0 + i), bf16, b0 + i, g, u[i], ws[i], tmp);
      }
    });
    return ok;
  }

  // the narrow product runs this call: interleaved weights (set_narrow*), enough rows, fp32 output with ldo_n 1
  static bool narrow(const Gemm& g) { return g.M >= NARROW_ROWS && g.out && g.ldo_n == 1 && (g.wp || g.wp16); }
  bool narrow_rows(int64_t M, bool out_bf16) const { return M >= NARROW_ROWS && !out_bf16 && (wp_ || wp16_); }

  void gemm(const Gemm& g0, int64_t n0, int64_t n1) const {
    gemm_fn fn = bits_ == 4 ? (lut_ ? t_->s16l4 : sym_ ? t_->s16u4_sym : t_->s16u4_asym)
                            : (use_u8() ? t_->u8s8 : t_->s16s8);
    const bool nar = narrow(g0);
    if (nar) fn = g0.wp ? t_->u8s8_narrow : t_->s16s8_narrow;
    Gemm g = g0;
    std::vector<int8_t> planes;
    if (planes_ && !nar) {  // a = 128 * hi + lo, lo in [0, 127], hi in [-64, 63] (gemm_impl.h: P8U4, tile_p8s8)
      const int64_t n = g.M * g.lda;
      const int8_t bias = bits_ == 8 ? 64 : 0;  // int8 weights: the high plane as unsigned bytes, hi + 64
      planes.resize(2 * n);
      for (int64_t i = 0; i < n; i++) {
        planes[i] = (int8_t)(g.a16[i] & 127);
        planes[n + i] = (int8_t)((g.a16[i] >> 7) + bias);
      }
      g.alo = planes.data();
      g.ahi = planes.data() + n;
      fn = bits_ == 8 ? t_->p8s8 : sym_ ? t_->p8u4_sym : t_->p8u4_asym;
    }
    const int64_t work = g.M * (n1 - n0) * g.K;
    const int64_t NB = 16, MB = 64;
    const int64_t nunits = (n1 - n0 + NB - 1) / NB, munits = (g.M + MB - 1) / MB;
    const int64_t threads = at::get_num_threads();
    // 4-bit weights over many rows: each thread widens tiles of weight rows into its own buffer (gemm_impl.h)
    const int64_t wide = bits_ == 4 && !g.alo && !nar && g.M >= WIDE_ROWS ? WIDE_NR * g.lda : 0;  // (lda >= G * gsize)
    auto run = [&](int64_t m0, int64_t m1, int64_t a, int64_t b) {
      std::vector<int16_t> buf;
      Gemm gt = g;
      gt.wide = wide ? aligned(buf, wide) : nullptr;
      fn(gt, m0, m1, a, b);
    };
    if (work < (1 << 18) || threads == 1 || at::in_parallel_region()) {
      run(0, g.M, n0, n1);
    } else if (nunits >= 2 * threads || munits < 2) {
      at::parallel_for(0, nunits, 1, [&](int64_t b, int64_t e) { run(0, g.M, n0 + b * NB, std::min(n1, n0 + e * NB)); });
    } else {
      at::parallel_for(0, munits, 1, [&](int64_t b, int64_t e) { run(b * MB, std::min(g.M, e * MB), n0, n1); });
    }
  }

  // im2col of output pixel l from the sample's codes [C, H, W] (channels of group gi); padding is `pad`
  template <class T>
  static void im2col(const T* codes, T pad, int64_t l, int64_t gi, int64_t Cg, int64_t H, int64_t W, int64_t Wo,
                     const int64_t* geo, T* row) {
    const int64_t kh = geo[0], kw = geo[1], sh = geo[2], sw = geo[3], ph = geo[4], pw = geo[5], dh = geo[6], dw = geo[7];
    const int64_t oy = l / Wo, ox = l % Wo;
    int64_t k = 0;
    for (int64_t c = gi * Cg; c < (gi + 1) * Cg; c++)
      for (int64_t ky = 0; ky < kh; ky++) {
        const int64_t iy = oy * sh - ph + ky * dh;
        const T* src = codes + (c * H + iy) * W;
        if (iy < 0 || iy >= H) {
          for (int64_t kx = 0; kx < kw; kx++) row[k++] = pad;
          continue;
        }
        for (int64_t kx = 0; kx < kw; kx++) {
          const int64_t ix = ox * sw - pw + kx * dw;
          row[k++] = (ix >= 0 && ix < W) ? src[ix] : pad;
        }
      }
  }

  // A pointwise convolution (1 x 1, stride 1, no padding): pixel l's row is column l of the group's channel rows of
  // the sample's codes [C, L], so the packing below (xp[(q * Lp + l) * P + i] = row P q + i at pixel l) interleaves
  // P channel rows, 16 pixels at a time with SSE2 unpacks (x86-64's baseline), instead of a gather per pixel and
  // value. Rows past Cg read zeros: their weights are the filters' zero padding (set_conv_weights), and the zero
  // point's correction sums the real weights only (colsum), so any value would do.
  template <class T>
  static void pack_pointwise(const T* codes, int64_t gi, int64_t Cg, int64_t L, int64_t Lp, int64_t Kp, T* xp,
                             std::vector<T>& zeros) {
    constexpr int P = sizeof(T) == 1 ? 4 : 2;
    if ((int64_t)zeros.size() < L) zeros.assign(L, 0);
    for (int64_t q = 0; q < Kp / P; q++) {
      const T* r[P];
      for (int i = 0; i < P; i++) {
        const int64_t c = q * P + i;
        r[i] = c < Cg ? codes + (gi * Cg + c) * L : zeros.data();
      }
      T* dst = xp + q * Lp * P;
      int64_t l = 0;
#if defined(__SSE2__)
      for (; l + 16 <= L; l += 16) {
        if constexpr (P == 4) {
          const __m128i a0 = _mm_loadu_si128((const __m128i*)(r[0] + l)), a1 = _mm_loadu_si128((const __m128i*)(r[1] + l));
          const __m128i a2 = _mm_loadu_si128((const __m128i*)(r[2] + l)), a3 = _mm_loadu_si128((const __m128i*)(r[3] + l));
          const __m128i lo01 = _mm_unpacklo_epi8(a0, a1), hi01 = _mm_unpackhi_epi8(a0, a1);
          const __m128i lo23 = _mm_unpacklo_epi8(a2, a3), hi23 = _mm_unpackhi_epi8(a2, a3);
          __m128i* d = (__m128i*)(dst + l * 4);
          _mm_storeu_si128(d, _mm_unpacklo_epi16(lo01, lo23));
          _mm_storeu_si128(d + 1, _mm_unpackhi_epi16(lo01, lo23));
          _mm_storeu_si128(d + 2, _mm_unpacklo_epi16(hi01, hi23));
          _mm_storeu_si128(d + 3, _mm_unpackhi_epi16(hi01, hi23));
        } else {
          for (int h = 0; h < 16; h += 8) {
            const __m128i a0 = _mm_loadu_si128((const __m128i*)(r[0] + l + h));
            const __m128i a1 = _mm_loadu_si128((const __m128i*)(r[1] + l + h));
            __m128i* d = (__m128i*)(dst + (l + h) * 2);
            _mm_storeu_si128(d, _mm_unpacklo_epi16(a0, a1));
            _mm_storeu_si128(d + 1, _mm_unpackhi_epi16(a0, a1));
          }
        }
      }
#endif
      for (; l < L; l++)
        for (int i = 0; i < P; i++) dst[l * P + i] = r[i][l];
    }
  }

  // A sample's codes [C, H, W] as the narrow int16 product's k-major activations (Gemm::kmajor): for each pair q of
  // values of k in (c, ky, kx) order (the order of the weights' rows and of their group scales), the L output
  // pixels' two values side by side, pairs[(q * L + l) * 2 + j] = value 2 q + j of pixel l's row (0 past K). The
  // sample is copied once into a zero-padded plane per channel (padding reads 0, the code of 0.0); then, for each q
  // and output row, the two taps' runs of input pixels are interleaved, 8 pixels per step (SSE2: two loads, two
  // unpacks, two stores; the steps may read and write up to 7 pixels past a run: the plane and `pairs` have that
  // slack, and what lands past a run is overwritten by the next run, written after it). Before, each pixel's row was
  // gathered (one copy per (c, ky) run): Conv2d(16, 32, 3) over 256 x 8 x 8, 4-bit, spent more time there than in the
  // product (0.38 and 0.34 of 0.99 ms).
  static void im2col_pairs(const int16_t* codes, int64_t C, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                           const int64_t* geo, std::vector<int16_t>& pairs, std::vector<int16_t>& padded,
                           std::vector<int64_t>& taps) {
    const int64_t kh = geo[0], kw = geo[1], sh = geo[2], sw = geo[3], ph = geo[4], pw = geo[5], dh = geo[6], dw = geo[7];
    const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw, L = Ho * Wo, K = C * kh * kw, kq = (K + 1) / 2;
    // zeroed and the taps computed for a call's first sample only (the scratch lives for one call, whose samples
    // share the geometry): later samples rewrite the interior, the padding and the slack stay zero
    const bool first = padded.size() != (size_t)(C * Hp * Wp + 8);
    if (first) padded.assign(C * Hp * Wp + 8, 0);
    for (int64_t c = 0; c < C; c++)
      for (int64_t y = 0; y < H; y++) {  // (rows of a few values: a loop, not a memcpy call each)
        int16_t* dst = padded.data() + (c * Hp + y + ph) * Wp + pw;
        const int16_t* src = codes + (c * H + y) * W;
        for (int64_t x = 0; x < W; x++) dst[x] = src[x];
      }
    pairs.resize(kq * L * 2 + 16);
    if (first) {
      taps.resize(K);  // offset of value k's input pixel for output pixel (0, 0)
      for (int64_t c = 0, k = 0; c < C; c++)
        for (int64_t ky = 0; ky < kh; ky++)
          for (int64_t kx = 0; kx < kw; kx++) taps[k++] = (c * Hp + ky * dh) * Wp + kx * dw;
    }
    const int64_t rs = sh * Wp;  // input row step per output row
    for (int64_t q = 0; q < kq; q++) {
      const int16_t* s0 = padded.data() + taps[2 * q];
      const int16_t* s1 = 2 * q + 1 < K ? padded.data() + taps[2 * q + 1] : nullptr;
      int16_t* d = pairs.data() + q * L * 2;
#if defined(__SSE2__)
      if (sw == 1 && s1) {
        for (int64_t oy = 0; oy < Ho; oy++, d += 2 * Wo)
          for (int64_t ox = 0; ox < Wo; ox += 8) {
            const __m128i a = _mm_loadu_si128((const __m128i*)(s0 + oy * rs + ox));
            const __m128i b = _mm_loadu_si128((const __m128i*)(s1 + oy * rs + ox));
            _mm_storeu_si128((__m128i*)(d + 2 * ox), _mm_unpacklo_epi16(a, b));
            if (ox + 4 < Wo) _mm_storeu_si128((__m128i*)(d + 2 * ox + 8), _mm_unpackhi_epi16(a, b));
          }
        continue;
      }
#endif
      for (int64_t oy = 0; oy < Ho; oy++, d += 2 * Wo)
        for (int64_t ox = 0; ox < Wo; ox++) {
          d[2 * ox] = s0[oy * rs + ox * sw];
          d[2 * ox + 1] = s1 ? s1[oy * rs + ox * sw] : 0;
        }
    }
  }

  // One sample and group of an 8-bit convolution: gather each pixel's row, pack pixels by groups of P values of k,
  // then out[o, l] for the group's channels.
  struct Conv8Scratch {  // reused across the samples of one thread
    std::vector<uint8_t> x8, row8, pad8;
    std::vector<int16_t> x16, row16, pad16;
  };

  void conv8(int64_t b, int64_t gi, int64_t groups, int64_t Cg, int64_t H, int64_t W, int64_t Wo, int64_t L, int64_t hwc,
             int64_t Wp, const int64_t* geo, const void* codes, const void* hcodes, float scale, int32_t zero,
             int64_t out, bool out_bf16, Conv8Scratch& sc) const {
    const bool u8 = use_u8();
    const int64_t P = u8 ? 4 : 2, Og = N_ / groups, Lp = roundup(L, 16), Kq = cKp_ / P, C = Cg * groups;
    std::vector<uint8_t>& x8 = sc.x8;
    std::vector<int16_t>& x16 = sc.x16;
    if (u8) x8.assign(cKp_ * Lp, 0);
    else x16.assign(cKp_ * Lp, 0);
    std::vector<uint8_t>& row8 = sc.row8;
    row8.assign(cKp_, (uint8_t)zero);
    std::vector<int16_t>& tmp16 = sc.row16;
    tmp16.assign(cKp_, 0);
    const bool pointwise = !hwc && geo[0] == 1 && geo[1] == 1 && geo[2] == 1 && geo[3] == 1 && geo[4] == 0 && geo[5] == 0;
    if (pointwise && u8) pack_pointwise<uint8_t>((const uint8_t*)codes, gi, Cg, L, Lp, cKp_, x8.data(), sc.pad8);
    if (pointwise && !u8) pack_pointwise<int16_t>((const int16_t*)codes, gi, Cg, L, Lp, cKp_, x16.data(), sc.pad16);
    for (int64_t l = 0; l < L && !pointwise; l++) {
      if (u8) {
        if (hwc) hwc_row<uint8_t>((const uint8_t*)hcodes, l, gi, Cg, C, Wp, Wo, geo, row8.data());
        else im2col<uint8_t>((const uint8_t*)codes, (uint8_t)zero, l, gi, Cg, H, W, Wo, geo, row8.data());
        for (int64_t q = 0; q < Kq; q++) std::memcpy(&x8[(q * Lp + l) * 4], &row8[q * 4], 4);
      } else {
        if (hwc) hwc_row<int16_t>((const int16_t*)hcodes, l, gi, Cg, C, Wp, Wo, geo, tmp16.data());
        else im2col<int16_t>((const int16_t*)codes, 0, l, gi, Cg, H, W, Wo, geo, tmp16.data());
        for (int64_t q = 0; q < Kq; q++) std::memcpy(&x16[(q * Lp + l) * 2], &tmp16[q * 2], 4);
      }
    }
    ConvGemm c;
    std::memset(&c, 0, sizeof(c));
    c.O = Og;
    c.L = L;
    c.Lp = Lp;
    c.Kp = cKp_;
    c.x8 = u8 ? x8.data() : nullptr;
    c.x16 = u8 ? nullptr : x16.data();
    c.w8 = cw8_ ? cw8_ + gi * Og * cKp_ : nullptr;
    c.w16 = cw16_ + gi * Og * cKp_;
    c.wscale = wscale_ + gi * Og;
    c.colsum = colsum_ ? colsum_ + gi * Og : nullptr;
    c.zero = zero;
    c.xscale = scale;
    c.bias = bias_ ? bias_ + gi * Og : nullptr;
    c.gscale = cgscale_ ? cgscale_ + gi * Og * cG_ : nullptr;
    c.G = cG_;
    c.gq = cgq_;
    const int64_t o = b * N_ * L + gi * Og * L;
    c.out = out_bf16 ? nullptr : (float*)out + o;
    c.out16 = out_bf16 ? (uint16_t*)out + o : nullptr;
    conv_fn fn = u8 ? t_->conv_u8 : t_->conv_s16;
    if (Og * L * cKp_ < (1 << 18) || at::in_parallel_region()) {
      fn(c, 0, Og);
    } else {
      at::parallel_for(0, (Og + 7) / 8, 1, [&](int64_t b0, int64_t b1) { fn(c, b0 * 8, std::min(Og, b1 * 8)); });
    }
  }

  // One sample of a convolution (groups 1) through the narrow Linear products: its pixels are the rows (gathered
  // channels-last in (ky, kx, c) order for 8-bit filters, as their weight rows; in (c, ky, kx) order from the NCHW
  // codes for 4-bit ones, whose group scales follow that order), the output channels lie along the vector, so
  // a weight vector serves a block of pixels (the broadcast product needs a weight broadcast per multiply, and a
  // sample of 16-64 pixels fills one or two vectors); the [pixels, channels] result is transposed into the NCHW
  // output. The same exact int32 sums, scales and bias as the broadcast product, which such layers do not keep.
  struct NarrowScratch {
    Scratch s;
    std::vector<float> tmp, t32;
    std::vector<int16_t> padded;
    std::vector<int64_t> taps;
  };
  void conv_narrow(int64_t b, int64_t L, int64_t H, int64_t W, int64_t Wp, int64_t Wo, int64_t C, bool hwc,
                   const int64_t* geo, const void* codes, float scale, int32_t zero, int64_t out, bool out_bf16,
                   NarrowScratch& ns) const {
    Gemm g = base(L, K_);
    alloc(ns.s, g, L, false);  // (the gathers below write every value of k the product reads)
    for (int64_t l = 0; l < L; l++) {
      ns.s.ascale[l] = scale;
      if (use_u8()) {
        ns.s.azero[l] = zero;
        hwc_row<uint8_t>((const uint8_t*)codes, l, 0, C, C, Wp, Wo, geo, (uint8_t*)g.a8 + l * g.lda);
      } else if (hwc) {
        hwc_row<int16_t>((const int16_t*)codes, l, 0, C, C, Wp, Wo, geo, (int16_t*)g.a16 + l * g.lda);
      }
    }
    if (!use_u8() && !hwc) {
      im2col_pairs((const int16_t*)codes, C, H, W, L / Wo, Wo, geo, ns.s.a16, ns.padded, ns.taps);
      g.a16 = ns.s.a16.data();
      g.kmajor = L;
    }
    ns.tmp.resize(L * N_);
    g.out = ns.tmp.data();
    g.ldo_m = N_;
    g.ldo_n = 1;
    (g.wp ? t_->u8s8_narrow : t_->s16s8_narrow)(g, 0, L, 0, N_);
    const bool x86 = x86_build(t_);
    if (!out_bf16) {
      transpose_batched(ns.tmp.data(), (float*)out + b * N_ * L, 1, L, N_, x86);
      return;
    }
    ns.t32.resize(L * N_);  // bf16 output: transposed in fp32, then rounded as the broadcast product rounds
    transpose_batched(ns.tmp.data(), ns.t32.data(), 1, L, N_, x86);
    uint16_t* o16 = (uint16_t*)out + b * N_ * L;
    for (int64_t i = 0; i < L * N_; i++) o16[i] = f32_to_bf16(ns.t32[i]);
  }

  // The sample is quantized once (per-sample or static uint8 codes, or 14-bit codes for weight-only formats),
  // then each output pixel's row is gathered from the codes (padding: the code of 0.0).
  bool conv_t(const void* x, int bf16, int64_t B, int64_t C, int64_t H, int64_t W, int64_t out, bool out_bf16,
              const std::vector<int64_t>& geo) const {
    const int64_t groups = geo[8], Ho = geo[9], Wo = geo[10], hwc = geo[11], Wp = W + 2 * geo[5];
    if (hwc && !cKp_ && !wp_ && !wp16_)
      throw std::runtime_error("channels-last gather needs the broadcast or the interleaved weights");
    const int64_t Cg = C / groups, Og = N_ / groups, L = Ho * Wo, Kc = Cg * geo[0] * geo[1], CHW = C * H * W;
    if (Kc != K_) throw std::runtime_error("conv geometry does not match the weight");
    const int64_t esize = bf16 ? 2 : 4;
    bool ok = true;
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<int16_t> c16, tmp(Kc), h16;
      std::vector<uint8_t> c8, h8;
      Conv8Scratch sc8;
      NarrowScratch nsc;
      for (int64_t b = b0; b < b1 && ok; b++) {
        const void* xb = (const char*)x + b * CHW * esize;
        float lo, hi;
        const bool finite = t_->q.range(xb, bf16, CHW, act_ != WEIGHT_ONLY, &lo, &hi);
        if (!usable(finite, lo, hi)) {
          ok = false;
          break;
        }
        float scale;
        int32_t zero = 0;
        if (act_ == WEIGHT_ONLY) {
          scale = s16_scale(hi);
          c16.resize(CHW);
          t_->q.s16(xb, bf16, CHW, 1.f / scale, c16.data());
        } else {
          const U8Params p = act_ == INT8_DYNAMIC ? u8_params(lo, hi) : static_;
          scale = p.scale;
          zero = p.zero;
          if (use_u8()) {
            c8.resize(CHW);
            t_->q.u8(xb, bf16, CHW, p.scale, p.zero, c8.data(), nullptr);
          } else {
            c16.resize(CHW);
            t_->q.u8(xb, bf16, CHW, p.scale, p.zero, nullptr, c16.data());
          }
        }
        if (hwc) {
          if (use_u8()) to_hwc<uint8_t>(c8.data(), (uint8_t)zero, C, H, W, geo[4], geo[5], h8);
          else to_hwc<int16_t>(c16.data(), 0, C, H, W, geo[4], geo[5], h16);
        }
        // convolutions whose only copy is the interleaved one (set_narrow*, no broadcast weights): the narrow
        // product. (A 4-bit Linear run as 1 x 1 convolutions below NARROW_ROWS rows keeps both: the broadcast one.)
        if (groups == 1 && (wp_ || wp16_) && !cKp_) {
          const void* codes = hwc ? (use_u8() ? (const void*)h8.data() : h16.data()) : c16.data();
          conv_narrow(b, L, H, W, Wp, Wo, C, hwc, geo.data(), codes, scale, zero, out, out_bf16, nsc);
          continue;
        }
        if (cKp_) {  // 8-bit (and 4-bit as int16) weights: broadcast-style product on packed pixels
          for (int64_t gi = 0; gi < groups; gi++)
            conv8(b, gi, groups, Cg, H, W, Wo, L, hwc, Wp, geo.data(), use_u8() ? (const void*)c8.data() : c16.data(),
                  use_u8() ? (const void*)h8.data() : h16.data(), scale, zero, out, out_bf16, sc8);
          continue;
        }
        for (int64_t gi = 0; gi < groups; gi++) {
          Scratch s;
          Gemm g = base(L, K_);
          g.N = Og;
          g.w = w_ + gi * Og * ldw_;
          if (g.wscale) g.wscale += gi * Og;
          if (g.gscale) g.gscale += gi * Og * G_;
          if (g.gzero) g.gzero += gi * Og * G_;
          if (g.colsum) g.colsum += gi * Og;
          if (g.bias) g.bias += gi * Og;
          const int64_t o = b * N_ * L + gi * Og * L;
          g.out = out_bf16 ? nullptr : (float*)out + o;
          g.out16 = out_bf16 ? (uint16_t*)out + o : nullptr;
          g.ldo_m = 1;
          g.ldo_n = L;
          alloc(s, g, L);
          for (int64_t l = 0; l < L; l++) {
            s.ascale[l] = scale;
            if (hwc) {
              if (use_u8()) s.azero[l] = zero;
              if (use_u8()) hwc_row<uint8_t>(h8.data(), l, gi, Cg, C, Wp, Wo, geo.data(), (uint8_t*)g.a8 + l * g.lda);
              else hwc_row<int16_t>(h16.data(), l, gi, Cg, C, Wp, Wo, geo.data(), (int16_t*)g.a16 + l * g.lda);
            } else if (use_u8()) {
              s.azero[l] = zero;
              im2col<uint8_t>(c8.data(), (uint8_t)zero, l, gi, Cg, H, W, Wo, geo.data(), (uint8_t*)g.a8 + l * g.lda);
            } else if (bits_ == 4) {
              im2col<int16_t>(c16.data(), 0, l, gi, Cg, H, W, Wo, geo.data(), tmp.data());
              u4_layout(tmp.data(), Kc, (int16_t*)g.a16 + l * g.lda, s.asum.data() + l * G_);
            } else {
              im2col<int16_t>(c16.data(), 0, l, gi, Cg, H, W, Wo, geo.data(), (int16_t*)g.a16 + l * g.lda);
            }
          }
          gemm(g, 0, Og);
        }
      }
    });
    return ok;
  }

  int64_t N_, K_, bits_, gsize_, G_ = 1, ldw_ = 0, cKp_ = 0, cG_ = 1, cgq_ = 0;
  const float* cgscale_ = nullptr;
  const int8_t* cw8_ = nullptr;
  const int16_t* cw16_ = nullptr;
  bool sym_, planes_ = false;
  int act_, chunk_ = 0;
  U8Params static_;
  const IsaTable* t_;
  const uint8_t* w_;
  const float *wscale_, *gscale_, *bias_;
  const uint8_t* gzero_;
  const int8_t* lut_ = nullptr;
  const int8_t* wp_ = nullptr;
  const int16_t* wp16_ = nullptr;
  const float* gsp_ = nullptr;
  const int32_t* colsum_;
};

// Table lookups with tensors in and out (one native call per lookup: the per-call cost of small batches).
// Rows idx (any shape, any integer dtype) as fp32 [idx.numel(), cols]; nullopt if an id lies outside the table.
std::optional<at::Tensor> rows_t(const RowTable& t, const at::Tensor& idx) {
  TORCH_CHECK(!at::isFloatingType(idx.scalar_type()) && !idx.is_complex(), "rows_t: ids must be integers");
  const at::Tensor ids = idx.reshape(-1).to(at::kLong).contiguous();
  at::Tensor out = at::empty({ids.numel(), t.cols}, at::kFloat);
  if (!t.decode((int64_t)ids.data_ptr(), ids.numel(), (int64_t)out.data_ptr())) return std::nullopt;
  return out;
}

// Bags as RowTable::bags: idx 1-D with offsets (bag starts; include_last: the last entry closes the last bag), or
// 2-D [bags, ids] without; fp32 [bags, cols]; nullopt if an id lies outside the table or the offsets are invalid.
std::optional<at::Tensor> bags_t(const RowTable& t, const at::Tensor& idx, const std::optional<at::Tensor>& offsets,
                                 bool include_last, bool mean) {
  TORCH_CHECK(!at::isFloatingType(idx.scalar_type()) && !idx.is_complex(), "bags_t: ids must be integers");
  TORCH_CHECK(offsets ? idx.dim() == 1 && offsets->dim() == 1 && offsets->numel() > 0 : idx.dim() == 2,
              "bags_t: 1-D ids with non-empty 1-D offsets, or 2-D ids without");
  const at::Tensor ids = idx.to(at::kLong).contiguous();
  at::Tensor offs;
  int64_t nbags = 0, noff = 0, len = 0;
  if (offsets) {
    offs = offsets->to(at::kLong).contiguous();
    noff = offs.numel();
    nbags = include_last ? noff - 1 : noff;
  } else {
    nbags = idx.size(0);
    len = idx.size(1);
  }
  at::Tensor out = at::empty({std::max<int64_t>(nbags, 0), t.cols}, at::kFloat);
  if (!t.bags((int64_t)ids.data_ptr(), ids.numel(), offsets ? (int64_t)offs.data_ptr() : 0, noff, len, include_last,
              mean, (int64_t)out.data_ptr()))
    return std::nullopt;
  return out;
}

// Depthwise convolution (common.h: DwConv): x fp32 [B, C, H, W] contiguous, w fp32 [C, 1, kh, kw] (odd kh, kw),
// bias fp32 [C] or none; stride 1, dilation 1, zero padding (kh - 1) / 2, (kw - 1) / 2. Returns fp32 [B, C, H, W].
at::Tensor dw_conv_t(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                     const std::string& isa) {
  const IsaTable* t = find_table(isa);
  TORCH_CHECK(t, "dw_conv_t: instruction set '", isa, "' is not available on this CPU or build");
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "dw_conv_t: x must be a contiguous fp32 [B, C, H, W] tensor");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = w.dim() == 4 ? w.size(0) : 0;
  TORCH_CHECK(w.dim() == 4 && C > 0 && O > 0 && O % C == 0 && w.size(1) == 1 && w.size(2) % 2 == 1 &&
                  w.size(3) % 2 == 1 && w.scalar_type() == at::kFloat && w.is_contiguous(),
              "dw_conv_t: w must be a contiguous fp32 [O, 1, kh, kw] tensor (O a multiple of C) with odd kh, kw");
  TORCH_CHECK(!bias || (bias->numel() == O && bias->scalar_type() == at::kFloat && bias->is_contiguous()),
              "dw_conv_t: bias must be a contiguous fp32 [O] tensor");
  at::Tensor out = at::empty({B, O, H, W}, x.options());
  if (out.numel() == 0) return out;
  const int64_t kh = w.size(2), kw = w.size(3), ph = (kh - 1) / 2, pw = (kw - 1) / 2, P = H * W, LF = t->dw_lanes;
  DwConv d{C, P, LF ? (P + LF - 1) / LF : 1, kh * kw, x.data_ptr<float>(), w.data_ptr<float>(),
           bias ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(), nullptr, nullptr, nullptr, H, W, kh, kw,
           O / C};
  std::vector<int64_t> off(d.taps);
  std::vector<uint16_t> mbits(LF ? d.taps * d.chunks : 0);
  std::vector<int32_t> mvec(LF == 8 ? d.taps * d.chunks * LF : 0);  // (256-bit registers: vmaskmovps reads int masks)
  for (int64_t ky = 0; ky < kh; ky++)
    for (int64_t kx = 0; kx < kw; kx++) {
      const int64_t tap = ky * kw + kx, dy = ky - ph, dx = kx - pw;
      off[tap] = dy * W + dx;
      for (int64_t j = 0; LF && j < d.chunks; j++) {
        uint32_t bits = 0;
        for (int64_t l = 0; l < LF; l++) {
          const int64_t i = j * LF + l, y = i / W + dy, xx = i % W + dx;
          const bool in = i < P && y >= 0 && y < H && xx >= 0 && xx < W;
          bits |= (uint32_t)in << l;
          if (!mvec.empty()) mvec[(j * d.taps + tap) * LF + l] = in ? -1 : 0;
        }
        mbits[j * d.taps + tap] = (uint16_t)bits;
      }
    }
  d.off = off.data();
  d.mbits = mbits.data();
  d.mvec = mvec.data();
  at::parallel_for(0, B * O, std::max<int64_t>(1, 16384 / P), [&](int64_t p0, int64_t p1) { t->dw(d, p0, p1); });
  return out;
}

// ---- fp8 weights x fp8 activations -------------------------------------------------------------------------
// The layer's weight as the bf16 bits of its fp8 values interleaved by 2 values of k (Fp8Gemm::wp), one scale per
// output; multiplied as bf16 pairs (fp8.cpp, AVX512-BF16 only) or widened to fp32 (any build: IsaTable::fp8_f32). Activations fake-quantized to
// fp8 with one scale per tensor (dynamic: max |x| / max, or the static one) as the reference path does, then
// multiplied as their fp8 values: the products are exact, the scales are applied to the fp32 sums.
class Fp8Layer {
 public:
  Fp8Layer(int64_t w, int64_t wscale, int64_t bias, int64_t N, int64_t K, bool e5m2, double s_static,
           const std::string& isa, bool bf16)
      : w_((const uint16_t*)w), wscale_((const float*)wscale), bias_((const float*)bias), N_(N), K_(K), e5m2_(e5m2),
        static_((float)s_static), bf16_(bf16) {
    t_ = find_table(isa);
    if (!t_) throw std::runtime_error("instruction set '" + isa + "' is not available on this CPU or build");
    if (bf16 && !fp8_bf16_supported()) throw std::runtime_error("bf16 fp8 products need AVX512-BF16, which this CPU lacks");
  }

  // y [M, N] for a contiguous fp32 x [M, K]; nullopt if x holds NaN or Inf
  std::optional<at::Tensor> linear_t(const at::Tensor& x) const {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K_ && x.is_contiguous() && x.scalar_type() == at::kFloat,
                "fp8 linear_t: x must be a contiguous fp32 [M, ", K_, "] tensor");
    return bf16_ ? linear<uint16_t>(x) : linear<float>(x);
  }

  // 2-D convolution (groups 1) of a contiguous fp32 NCHW x, weight rows in (ky, kx, c) order: the activations
  // quantized channels-last (one scale for the whole tensor), each sample's output pixels gathered as rows of kh x kw
  // runs of C values (zeros outside the input), the product [pixels, N] then transposed to NCHW.
  // geo: kh kw sh sw ph pw dh dw Ho Wo. nullopt if x holds NaN or Inf.
  std::optional<at::Tensor> conv_t(const at::Tensor& x, std::vector<int64_t> geo) const {
    TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.scalar_type() == at::kFloat && geo.size() == 10,
                "fp8 conv_t: a contiguous fp32 NCHW x and kh kw sh sw ph pw dh dw Ho Wo");
    TORCH_CHECK(geo[0] * geo[1] * x.size(1) == K_, "fp8 conv_t: the input's channels do not match the weight");
    TORCH_CHECK(geo[8] >= 0 && geo[9] >= 0, "fp8 conv_t: negative output size");
    return bf16_ ? conv<uint16_t>(x, geo) : conv<float>(x, geo);
  }

 private:
  // rows of the activations: pairs of k (zeros beyond K)
  int64_t ldq() const { return K_ + (K_ & 1); }

  template <class T>
  std::optional<at::Tensor> linear(const at::Tensor& x) const {
    const int64_t M = x.size(0), ld = ldq();
    at::Tensor out = at::empty({M, N_}, x.options());
    if (!M) return out;
    std::vector<T> q(M * ld);
    float s;
    if (!quant_fp8(x.data_ptr<float>(), q.data(), M, K_, ld, e5m2_, static_, &s)) return std::nullopt;
    gemm(q.data(), ld, M, s, out.data_ptr<float>());
    return out;
  }

  template <class T>
  std::optional<at::Tensor> conv(const at::Tensor& x, const std::vector<int64_t>& geo) const {
    const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    const int64_t kh = geo[0], kw = geo[1], sh = geo[2], sw = geo[3], ph = geo[4], pw = geo[5], Ho = geo[8],
                  Wo = geo[9], L = Ho * Wo, P = H * W;
    at::Tensor out = at::empty({B, N_, Ho, Wo}, x.options());
    if (!B || !L) return out;
    const bool avx2 = x86_build(t_);
    std::vector<float> xt(B * P * C);  // channels-last
    transpose_batched(x.data_ptr<float>(), xt.data(), B, C, P, avx2);
    std::vector<T> q(B * P * C);
    float s;
    if (!quant_fp8(xt.data(), q.data(), 1, B * P * C, B * P * C, e5m2_, static_, &s)) return std::nullopt;
    std::vector<float> y(B * L * N_);
    const int64_t ld = ldq();
    if (kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0 && Ho == H && Wo == W && ld == C) {
      // 1 x 1 over the whole input: the channels-last codes are the rows
      gemm(q.data(), C, B * L, s, y.data());
    } else {
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<T> padded, rows(L * ld);  // (rows: the value past K of an odd K stays 0)
        for (int64_t b = b0; b < b1; b++) {
          pad_hwc(q.data() + b * P * C, C, H, W, ph, pw, padded);
          for (int64_t l = 0; l < L; l++) hwc_row(padded.data(), l, 0, C, C, W + 2 * pw, Wo, geo.data(), rows.data() + l * ld);
          gemm(rows.data(), ld, L, s, y.data() + b * L * N_);
        }
      });
    }
    transpose_batched(y.data(), out.data_ptr<float>(), B, L, N_, avx2);
    return out;
  }

  template <class T>
  void gemm(const T* a, int64_t lda, int64_t M, float s, float* out) const {
    Fp8Gemm g{};
    if constexpr (sizeof(T) == 2) g.a = a;
    else g.af = a;
    g.wp = w_;
    g.lda = lda;
    g.wscale = wscale_;
    g.bias = bias_;
    g.ascale = s;
    g.M = M;
    g.N = N_;
    g.K = K_;
    g.out = out;
    g.ldo = N_;
    const auto fn = sizeof(T) == 2 ? fp8_gemm_bf16 : t_->fp8_f32;
    const int64_t blocks = (M + 7) / 8, grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(8 * N_ * K_, 1));
    if (at::in_parallel_region() || blocks <= grain) return fn(g, 0, M);
    at::parallel_for(0, blocks, grain, [&](int64_t b, int64_t e) { fn(g, 8 * b, std::min(M, 8 * e)); });
  }

  const IsaTable* t_;
  const uint16_t* w_;
  const float *wscale_, *bias_;
  int64_t N_, K_;
  bool e5m2_;
  float static_;
  bool bf16_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "modelpress native CPU kernels (int8 / int4 weights, int8 activations)";
  m.def("available", &available, "instruction sets this build can run on this CPU, best first");
  m.def("cpu_supports", &cpu_supports);
  m.def("loop_level", &loop_level, "the level the plain loops run at (2 AVX-512, 1 AVX2, 0 baseline): common.h MPK_MULTI");
  m.def("flush", &flush, "evict [ptr, ptr + nbytes) from every cache level (x86 clflush; a no-op elsewhere)",
        py::call_guard<py::gil_scoped_release>());
  m.def("quant_fp8_bf16", [](int64_t x, int64_t q, int64_t M, int64_t K, bool e5m2, double scale) {
    float s = -1.f;
    return quant_fp8((const float*)x, (uint16_t*)q, M, K, K, e5m2, (float)scale, &s) ? (double)s : -1.0;
  }, "the fp8 values of x [M, K] (fp32) / s as bf16 bits into q [M, K]; returns s (scale <= 0: dynamic, max|x| / max), "
     "or -1 if x holds NaN/Inf", py::call_guard<py::gil_scoped_release>());
  m.def("fp8_codes_bf16", [](int64_t codes, int64_t n, bool e5m2, int64_t out) {
    fp8_codes_to_bf16((const uint8_t*)codes, (uint16_t*)out, n, e5m2);
  }, "n fp8 codes (E5M2 or E4M3) -> their values as bf16 bits, exactly", py::call_guard<py::gil_scoped_release>());
  m.def("fake_quant_fp8", [](int64_t x, int64_t y, int64_t n, bool e5m2, double scale) {
    return fake_quant_fp8((const float*)x, (float*)y, n, e5m2, (float)scale);
  }, "fp8 activation fake quantization of n fp32 values (scale <= 0: dynamic); false if any is NaN/Inf",
        py::call_guard<py::gil_scoped_release>());
  m.def("fake_quant_uint", [](int64_t x, int64_t y, int64_t rows, int64_t cols, int64_t bits, bool dynamic, double scale,
                              double zero) {
    return fake_quant_uint((const float*)x, (float*)y, rows, cols, bits, dynamic, (float)scale, (float)zero);
  }, "unsigned integer activation fake quantization, per row (dynamic) or static; false if any value is NaN/Inf",
        py::call_guard<py::gil_scoped_release>());
  m.def("dw_conv_t", &dw_conv_t, "depthwise 2-D convolution, stride 1, same padding (fp32)", py::arg("x"),
        py::arg("w"), py::arg("bias"), py::arg("isa"), py::call_guard<py::gil_scoped_release>());
  m.def("transpose_batched", [](int64_t x, int64_t y, int64_t B, int64_t R, int64_t C, bool avx2) {
    transpose_batched((const float*)x, (float*)y, B, R, C, avx2);
  }, "y[b, c, r] = x[b, r, c] (fp32, contiguous; avx2: 8 x 8 register blocks where the CPU has AVX2)", py::call_guard<py::gil_scoped_release>());
  m.def("fp8_bf16", &fp8_bf16_supported, "this CPU multiplies bf16 pairs in hardware (AVX512-BF16): the fp8 products");
  py::class_<Fp8Layer>(m, "Fp8Layer")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, bool, double, const std::string&, bool>(),
           py::arg("w"), py::arg("wscale"), py::arg("bias"), py::arg("N"), py::arg("K"), py::arg("e5m2"),
           py::arg("s_static"), py::arg("isa"), py::arg("bf16"))
      .def("linear_t", &Fp8Layer::linear_t, py::call_guard<py::gil_scoped_release>())
      .def("conv_t", &Fp8Layer::conv_t, py::call_guard<py::gil_scoped_release>());
  py::class_<RowTable>(m, "RowTable")
      .def(py::init([](int64_t codes, int64_t scale, int scale_kind, int64_t zero, int64_t lut, int64_t slut,
                       double gscale, int64_t rows, int64_t row_codes, int64_t groups, int64_t g, int64_t cols,
                       int64_t bits, bool avx2) {
             return RowTable{(const uint8_t*)codes, (const void*)scale, scale_kind, (const uint8_t*)zero,
                             (const float*)lut, (const float*)slut, (float)gscale, rows, row_codes, groups, g, cols,
                             bits, avx2};
           }),
           py::arg("codes"), py::arg("scale"), py::arg("scale_kind"), py::arg("zero"), py::arg("lut"),
           py::arg("slut"), py::arg("gscale"), py::arg("rows"), py::arg("row_codes"), py::arg("groups"),
           py::arg("g"), py::arg("cols"), py::arg("bits"), py::arg("avx2"))
      .def("decode", &RowTable::decode, py::call_guard<py::gil_scoped_release>())
      .def("rows_t", &rows_t, py::call_guard<py::gil_scoped_release>())
      .def("bags_t", &bags_t, py::call_guard<py::gil_scoped_release>());
  py::class_<Layer>(m, "Layer")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool,
                    int64_t, double, double, const std::string&, bool, bool>(),
           py::arg("codes"), py::arg("wscale"), py::arg("gscale"), py::arg("gzero"), py::arg("colsum"),
           py::arg("bias"), py::arg("N"), py::arg("K"), py::arg("bits"), py::arg("gsize"), py::arg("sym"),
           py::arg("act"), py::arg("s_scale"), py::arg("s_zero"), py::arg("isa"), py::arg("planes") = true,
           py::arg("conv") = false)
      .def_property_readonly("isa", &Layer::isa)
      .def_property_readonly("planes", &Layer::planes)
      .def("linear_t", &Layer::linear_t, py::call_guard<py::gil_scoped_release>())
      .def("linear_tiles", &Layer::linear_tiles, py::call_guard<py::gil_scoped_release>())
      .def("dequant_bf16", &Layer::dequant_bf16, py::call_guard<py::gil_scoped_release>())
      .def("dequant_f32", &Layer::dequant_f32, py::call_guard<py::gil_scoped_release>())
      .def("set_conv_weights", &Layer::set_conv_weights)
      .def("set_conv_groups", &Layer::set_conv_groups)
      .def("set_lut", &Layer::set_lut)
      .def("set_narrow", &Layer::set_narrow)
      .def("set_narrow16", &Layer::set_narrow16)
      .def("set_narrow16_groups", &Layer::set_narrow16_groups)
      .def("conv", &Layer::conv, py::call_guard<py::gil_scoped_release>());
}
