// Memory layout changes for the channels-last convolution path (paths.py "dense-cl"): torch's own strided copy
// moves NCHW <-> NHWC at about a quarter of a plain copy's speed; this transposes each sample in 8 x 8 blocks held
// in registers (AVX2), or in cache-sized tiles of scalar copies (other CPUs, or `avx2` false: the build chosen for
// the process is not an x86 one, kernels/cpu.py).
#include <ATen/Parallel.h>

#include <algorithm>

#include "common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MPK_LAYOUT_AVX2 1
#endif

namespace mpk {
namespace {

// y[c, r] = x[r, c] for r in [r0, r1), c in [c0, c1): x rows of length ldx, y rows of length ldy
void transpose_scalar(const float* __restrict x, int64_t ldx, float* __restrict y, int64_t ldy, int64_t r0,
                      int64_t r1, int64_t c0, int64_t c1) {
  constexpr int64_t tile = 16;
  for (int64_t rt = r0; rt < r1; rt += tile)
    for (int64_t ct = c0; ct < c1; ct += tile)
      for (int64_t c = ct; c < std::min(c1, ct + tile); c++)
        for (int64_t r = rt; r < std::min(r1, rt + tile); r++) y[c * ldy + r] = x[r * ldx + c];
}

#ifdef MPK_LAYOUT_AVX2
// one 8 x 8 block: rows x[i * ldx .. + 8) -> columns of y
__attribute__((target("avx2"))) inline void block8(const float* x, int64_t ldx, float* y, int64_t ldy) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(x + i * ldx);
  for (int i = 0; i < 8; i += 2) {  // interleave pairs of rows
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // then pairs of pairs: each 128-bit lane holds 4 values of one column
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; i++) {  // lanes of rows 0-3 next to those of rows 4-7
    _mm256_storeu_ps(y + i * ldy, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(y + (i + 4) * ldy, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

__attribute__((target("avx2"))) void transpose_avx2(const float* x, float* y, int64_t R, int64_t C) {
  const int64_t R8 = R / 8 * 8, C8 = C / 8 * 8;
  for (int64_t r = 0; r < R8; r += 8)
    for (int64_t c = 0; c < C8; c += 8) block8(x + r * C + c, C, y + c * R + r, R);
  transpose_scalar(x, C, y, R, 0, R8, C8, C);  // the right edge
  transpose_scalar(x, C, y, R, R8, R, 0, C);   // the bottom rows
}
#endif

}  // namespace

void transpose_batched(const float* x, float* y, int64_t B, int64_t R, int64_t C, bool avx2) {
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(R * C, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
      const float* xb = x + b * R * C;
      float* yb = y + b * R * C;
#ifdef MPK_LAYOUT_AVX2
      static const bool cpu = __builtin_cpu_supports("avx2");
      if (avx2 && cpu) {
        transpose_avx2(xb, yb, R, C);
        continue;
      }
#endif
      transpose_scalar(xb, C, yb, R, 0, R, 0, C);
    }
  });
}

}  // namespace mpk
