// Embedding lookups in memory mode: the rows asked for, decoded from an integer table's stored codes to fp32 in
// column order, exactly as modelpress.formats.qtensor.dequantize_tensor decodes them (the same fp32 products),
// without the Python-level gather / unpack / scale steps of dequantize_rows.
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "common.h"

namespace mpk {

// Codes `bits` wide (8, 4, 2 or 1: whole codes per byte, code j of a byte in bits [bits*j, bits*(j+1))), row r's
// codes from code r * row_codes of the packed stream (rows need not start on a byte); per group of g codes one
// scale (fp32, or bf16 when scale_bf16) at scale[r * groups + i] and, for asymmetric tables (zero != null), one
// uint8 zero point; symmetric codes are two's complement. False, with nothing written, if an id lies outside
// [0, rows).
namespace {

struct Table {
  const uint8_t* codes;
  const void* scale;
  bool scale_bf16;
  const uint8_t* zero;
  int64_t rows, row_codes, groups, g, cols, bits;

  // row r into o[0 .. cols)
  inline void row(int64_t r, float* o) const {
    const uint32_t mask = (1u << bits) - 1, sign = 1u << (bits - 1);
    const int shift = bits == 8 ? 0 : bits == 4 ? 1 : bits == 2 ? 2 : 3;  // log2(codes per byte)
    const int64_t per_mask = (1 << shift) - 1, base = r * row_codes;
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
        if (bits == 4 && !(base & 1) && !(c0 & 1)) {  // whole bytes: low nibble first
          const uint8_t* w = codes + ((base + c0) >> 1);
          int64_t c = c0;
          for (; c + 1 < c1; c += 2, w++) {
            o[c] = (float)((int32_t)((*w & 15u) ^ flip) - z) * s;
            o[c + 1] = (float)((int32_t)((*w >> 4) ^ flip) - z) * s;
          }
          if (c < c1) o[c] = (float)((int32_t)((*w & 15u) ^ flip) - z) * s;
          continue;
        }
        for (int64_t c = c0; c < c1; c++) {
          const int64_t k = base + c;
          const uint32_t u = (codes[k >> shift] >> (bits * (k & per_mask))) & mask;
          o[c] = (float)((int32_t)(u ^ flip) - z) * s;
        }
      }
  }
};

bool ids_ok(const int64_t* idx, int64_t n, int64_t rows) {
  bool ok = true;
  for (int64_t i = 0; i < n; i++) ok &= idx[i] >= 0 && idx[i] < rows;
  return ok;
}

MPK_CLONES void decode_range(const Table& t, const int64_t* idx, int64_t i0, int64_t i1, float* out) {
  for (int64_t i = i0; i < i1; i++) t.row(idx[i], out + i * t.cols);
}

MPK_CLONES void bag_range(const Table& t, const int64_t* idx, const int64_t* offsets, int64_t b0, int64_t b1, bool mean,
                          float* out, float* row) {
  const int64_t cols = t.cols;
  for (int64_t b = b0; b < b1; b++) {
    float* o = out + b * cols;
    const int64_t i0 = offsets[b], i1 = offsets[b + 1];
    if (i1 == i0) {
      for (int64_t c = 0; c < cols; c++) o[c] = 0.f;
      continue;
    }
    t.row(idx[i0], o);  // 0 + first row is the first row: decoded values are never -0
    for (int64_t i = i0 + 1; i < i1; i++) {
      t.row(idx[i], row);
      for (int64_t c = 0; c < cols; c++) o[c] += row[c];
    }
    if (mean) {
      const float k = (float)(i1 - i0);
      for (int64_t c = 0; c < cols; c++) o[c] /= k;
    }
  }
}

}  // namespace

bool decode_rows(const uint8_t* codes, const void* scale, bool scale_bf16, const uint8_t* zero, int64_t rows,
                 int64_t row_codes, int64_t groups, int64_t g, int64_t cols, int64_t bits, const int64_t* idx,
                 int64_t n, float* out) {
  if (!ids_ok(idx, n, rows)) return false;
  const Table t{codes, scale, scale_bf16, zero, rows, row_codes, groups, g, cols, bits};
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)),
                   [&](int64_t b, int64_t e) { decode_range(t, idx, b, e, out); });
  return true;
}

// Bags of rows, summed (mean: then divided by the bag's size; an empty bag gives zeros): bag b holds ids
// idx[offsets[b] .. offsets[b + 1]) (offsets has nbags + 1 entries). The sums run in id order in fp32, as
// F.embedding_bag's do over the decoded rows. False, with nothing written, for an id outside the table or offsets
// that do not start at 0 or run out of order.
bool bag_rows(const uint8_t* codes, const void* scale, bool scale_bf16, const uint8_t* zero, int64_t rows,
              int64_t row_codes, int64_t groups, int64_t g, int64_t cols, int64_t bits, const int64_t* idx, int64_t n,
              const int64_t* offsets, int64_t nbags, bool mean, float* out) {
  if (!ids_ok(idx, n, rows)) return false;
  bool ok = offsets[0] == 0 && offsets[nbags] <= n;
  for (int64_t b = 0; b < nbags; b++) ok &= offsets[b] <= offsets[b + 1];
  if (!ok) return false;
  const Table t{codes, scale, scale_bf16, zero, rows, row_codes, groups, g, cols, bits};
  at::parallel_for(0, nbags, std::max<int64_t>(1, 4096 / std::max<int64_t>(cols, 1)), [&](int64_t b0, int64_t b1) {
    std::vector<float> row(cols);
    bag_range(t, idx, offsets, b0, b1, mean, out, row.data());
  });
  return true;
}

}  // namespace mpk
