// Python binding of the native kernels: activation quantization, im2col, threading (at::parallel_for) and
// the choice of instruction-set table. Tensors cross as data pointers: the Python side owns them, keeps
// them alive and checks shapes, dtypes and contiguity (modelpress/quant/kernels/native.py).
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"

namespace py = pybind11;
using namespace mpk;

namespace {

// ---- CPU features --------------------------------------------------------------------------------------
bool cpu_supports(const std::string& isa) {
  if (isa == "scalar") return true;
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (isa == "avx2") return avx2;
  if (isa == "avx512") return avx512;
  if (isa == "avx512_vnni") return avx512 && __builtin_cpu_supports("avx512vnni");
#if defined(__clang__) || (__GNUC__ >= 11)
  if (isa == "avx2_vnni") return avx2 && __builtin_cpu_supports("avxvnni");
#endif
#endif
  return false;
}

const IsaTable* find_table(const std::string& isa) {
  const IsaTable* t = nullptr;
  if (isa == "avx512_vnni") t = table_avx512_vnni();
  else if (isa == "avx512") t = table_avx512();
  else if (isa == "avx2_vnni") t = table_avx2_vnni();
  else if (isa == "avx2") t = table_avx2();
  else if (isa == "scalar") t = table_scalar();
  return t && cpu_supports(isa) ? t : nullptr;
}

std::vector<std::string> available() {
  std::vector<std::string> out;
  for (const char* n : {"avx512_vnni", "avx512", "avx2_vnni", "avx2", "scalar"})
    if (find_table(n)) out.push_back(n);
  return out;
}

// ---- activation quantization ---------------------------------------------------------------------------
inline float bf16f(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <class T> inline float ld(const T* p, int64_t i);
template <> inline float ld<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float ld<uint16_t>(const uint16_t* p, int64_t i) { return bf16f(p[i]); }

inline int64_t roundup(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Weight-only: a = round(x / s), s = max|x| / 8128 (14 bits: every int32 lane bound in gemm_impl.h
// assumes |a| <= 8128). Written at u4_pos(k, chunk) when chunk > 0, with per-group sums. False on NaN/Inf.
template <class T>
bool quant_s16(const T* x, int64_t K, int16_t* a, int64_t lda, float* scale, int chunk, int32_t* asum,
               int64_t gsize) {
  float amax = 0.f;
  bool bad = false;
  for (int64_t k = 0; k < K; k++) {
    const float v = std::fabs(ld(x, k));
    bad |= !(v <= FLT_MAX);
    amax = v > amax ? v : amax;
  }
  if (bad) return false;
  const float inv = amax > 0.f ? 8128.f / amax : 0.f;
  *scale = amax > 0.f ? amax / 8128.f : 1.f;
  if (chunk <= 0) {
    for (int64_t k = 0; k < K; k++) a[k] = (int16_t)std::lrint(ld(x, k) * inv);
    for (int64_t k = K; k < lda; k++) a[k] = 0;
    return true;
  }
  std::memset(a, 0, lda * sizeof(int16_t));
  int64_t groups = (K + gsize - 1) / gsize;
  for (int64_t gi = 0; gi < groups; gi++) asum[gi] = 0;
  for (int64_t k = 0; k < K; k++) {
    const int16_t q = (int16_t)std::lrint(ld(x, k) * inv);
    a[u4_pos(k, chunk)] = q;
    asum[k / gsize] += q;
  }
  return true;
}

// int8 activations: exactly modelpress.quant.activation (uint8_params + quantize_uint8): per row
// lo = min(x, 0), hi = max(x, 0), scale = (hi - lo) / 255, zero = round(-lo / scale), u = round(x / scale) + zero
// clamped to [0, 255], rounding half to even; or a given (static) scale and zero. False on NaN/Inf.
struct U8Params {
  float scale, zero;
};
template <class T>
bool u8_params(const T* x, int64_t K, bool dynamic, U8Params* p) {
  float lo = 0.f, hi = 0.f;
  bool bad = false;
  for (int64_t k = 0; k < K; k++) {
    const float v = ld(x, k);
    bad |= !(std::fabs(v) <= FLT_MAX);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  if (bad) return false;
  if (dynamic) {
    float s = (hi - lo) / 255.f;
    if (!(s > 0.f)) s = 1.f;
    float z = std::nearbyint(-lo / s);
    p->scale = s;
    p->zero = z < 0.f ? 0.f : (z > 255.f ? 255.f : z);
  }
  return true;
}
inline int32_t u8_code(float v, const U8Params& p) {
  float q = v / p.scale;
  q = q < -512.f ? -512.f : (q > 512.f ? 512.f : q);  // beyond the clamp below either way
  q = std::nearbyint(q) + p.zero;
  return q < 0.f ? 0 : (q > 255.f ? 255 : (int32_t)q);
}

// ---- the layer ----------------------------------------------------------------------------------------
enum Act { WEIGHT_ONLY = 0, INT8_DYNAMIC = 1, INT8_STATIC = 2 };

struct Scratch {  // per call (or per thread in a parallel region)
  std::vector<int16_t> a16;
  std::vector<uint8_t> a8;
  std::vector<float> ascale;
  std::vector<int32_t> azero, asum;
};

class Layer {
 public:
  Layer(int64_t codes, int64_t wscale, int64_t gscale, int64_t gzero, int64_t colsum, int64_t bias, int64_t N,
        int64_t K, int64_t bits, int64_t gsize, bool sym, int64_t act, double s_scale, double s_zero,
        const std::string& isa)
      : N_(N), K_(K), bits_(bits), gsize_(gsize), sym_(sym), act_((int)act) {
    t_ = find_table(isa);
    if (!t_) throw std::runtime_error("instruction set '" + isa + "' is not available on this CPU or build");
    w_ = (const uint8_t*)codes;
    wscale_ = (const float*)wscale;
    gscale_ = (const float*)gscale;
    gzero_ = (const uint8_t*)gzero;
    colsum_ = (const int32_t*)colsum;
    bias_ = (const float*)bias;
    static_ = {(float)s_scale, (float)s_zero};
    if (bits == 8) {
      ldw_ = K;
      if (act_ != WEIGHT_ONLY && t_->u8s8 && !colsum_) throw std::runtime_error("int8 activations need column sums");
    } else if (bits == 4) {
      G_ = (K + gsize - 1) / gsize;
      ldw_ = G_ * gsize / 2;
      chunk_ = t_->u4_chunk(gsize);
      if (!chunk_ || act_ != WEIGHT_ONLY) throw std::runtime_error("unsupported 4-bit layout");
    } else {
      throw std::runtime_error("only 8- and 4-bit weights");
    }
  }

  std::string isa() const { return t_->name; }

  // y[M, N] = x[M, K] (row stride ldx) through the kernel; false (y untouched) if x holds NaN or Inf.
  bool linear(int64_t x, int64_t M, int64_t ldx, bool x_bf16, int64_t out, bool out_bf16) const {
    Scratch s;
    Gemm g = base(M, K_);
    g.out = out_bf16 ? nullptr : (float*)out;
    g.out16 = out_bf16 ? (uint16_t*)out : nullptr;
    g.ldo_m = N_;
    g.ldo_n = 1;
    bool ok = x_bf16 ? prep_rows((const uint16_t*)x, M, ldx, s, g) : prep_rows((const float*)x, M, ldx, s, g);
    if (!ok) return false;
    gemm(g, 0, N_);
    return true;
  }

  // Convolution over x [B, C, H, W] (contiguous) into out [B, O, Ho, Wo]; weight rows are the flattened
  // [O, C / groups * kh * kw] filters. Activation scales are per sample (dynamic) or per tensor (static).
  bool conv(int64_t x, int64_t B, int64_t C, int64_t H, int64_t W, bool x_bf16, int64_t out, bool out_bf16,
            std::vector<int64_t> geo) const {
    if (geo.size() != 11) throw std::runtime_error("conv geometry: kh kw sh sw ph pw dh dw groups Ho Wo");
    return x_bf16 ? conv_t((const uint16_t*)x, B, C, H, W, out, out_bf16, geo)
                  : conv_t((const float*)x, B, C, H, W, out, out_bf16, geo);
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
    g.G = G_;
    g.gsize = gsize_;
    g.colsum = colsum_;
    g.bias = bias_;
    return g;
  }

  bool use_u8() const { return act_ != WEIGHT_ONLY && t_->u8s8; }
  int64_t row_len(int64_t K) const { return bits_ == 4 ? roundup(G_ * gsize_, 64) : roundup(K, 64); }

  void alloc(Scratch& s, Gemm& g, int64_t M) const {
    g.lda = row_len(g.K);
    s.ascale.assign(M, 1.f);
    g.ascale = s.ascale.data();
    if (use_u8()) {
      s.a8.assign(M * g.lda, 0);
      s.azero.assign(M, 0);
      g.a8 = s.a8.data();
      g.azero = s.azero.data();
    } else {
      s.a16.assign(M * g.lda, 0);
      g.a16 = s.a16.data();
    }
    if (bits_ == 4) {
      s.asum.assign(M * G_, 0);
      g.asum = s.asum.data();
    }
  }

  // one activation row (K values) into row m of the gemm's activations, with parameters p (int8 activations)
  template <class T>
  bool put_row(const T* x, int64_t m, const Gemm& g, const U8Params* p) const {
    if (act_ == WEIGHT_ONLY)
      return quant_s16(x, g.K, (int16_t*)g.a16 + m * g.lda, g.lda, (float*)g.ascale + m, bits_ == 4 ? chunk_ : 0,
                       (int32_t*)g.asum + m * G_, gsize_);
    U8Params q = static_;
    if (p) q = *p;
    else if (!u8_params(x, g.K, act_ == INT8_DYNAMIC, &q)) return false;
    ((float*)g.ascale)[m] = q.scale;
    const int32_t z = (int32_t)q.zero;
    if (use_u8()) {
      uint8_t* a = (uint8_t*)g.a8 + m * g.lda;
      ((int32_t*)g.azero)[m] = z;
      for (int64_t k = 0; k < g.K; k++) a[k] = (uint8_t)u8_code(ld(x, k), q);
    } else {
      int16_t* a = (int16_t*)g.a16 + m * g.lda;
      for (int64_t k = 0; k < g.K; k++) a[k] = (int16_t)(u8_code(ld(x, k), q) - z);
    }
    return true;
  }

  template <class T>
  bool prep_rows(const T* x, int64_t M, int64_t ldx, Scratch& s, Gemm& g) const {
    alloc(s, g, M);
    bool ok = true;
    const int64_t grain = 1 + (1 << 15) / (g.K + 1);
    at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
      bool good = true;
      for (int64_t m = m0; m < m1 && good; m++) good = put_row(x + m * ldx, m, g, nullptr);
      if (!good) ok = false;  // benign race: every writer stores false
    });
    return ok;
  }

  void gemm(const Gemm& g, int64_t n0, int64_t n1) const {
    gemm_fn fn = bits_ == 4 ? (sym_ ? t_->s16u4_sym : t_->s16u4_asym) : (use_u8() ? t_->u8s8 : t_->s16s8);
    const int64_t work = g.M * (n1 - n0) * g.K;
    const int64_t NB = 16, MB = 64;
    const int64_t nunits = (n1 - n0 + NB - 1) / NB, munits = (g.M + MB - 1) / MB;
    const int64_t threads = at::get_num_threads();
    if (work < (1 << 18) || threads == 1 || at::in_parallel_region()) {
      fn(g, 0, g.M, n0, n1);
    } else if (nunits >= 2 * threads || munits < 2) {
      at::parallel_for(0, nunits, 1, [&](int64_t b, int64_t e) { fn(g, 0, g.M, n0 + b * NB, std::min(n1, n0 + e * NB)); });
    } else {
      at::parallel_for(0, munits, 1, [&](int64_t b, int64_t e) { fn(g, b * MB, std::min(g.M, e * MB), n0, n1); });
    }
  }

  template <class T>
  bool conv_t(const T* x, int64_t B, int64_t C, int64_t H, int64_t W, int64_t out, bool out_bf16,
              const std::vector<int64_t>& geo) const {
    const int64_t kh = geo[0], kw = geo[1], sh = geo[2], sw = geo[3], ph = geo[4], pw = geo[5], dh = geo[6],
                  dw = geo[7], groups = geo[8], Ho = geo[9], Wo = geo[10];
    const int64_t Cg = C / groups, Og = N_ / groups, L = Ho * Wo, Kc = Cg * kh * kw, CHW = C * H * W;
    if (Kc != K_) throw std::runtime_error("conv geometry does not match the weight");
    bool ok = true;
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<int16_t> q16;
      std::vector<uint8_t> q8;
      std::vector<float> row(Kc);
      for (int64_t b = b0; b < b1 && ok; b++) {
        const T* xs = x + b * CHW;
        // per-sample parameters (int8 activations), shared by every output pixel of the sample
        U8Params p = static_;
        if (act_ != WEIGHT_ONLY && !u8_params(xs, CHW, act_ == INT8_DYNAMIC, &p)) {
          ok = false;
          break;
        }
        float amax = 0.f;  // weight-only: one 14-bit scale per sample
        if (act_ == WEIGHT_ONLY) {
          bool bad = false;
          for (int64_t i = 0; i < CHW; i++) {
            const float v = std::fabs(ld(xs, i));
            bad |= !(v <= FLT_MAX);
            amax = v > amax ? v : amax;
          }
          if (bad) {
            ok = false;
            break;
          }
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
          for (int64_t l = 0; l < L; l++) {  // im2col of one output pixel; padding is a true zero
            const int64_t oy = l / Wo, ox = l % Wo;
            int64_t k = 0;
            for (int64_t c = gi * Cg; c < (gi + 1) * Cg; c++)
              for (int64_t ky = 0; ky < kh; ky++) {
                const int64_t iy = oy * sh - ph + ky * dh;
                for (int64_t kx = 0; kx < kw; kx++, k++) {
                  const int64_t ix = ox * sw - pw + kx * dw;
                  row[k] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? ld(xs, (c * H + iy) * W + ix) : 0.f;
                }
              }
            if (act_ == WEIGHT_ONLY) {
              int16_t* a = s.a16.data() + l * g.lda;
              const float inv = amax > 0.f ? 8128.f / amax : 0.f;
              s.ascale[l] = amax > 0.f ? amax / 8128.f : 1.f;
              if (bits_ == 4) {
                int32_t* as = s.asum.data() + l * G_;
                for (int64_t kk = 0; kk < Kc; kk++) {
                  const int16_t q = (int16_t)std::lrint(row[kk] * inv);
                  a[u4_pos(kk, chunk_)] = q;
                  as[kk / gsize_] += q;
                }
              } else {
                for (int64_t kk = 0; kk < Kc; kk++) a[kk] = (int16_t)std::lrint(row[kk] * inv);
              }
            } else {
              put_row(row.data(), l, g, &p);  // a padded 0.0 quantizes to the zero point exactly
            }
          }
          gemm(g, 0, Og);
        }
      }
    });
    return ok;
  }

  int64_t N_, K_, bits_, gsize_, G_ = 1, ldw_ = 0;
  bool sym_;
  int act_, chunk_ = 0;
  U8Params static_;
  const IsaTable* t_;
  const uint8_t* w_;
  const float *wscale_, *gscale_, *bias_;
  const uint8_t* gzero_;
  const int32_t* colsum_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "modelpress native CPU kernels (int8 / int4 weights, int8 activations)";
  m.def("available", &available, "instruction sets this build can run on this CPU, best first");
  m.def("cpu_supports", &cpu_supports);
  py::class_<Layer>(m, "Layer")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool,
                    int64_t, double, double, const std::string&>())
      .def_property_readonly("isa", &Layer::isa)
      .def("linear", &Layer::linear, py::call_guard<py::gil_scoped_release>())
      .def("conv", &Layer::conv, py::call_guard<py::gil_scoped_release>());
}
