// Embedding lookups in memory mode: the rows asked for, decoded from an integer table's stored codes to fp32 in
// column order, exactly as modelpress.formats.qtensor.dequantize_tensor decodes them (the same fp32 products),
// without the Python-level gather / unpack / scale steps of dequantize_rows.
#include <ATen/Parallel.h>

#include <cstring>

#include "common.h"

namespace mpk {

// Codes `bits` wide (8, 4, 2 or 1: whole codes per byte, code j of a byte in bits [bits*j, bits*(j+1))), row r's
// codes from code r * row_codes of the packed stream (rows need not start on a byte); per group of g codes one
// scale (fp32, or bf16 when scale_bf16) at scale[r * groups + i] and, for asymmetric tables (zero != null), one
// uint8 zero point; symmetric codes are two's complement. False, with nothing written, if an id lies outside
// [0, rows).
bool decode_rows(const uint8_t* codes, const void* scale, bool scale_bf16, const uint8_t* zero, int64_t rows,
                 int64_t row_codes, int64_t groups, int64_t g, int64_t cols, int64_t bits, const int64_t* idx,
                 int64_t n, float* out) {
  for (int64_t i = 0; i < n; i++)
    if (idx[i] < 0 || idx[i] >= rows) return false;
  const uint32_t mask = (1u << bits) - 1, sign = 1u << (bits - 1);
  const int shift = bits == 8 ? 0 : bits == 4 ? 1 : bits == 2 ? 2 : 3;  // log2(codes per byte)
  const int64_t per_mask = (1 << shift) - 1;
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      const int64_t r = idx[i], base = r * row_codes;
      float* o = out + i * cols;
      for (int64_t gi = 0; gi < groups; gi++) {
        const int64_t at = r * groups + gi, c0 = gi * g, c1 = std::min(cols, c0 + g);
        float s;
        if (scale_bf16) {
          const uint32_t u = (uint32_t)((const uint16_t*)scale)[at] << 16;
          std::memcpy(&s, &u, 4);
        } else {
          s = ((const float*)scale)[at];
        }
        if (bits == 8) {
          const uint8_t* w = codes + base;
          if (zero) {
            const int32_t z = zero[at];
            for (int64_t c = c0; c < c1; c++) o[c] = (float)((int32_t)w[c] - z) * s;
          } else {
            for (int64_t c = c0; c < c1; c++) o[c] = (float)(int8_t)w[c] * s;
          }
          continue;
        }
        const int32_t z = zero ? (int32_t)zero[at] : (int32_t)sign;
        const uint32_t flip = zero ? 0u : sign;  // two's complement: (u ^ sign) - sign
        for (int64_t c = c0; c < c1; c++) {
          const int64_t k = base + c;
          const uint32_t u = (codes[k >> shift] >> (bits * (k & per_mask))) & mask;
          o[c] = (float)((int32_t)(u ^ flip) - z) * s;
        }
      }
    }
  });
  return true;
}

}  // namespace mpk
