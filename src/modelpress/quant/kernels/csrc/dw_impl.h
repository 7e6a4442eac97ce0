// Depthwise convolution (common.h: DwConv) for the x86 instruction-set files, included by isa_x86.inc after the
// vector traits. A plane of the zoo's depthwise layers (8 x 8 or 4 x 4 values) is one to four vectors, so the work
// of a (plane, chunk) pair is a handful of masked loads and multiply-adds: a block of NP planes x CH chunks keeps
// NP * CH = 4 independent sums in flight (one alone would wait on each multiply-add's latency), reads each tap's
// masks once for its NP planes and broadcasts each weight once for its CH chunks. T: the number of taps when known
// at compile time (3 x 3, 5 x 5: the tap loop unrolled), else 0.

// planes p .. p + NP, chunks jb .. jb + CH of each
template <class V, int T, int NP, int CH>
static inline void dw_block(const DwConv& d, int64_t p, int64_t jb) {
  const int64_t taps = T ? T : d.taps;
  typename V::F acc[NP][CH];
  const float* xs[NP];
  const float* ws[NP];
  for (int a = 0; a < NP; a++) {
    const int64_t c = (p + a) % d.C;
    xs[a] = d.x + (p + a) * d.P + jb * V::LF;
    ws[a] = d.w + c * taps;
    for (int b = 0; b < CH; b++) acc[a][b] = d.bias ? V::set1_ps(d.bias[c]) : V::zero_ps();
  }
  const uint16_t* mb = d.mbits + jb * taps;
  const int32_t* mv = d.mvec + jb * taps * V::LF;
#pragma GCC unroll 25
  for (int64_t t = 0; t < taps; t++) {
    const int64_t o = d.off[t];
    typename V::F w[NP];
    for (int a = 0; a < NP; a++) w[a] = V::set1_ps(ws[a][t]);
    for (int b = 0; b < CH; b++)
      for (int a = 0; a < NP; a++)
        acc[a][b] = V::fma(V::loadf_m(xs[a] + b * V::LF + o, mb + b * taps + t, mv + (b * taps + t) * V::LF), w[a],
                           acc[a][b]);
  }
  for (int a = 0; a < NP; a++)
    for (int b = 0; b < CH; b++) {
      float* y = d.out + (xs[a] - d.x) + b * V::LF;
      const int64_t n = d.P - (jb + b) * V::LF;  // the plane's last chunk: its lanes past P belong to the next plane
      if (n >= V::LF) V::storef(y, acc[a][b]);
      else V::storef_n(y, acc[a][b], n);
    }
}

template <class V, int T>
static void dw_planes(const DwConv& d, int64_t p0, int64_t p1) {
  int64_t p = p0;
  if (d.chunks == 1) {
    for (; p + 4 <= p1; p += 4) dw_block<V, T, 4, 1>(d, p, 0);
  } else if (d.chunks == 2) {
    for (; p + 2 <= p1; p += 2) dw_block<V, T, 2, 2>(d, p, 0);
  }
  for (; p < p1; p++) {
    int64_t j = 0;
    for (; j + 4 <= d.chunks; j += 4) dw_block<V, T, 1, 4>(d, p, j);
    for (; j < d.chunks; j++) dw_block<V, T, 1, 1>(d, p, j);
  }
}

template <class V>
static void k_dw(const DwConv& d, int64_t p0, int64_t p1) {
  if (d.taps == 9) dw_planes<V, 9>(d, p0, p1);
  else if (d.taps == 25) dw_planes<V, 25>(d, p0, p1);
  else dw_planes<V, 0>(d, p0, p1);
}
