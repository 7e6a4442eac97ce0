// Depthwise convolution, with a channel multiplier (common.h: DwConv), for the x86 instruction-set files: included by
// isa_x86.inc after the vector traits. A plane of the zoo's depthwise layers (8 x 8 or 4 x 4 values) is one to four
// vectors, so the work of a (plane, chunk) pair is a handful of masked loads and multiply-adds: a block of NP planes x
// CH chunks keeps NP * CH = 4 independent sums in flight (one alone would wait on each multiply-add's latency), reads
// each tap's masks once for its NP planes and broadcasts each weight once for its CH chunks. T: the number of taps
// when known at compile time (3 x 3, 5 x 5: the tap loop unrolled), else 0.

// output planes p .. p + NP, chunks jb .. jb + CH of each (a plane's last chunk: its lanes past P belong to the next
// plane, masked store)
template <class V, int NP, int CH>
static inline void dw_store(const DwConv& d, int64_t p, int64_t jb, const typename V::F (&acc)[NP][CH]) {
  for (int a = 0; a < NP; a++)
    for (int b = 0; b < CH; b++) {
      float* y = d.out + (p + a) * d.P + (jb + b) * V::LF;
      const int64_t n = d.P - (jb + b) * V::LF;
      if (n >= V::LF) V::storef(y, acc[a][b]);
      else V::storef_n(y, acc[a][b], n);
    }
}

// planes p .. p + NP, chunks jb .. jb + CH of each
template <class V, int T, int NP, int CH>
static inline void dw_block(const DwConv& d, int64_t p, int64_t jb) {
  const int64_t taps = T ? T : d.taps;
  typename V::F acc[NP][CH];
  const float* xs[NP];
  const float* ws[NP];
  for (int a = 0; a < NP; a++) {
    const int64_t c = d.oc(p + a);
    xs[a] = d.in(p + a) + jb * V::LF;
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
  dw_store<V, NP, CH>(d, p, jb, acc);
}

// Planes of up to 4 chunks with every tap within one chunk of its output (|off| <= LF), T taps known (odd kernels:
// taps before the centre read earlier lanes, after it later ones): each plane is loaded once, chunk by chunk, and
// each tap's values come from the registers by a masked permute of two neighbouring chunks (the chunk before and
// this one for taps before the centre, this one and the next after it; zeros beyond the plane). The masked loads
// above read each value 9 times at unaligned addresses, most of them split across two cache lines: 1.5-2x slower
// on 4 x 4 and 8 x 8 planes. Lane l of tap t reads lane idx = l + off[t] (+ LF before the centre) of the pair.

// tap t of chunk j from a plane's chunks v[1 .. CH] (v[0], v[CH + 1]: zeros), its lanes outside the plane 0
template <class V, int T, int CH>
static inline typename V::F dw_tap(const typename V::F (&v)[CH + 2], int t, int j, uint16_t bits, typename V::I idx) {
  if constexpr (CH == 1) return V::perm_m(bits, idx, v[1]);
  else return t < T / 2 ? V::perm2_m(bits, v[j], idx, v[j + 1]) : V::perm2_m(bits, v[j + 1], idx, v[j + 2]);
}

template <class V, int T, int NP, int CH>
static inline void dw_perm_block(const DwConv& d, int64_t p, const typename V::I* idx) {
  typedef typename V::F F;
  F v[NP][CH + 2], acc[NP][CH];
  const float* ws[NP];
  for (int a = 0; a < NP; a++) {
    const int64_t c = d.oc(p + a);
    const float* xs = d.in(p + a);
    ws[a] = d.w + c * T;
    v[a][0] = v[a][CH + 1] = V::zero_ps();
    for (int j = 0; j < CH; j++) {
      const int64_t n = d.P - j * V::LF;
      v[a][j + 1] = n >= V::LF ? V::loadf(xs + j * V::LF) : V::loadf_n(xs + j * V::LF, n);
      acc[a][j] = d.bias ? V::set1_ps(d.bias[c]) : V::zero_ps();
    }
  }
#pragma GCC unroll 25
  for (int t = 0; t < T; t++) {
    F w[NP];
    for (int a = 0; a < NP; a++) w[a] = V::set1_ps(ws[a][t]);
    for (int j = 0; j < CH; j++) {
      const uint16_t bits = d.mbits[j * T + t];
      for (int a = 0; a < NP; a++) acc[a][j] = V::fma(dw_tap<V, T, CH>(v[a], t, j, bits, idx[t]), w[a], acc[a][j]);
    }
  }
  dw_store<V, NP, CH>(d, p, 0, acc);
}

// The same for NP output planes that read one input plane (a channel multiplier of at least NP: a stem over one
// input channel): it is loaded, and each tap permuted, once for all of them.
template <class V, int T, int NP, int CH>
static inline void dw_perm_shared(const DwConv& d, int64_t p, const typename V::I* idx) {
  typedef typename V::F F;
  F v[CH + 2], acc[NP][CH];
  const float* ws[NP];
  const float* xs = d.in(p);
  v[0] = v[CH + 1] = V::zero_ps();
  for (int j = 0; j < CH; j++) {
    const int64_t n = d.P - j * V::LF;
    v[j + 1] = n >= V::LF ? V::loadf(xs + j * V::LF) : V::loadf_n(xs + j * V::LF, n);
  }
  for (int a = 0; a < NP; a++) {
    const int64_t c = d.oc(p + a);
    ws[a] = d.w + c * T;
    for (int j = 0; j < CH; j++) acc[a][j] = d.bias ? V::set1_ps(d.bias[c]) : V::zero_ps();
  }
#pragma GCC unroll 25
  for (int t = 0; t < T; t++) {
    for (int j = 0; j < CH; j++) {
      const uint16_t bits = d.mbits[j * T + t];
      const F x = dw_tap<V, T, CH>(v, t, j, bits, idx[t]);
      for (int a = 0; a < NP; a++) acc[a][j] = V::fma(x, V::set1_ps(ws[a][t]), acc[a][j]);
    }
  }
  dw_store<V, NP, CH>(d, p, 0, acc);
}

template <class V, int T, int CH>
static void dw_perm_planes(const DwConv& d, int64_t p0, int64_t p1) {
  constexpr int NP = CH == 1 ? 8 : CH == 2 ? 4 : 2;  // NP x CH = 8 sums in flight
  constexpr int NS = CH == 4 ? 4 : NP;  // (shared input: fewer registers per plane)
  typename V::I idx[T];
  for (int t = 0; t < T; t++) idx[t] = V::iota_plus((int32_t)(d.off[t] + (t < T / 2 ? V::LF : 0)));
  int64_t p = p0;
  if (d.mult >= NS) {  // blocks of NS outputs of one input channel, the rest one by one
    while (p < p1) {
      if (p + NS <= p1 && d.oc(p) / d.mult == d.oc(p + NS - 1) / d.mult) {
        dw_perm_shared<V, T, NS, CH>(d, p, idx);
        p += NS;
      } else {
        dw_perm_block<V, T, 1, CH>(d, p++, idx);
      }
    }
    return;
  }
  for (; p + NP <= p1; p += NP) dw_perm_block<V, T, NP, CH>(d, p, idx);
  for (; p < p1; p++) dw_perm_block<V, T, 1, CH>(d, p, idx);
}

// the register version applies: 512-bit permutes, 9 or 25 taps, up to 4 chunks, every tap within one chunk
template <class V, int T>
static bool dw_perm(const DwConv& d, int64_t p0, int64_t p1) {
  if constexpr (V::PERM) {
    if (d.taps != T || d.chunks > 4 || d.chunks == 3) return false;
    for (int t = 0; t < T; t++)
      if (d.off[t] < -V::LF || d.off[t] > V::LF || (t < T / 2) != (d.off[t] < 0)) return false;
    if (d.chunks == 1) dw_perm_planes<V, T, 1>(d, p0, p1);
    else if (d.chunks == 2) dw_perm_planes<V, T, 2>(d, p0, p1);
    else dw_perm_planes<V, T, 4>(d, p0, p1);
    return true;
  }
  return false;
}

template <class V, int T>
static void dw_planes(const DwConv& d, int64_t p0, int64_t p1) {
  if (T && dw_perm<V, T>(d, p0, p1)) return;
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
