// The three integer matrix products, written once over a vector "traits" type V (AVX-512 or AVX2, with or
// without VNNI) and included by each instruction-set file inside an anonymous namespace, after V is
// defined. Every product is "dot style": weight rows are read as stored (row-major codes), a register
// tile of MR activation rows x NR weight rows accumulates int32 lanes, and the lanes are summed at the end.
//
// Exactness: int32 lanes never overflow (see s16_kmax and the bounds below); lane sums are converted to
// float once per block (8-bit weights) or per group (4-bit weights, where the group scale applies).
//
// V provides: I (integer vector), F (float vector), KS16 (int16 per vector), KS8 (int8 per vector),
// KU4 (4-bit weights per step), load_s16, load_s8_s16, load8, load_u4<SYM>, dp16, dp8, lane0,
// cvt, fma, add_ps, set1_ps, zero_i, zero_ps, hsum, hsum_i.

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- int8 weights x int16 activations ---------------------------------------------------------------
template <class V, int MR, int NR>
static void tile_s16s8(const Gemm& g, int64_t m0, int64_t n0, int64_t nn) {
  typedef typename V::I I;
  const int16_t* ar[MR];
  const int8_t* wr[NR];
  for (int i = 0; i < MR; i++) ar[i] = g.a16 + (m0 + i) * g.lda;
  for (int j = 0; j < NR; j++) wr[j] = (const int8_t*)(g.w + (n0 + (j < nn ? j : nn - 1)) * g.ldw);
  float tot[MR][NR];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NR; j++) tot[i][j] = 0.f;
  const int64_t KB = V::S16_KMAX;
  for (int64_t kb = 0; kb < g.K; kb += KB) {
    const int64_t ke = imin(g.K, kb + KB);
    I acc[MR][NR];
    for (int i = 0; i < MR; i++)
      for (int j = 0; j < NR; j++) acc[i][j] = V::zero_i();
    int64_t k = kb;
    for (; k + V::KS16 <= ke; k += V::KS16) {
      I b[NR];
      for (int j = 0; j < NR; j++) b[j] = V::load_s8_s16(wr[j] + k);
      for (int i = 0; i < MR; i++) {
        I a = V::load_s16(ar[i] + k);
        for (int j = 0; j < NR; j++) acc[i][j] = V::dp16(acc[i][j], a, b[j]);
      }
    }
    if (k < ke) {  // the last few weights of each row: copied so that no read passes the row's end
      alignas(64) int8_t t[NR][V::KS16];
      I b[NR];
      for (int j = 0; j < NR; j++) {
        for (int q = 0; q < V::KS16; q++) t[j][q] = k + q < ke ? wr[j][k + q] : 0;
        b[j] = V::load_s8_s16(t[j]);
      }
      for (int i = 0; i < MR; i++) {  // activations are zero-padded to lda, a multiple of 64
        I a = V::load_s16(ar[i] + k);
        for (int j = 0; j < NR; j++) acc[i][j] = V::dp16(acc[i][j], a, b[j]);
      }
    }
    for (int i = 0; i < MR; i++)
      for (int j = 0; j < NR; j++) tot[i][j] += V::hsum(V::cvt(acc[i][j]));
  }
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < nn; j++) {
      const int64_t m = m0 + i, n = n0 + j;
      store_out(g, m, n, tot[i][j] * g.ascale[m] * g.wscale[n] + (g.bias ? g.bias[n] : 0.f));
    }
}

// ---- int8 weights x uint8 activations (VNNI): exact int32, minus zero point x column sums ------------
template <class V, int MR, int NR>
static void tile_u8s8(const Gemm& g, int64_t m0, int64_t n0, int64_t nn) {
  typedef typename V::I I;
  const uint8_t* ar[MR];
  const uint8_t* wr[NR];
  for (int i = 0; i < MR; i++) ar[i] = g.a8 + (m0 + i) * g.lda;
  for (int j = 0; j < NR; j++) wr[j] = g.w + (n0 + (j < nn ? j : nn - 1)) * g.ldw;
  I acc[MR][NR];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NR; j++) acc[i][j] = V::zero_i();
  int64_t k = 0;
  for (; k + V::KS8 <= g.K; k += V::KS8) {
    I b[NR];
    for (int j = 0; j < NR; j++) b[j] = V::load8(wr[j] + k);
    for (int i = 0; i < MR; i++) {
      I a = V::load8(ar[i] + k);
      for (int j = 0; j < NR; j++) acc[i][j] = V::dp8(acc[i][j], a, b[j]);
    }
  }
  if (k < g.K) {
    alignas(64) uint8_t t[NR][V::KS8];
    I b[NR];
    for (int j = 0; j < NR; j++) {
      for (int q = 0; q < V::KS8; q++) t[j][q] = k + q < g.K ? wr[j][k + q] : 0;
      b[j] = V::load8(t[j]);
    }
    for (int i = 0; i < MR; i++) {
      I a = V::load8(ar[i] + k);
      for (int j = 0; j < NR; j++) acc[i][j] = V::dp8(acc[i][j], a, b[j]);
    }
  }
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < nn; j++) {
      const int64_t m = m0 + i, n = n0 + j;
      const int64_t s = (int64_t)V::hsum_i(acc[i][j]) - (int64_t)g.azero[m] * g.colsum[n];
      store_out(g, m, n, (float)s * g.ascale[m] * g.wscale[n] + (g.bias ? g.bias[n] : 0.f));
    }
}

// ---- 4-bit weights (groups) x int16 activations in the u4 chunk layout ---------------------------------
// Symmetric codes c (two's complement nibbles) are read as c + 8 (xor 8); asymmetric codes u as stored.
// sum_k a_k (c_k) = sum_k a_k (c_k + 8) - 8 sum_k a_k, and sum_k a_k (u_k - z) = sum_k a_k u_k - z sum_k a_k:
// the correction starts in lane 0 of each group's accumulator.
template <class V, bool SYM, int MR, int NR>
static void tile_s16u4(const Gemm& g, int64_t m0, int64_t n0, int64_t nn) {
  typedef typename V::I I;
  typedef typename V::F F;
  const int16_t* ar[MR];
  const uint8_t* wr[NR];
  int64_t nr[NR];
  for (int i = 0; i < MR; i++) ar[i] = g.a16 + (m0 + i) * g.lda;
  for (int j = 0; j < NR; j++) {
    nr[j] = n0 + (j < nn ? j : nn - 1);
    wr[j] = g.w + nr[j] * g.ldw;
  }
  F accf[MR][NR];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NR; j++) accf[i][j] = V::zero_ps();
  for (int64_t gi = 0; gi < g.G; gi++) {
    I acc[MR][NR];
    for (int i = 0; i < MR; i++) {
      const int32_t s = g.asum[(m0 + i) * g.G + gi];
      for (int j = 0; j < NR; j++) acc[i][j] = V::lane0(-(SYM ? 8 : (int32_t)g.gzero[nr[j] * g.G + gi]) * s);
    }
    const int64_t k1 = (gi + 1) * g.gsize;
    for (int64_t k = gi * g.gsize; k < k1; k += V::KU4) {
      for (int j = 0; j < NR; j++) {
        I lo, hi;
        V::template load_u4<SYM>(wr[j] + (k >> 1), lo, hi);
        for (int i = 0; i < MR; i++)
          acc[i][j] = V::dp16(V::dp16(acc[i][j], V::load_s16(ar[i] + k), lo), V::load_s16(ar[i] + k + V::KU4 / 2), hi);
      }
    }
    for (int j = 0; j < NR; j++) {
      const F sc = V::set1_ps(g.gscale[nr[j] * g.G + gi]);
      for (int i = 0; i < MR; i++) accf[i][j] = V::fma(V::cvt(acc[i][j]), sc, accf[i][j]);
    }
  }
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < nn; j++) {
      const int64_t m = m0 + i, n = n0 + j;
      store_out(g, m, n, V::hsum(accf[i][j]) * g.ascale[m] + (g.bias ? g.bias[n] : 0.f));
    }
}

// ---- drivers: blocks of 64 activation rows (kept in L2) x tiles of NR weight rows (kept in L1) ----------
template <int MR, int NR, void (*T1)(const Gemm&, int64_t, int64_t, int64_t),
          void (*T2)(const Gemm&, int64_t, int64_t, int64_t), void (*T3)(const Gemm&, int64_t, int64_t, int64_t),
          void (*T4)(const Gemm&, int64_t, int64_t, int64_t)>
static void drive(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t MB = 64;
  for (int64_t mb = m0; mb < m1; mb += MB) {
    const int64_t me = imin(m1, mb + MB);
    for (int64_t n = n0; n < n1; n += NR) {
      const int64_t nn = imin(NR, n1 - n);
      int64_t m = mb;
      for (; m + MR <= me; m += MR) T4(g, m, n, nn);  // T4 is the full MR-row tile
      switch (me - m) {
        case 1: T1(g, m, n, nn); break;
        case 2: T2(g, m, n, nn); break;
        case 3: T3(g, m, n, nn); break;
        default: break;
      }
    }
  }
}

// Entry points: V::MR8 x V::NR8 tiles for 8-bit weights, V::MR4 x V::NR4 for 4-bit weights (MR <= 4).
template <class V>
static void k_s16s8(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int MR = V::MR8, NR = V::NR8;
  drive<MR, NR, tile_s16s8<V, 1, NR>, tile_s16s8<V, 2, NR>, tile_s16s8<V, (MR > 3 ? 3 : 1), NR>,
        tile_s16s8<V, MR, NR>>(g, m0, m1, n0, n1);
}

template <class V>
static void k_u8s8(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int MR = V::MR8, NR = V::NR8;
  drive<MR, NR, tile_u8s8<V, 1, NR>, tile_u8s8<V, 2, NR>, tile_u8s8<V, (MR > 3 ? 3 : 1), NR>,
        tile_u8s8<V, MR, NR>>(g, m0, m1, n0, n1);
}

template <class V>
static gemm_fn u8s8_fn() {  // only with VNNI: without it there is no exact u8 x s8 product
  if constexpr (V::VNNI) return k_u8s8<V>;
  else return nullptr;
}

template <class V, bool SYM>
static void k_s16u4(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int MR = V::MR4, NR = V::NR4;
  drive<MR, NR, tile_s16u4<V, SYM, 1, NR>, tile_s16u4<V, SYM, (MR > 1 ? 2 : 1), NR>,
        tile_s16u4<V, SYM, (MR > 3 ? 3 : 1), NR>, tile_s16u4<V, SYM, MR, NR>>(g, m0, m1, n0, n1);
}
