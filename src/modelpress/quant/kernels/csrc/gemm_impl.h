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
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// ---- int8 weights x int16 activations ---------------------------------------------------------------
// `pf`: byte offset from a weight row to the row the next tile will read (0: no prefetch). The first row tile
// of each activation block fetches the next weight tile while it computes: rows are only K (or K / 2) bytes
// long, too short for the hardware prefetcher to ramp up on its own.
template <class V, int MR, int NR>
static void tile_s16s8(const Gemm& g, int64_t m0, int64_t n0, int64_t nn, int64_t pf) {
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
      if (pf)
        for (int j = 0; j < NR; j++) V::prefetch(wr[j] + k + pf);
      for (int j = 0; j < NR; j++) b[j] = V::load_s8_s16(wr[j] + k);
      for (int i = 0; i < MR; i++) {
        I a = V::load_s16(ar[i] + k);
        for (int j = 0; j < NR; j++) acc[i][j] = V::dp16(acc[i][j], a, b[j]);
      }
    }
    if (k < ke) {  // the last few weights of each row: no read passes the row's end
      I b[NR];
      for (int j = 0; j < NR; j++) b[j] = V::load_s8_s16_n(wr[j] + k, ke - k);
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
static void tile_u8s8(const Gemm& g, int64_t m0, int64_t n0, int64_t nn, int64_t pf) {
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
    if (pf)
      for (int j = 0; j < NR; j++) V::prefetch(wr[j] + k + pf);
    for (int j = 0; j < NR; j++) b[j] = V::load8(wr[j] + k);
    for (int i = 0; i < MR; i++) {
      I a = V::load8(ar[i] + k);
      for (int j = 0; j < NR; j++) acc[i][j] = V::dp8(acc[i][j], a, b[j]);
    }
  }
  if (k < g.K) {
    I b[NR];
    for (int j = 0; j < NR; j++) b[j] = V::load8_n(wr[j] + k, g.K - k);
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

// ---- int8 weights x the 14-bit activations as two 8-bit planes (VNNI) ------------------------------------------
// a = 128 (hb - 64) + lo with lo = a & 127 and hb = (a >> 7) + 64, both in [0, 127]: unsigned bytes that multiply the
// signed weight bytes as stored (vpdpbusd), where the int16 product widens every weight first (vpmovsxbw + vpdpwssd:
// twice the instructions per weight). sum_k a_k w_k = S_lo + 128 (S_hb - 64 colsum[n]), colsum[n] = sum_k w[n, k]:
// the same integers as tile_s16s8, summed exactly in int64 (the lanes hold at most K / 16 x 127 x 128).
template <class V, int MR, int NR>
static void tile_p8s8(const Gemm& g, int64_t m0, int64_t n0, int64_t nn, int64_t pf) {
  typedef typename V::I I;
  const int8_t* lo[MR];
  const int8_t* hb[MR];
  const uint8_t* wr[NR];
  for (int i = 0; i < MR; i++) {
    lo[i] = g.alo + (m0 + i) * g.lda;
    hb[i] = g.ahi + (m0 + i) * g.lda;
  }
  for (int j = 0; j < NR; j++) wr[j] = g.w + (n0 + (j < nn ? j : nn - 1)) * g.ldw;
  int64_t s[MR][NR] = {};
  const int64_t KB = 1 << 16;  // (16 lanes of sums below 2^31 each: their int32 total too)
  for (int64_t kb = 0; kb < g.K; kb += KB) {
    const int64_t ke = imin(g.K, kb + KB);
    I acc[MR][NR], ah[MR][NR];
    for (int i = 0; i < MR; i++)
      for (int j = 0; j < NR; j++) acc[i][j] = ah[i][j] = V::zero_i();
    int64_t k = kb;
    for (; k + V::KS8 <= ke; k += V::KS8) {
      I b[NR];
      if (pf)
        for (int j = 0; j < NR; j++) V::prefetch(wr[j] + k + pf);
      for (int j = 0; j < NR; j++) b[j] = V::load8(wr[j] + k);
      for (int i = 0; i < MR; i++) {
        const I l = V::load8(lo[i] + k), h = V::load8(hb[i] + k);
        for (int j = 0; j < NR; j++) {
          acc[i][j] = V::dp8(acc[i][j], l, b[j]);
          ah[i][j] = V::dp8(ah[i][j], h, b[j]);
        }
      }
    }
    if (k < ke) {  // the last weights of each row: no read passes its end (the planes are zero-padded to lda)
      I b[NR];
      for (int j = 0; j < NR; j++) b[j] = V::load8_n(wr[j] + k, ke - k);
      for (int i = 0; i < MR; i++) {
        const I l = V::load8(lo[i] + k), h = V::load8(hb[i] + k);
        for (int j = 0; j < NR; j++) {
          acc[i][j] = V::dp8(acc[i][j], l, b[j]);
          ah[i][j] = V::dp8(ah[i][j], h, b[j]);
        }
      }
    }
    for (int i = 0; i < MR; i++)
      for (int j = 0; j < NR; j++) s[i][j] += (int64_t)V::hsum_i(acc[i][j]) + 128 * (int64_t)V::hsum_i(ah[i][j]);
  }
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < nn; j++) {
      const int64_t m = m0 + i, n = n0 + j;
      const int64_t t = s[i][j] - 128 * 64 * (int64_t)g.colsum[n];
      store_out(g, m, n, (float)t * g.ascale[m] * g.wscale[n] + (g.bias ? g.bias[n] : 0.f));
    }
}

// ---- 4-bit weights (groups) x int16 activations in the u4 chunk layout ---------------------------------
// Symmetric codes c (two's complement nibbles) are read as c + 8 (xor 8); asymmetric codes u as stored.
// sum_k a_k (c_k) = sum_k a_k (c_k + 8) - 8 sum_k a_k, and sum_k a_k (u_k - z) = sum_k a_k u_k - z sum_k a_k:
// the correction starts in lane 0 of each group's accumulator.
// One tile, any 4-bit product: G::add(g, m0, wr, k0, k1, pf, acc) adds the integer sums of group [k0, k1) of weight
// rows wr to acc (started with the zero-point correction); each group's sums are then scaled and added in float.
// SUB > 1 (groups of 16 filling a wide step): SUB groups per step, their corrections and scales lane-wise (lanes4,
// scales4); the rows' group count is a multiple of SUB (isa_x86.inc).
template <class V, bool SYM, int MR, int NR, class GP, int SUB = 1>
static void tile_u4(const Gemm& g, int64_t m0, int64_t n0, int64_t nn, int64_t pf) {
  typedef typename V::I I;
  typedef typename V::F F;
  const uint8_t* wr[NR];
  int64_t nr[NR];
  for (int j = 0; j < NR; j++) {
    nr[j] = n0 + (j < nn ? j : nn - 1);
    wr[j] = g.w + nr[j] * g.ldw;
  }
  F accf[MR][NR];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NR; j++) accf[i][j] = V::zero_ps();
  for (int64_t gi = 0; gi < g.G; gi += SUB) {
    I acc[MR][NR];
    for (int i = 0; i < MR; i++)
      for (int j = 0; j < NR; j++) {
        int32_t c[4] = {0, 0, 0, 0};
        for (int r = 0; r < SUB; r++)
          if (!GP::kLut)
            c[r] = -(SYM ? 8 : (int32_t)g.gzero[nr[j] * g.G + gi + r]) * g.asum[(m0 + i) * g.G + gi + r];
        if constexpr (SUB == 1) acc[i][j] = V::lane0(c[0]);
        else acc[i][j] = V::lanes4(c);
      }
    GP::template add<V, SYM, MR, NR>(g, m0, wr, gi * g.gsize, (gi + SUB) * g.gsize, pf, acc);
    for (int j = 0; j < NR; j++) {
      F sc;
      if constexpr (SUB == 1) sc = V::set1_ps(g.gscale[nr[j] * g.G + gi]);
      else sc = V::scales4(g.gscale + nr[j] * g.G + gi);
      for (int i = 0; i < MR; i++) accf[i][j] = V::fma(V::cvt(acc[i][j]), sc, accf[i][j]);
    }
  }
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < nn; j++) {
      const int64_t m = m0 + i, n = n0 + j;
      store_out(g, m, n, V::hsum(accf[i][j]) * g.ascale[m] + (g.bias ? g.bias[n] : 0.f));
    }
}

// int16 activations (a16) x 4-bit codes widened to int16: the codes themselves (S16U4), or the integer values a table
// gives them (S16L4: g.lut, no zero point; FP4 E2M1 times 2)
template <bool LUT>
struct S16X4 {
  static constexpr bool kLut = LUT, kWiden = true;  // (k_u4 may widen the rows once for many row tiles)
  template <class V, bool SYM, int MR, int NR>
  static inline void add(const Gemm& g, int64_t m0, const uint8_t* const* wr, int64_t k0, int64_t k1, int64_t pf,
                         typename V::I (&acc)[MR][NR]) {
    typedef typename V::I I;
    typename V::T4 tbl{};
    if constexpr (LUT) tbl = V::lut4(g.lut);
    const int16_t* ar[MR];
    for (int i = 0; i < MR; i++) ar[i] = g.a16 + (m0 + i) * g.lda;
    for (int64_t k = k0; k < k1; k += V::KU4) {
      if (pf)
        for (int j = 0; j < NR; j++) V::prefetch(wr[j] + (k >> 1) + pf);
      for (int j = 0; j < NR; j++) {
        I lo, hi;
        if constexpr (LUT) V::load_l4(wr[j] + (k >> 1), tbl, lo, hi);
        else V::template load_u4<SYM>(wr[j] + (k >> 1), lo, hi);
        for (int i = 0; i < MR; i++)
          acc[i][j] = V::dp16(V::dp16(acc[i][j], V::load_s16(ar[i] + k), lo), V::load_s16(ar[i] + k + V::KU4 / 2), hi);
      }
    }
  }
};
typedef S16X4<false> S16U4;
typedef S16X4<true> S16L4;

// The same sums from rows widened beforehand (widen: row j of the tile at g.wide + j * g.lda, each step of KU4
// values stored as the lo then the hi vector S16X4 makes): many activation rows share one widening, and each
// activation vector is loaded once for the NR rows.
struct W16 {
  static constexpr bool kLut = true;  // the widened values are final (code - zero, or the table's): no correction
  template <class V, bool SYM, int MR, int NR>
  static inline void add(const Gemm& g, int64_t m0, const uint8_t* const* wr, int64_t k0, int64_t k1, int64_t pf,
                         typename V::I (&acc)[MR][NR]) {
    typedef typename V::I I;
    const int16_t* ar[MR];
    for (int i = 0; i < MR; i++) ar[i] = g.a16 + (m0 + i) * g.lda;
    for (int64_t k = k0; k < k1; k += V::KU4) {
      I lo[NR], hi[NR];
      for (int j = 0; j < NR; j++) {
        lo[j] = V::load_s16(g.wide + j * g.lda + k);
        hi[j] = V::load_s16(g.wide + j * g.lda + k + V::KU4 / 2);
      }
      for (int i = 0; i < MR; i++) {
        const I a0 = V::load_s16(ar[i] + k), a1 = V::load_s16(ar[i] + k + V::KU4 / 2);
        for (int j = 0; j < NR; j++) acc[i][j] = V::dp16(V::dp16(acc[i][j], a0, lo[j]), a1, hi[j]);
      }
    }
  }
};

// ---- 4-bit weights (groups) x the 14-bit activations as two 8-bit planes ("planes") --------------------
// a = 128 hi + lo with lo = a & 127 in [0, 127] and hi = a >> 7 in [-64, 63] (|a| <= 8128): both are int8, and the
// codes (0..15 as unsigned bytes; symmetric ones read as c + 8, as in S16U4) multiply them in u8 x s8 products,
// four to a lane (vpdpbusd: VNNI only; without it, vpmaddubsw + vpmaddwd measured no faster than S16U4). One
// load of KS8 packed bytes gives KS8 low nibbles (the even k of a chunk of 2 KS8 values) and KS8 high nibbles (the
// odd k): the planes use the chunk layout with chunk 2 KS8. The integer sums are exact: the same as S16U4's.
// Measured against S16U4 (one thread, 4096 x 4096): 1.2x faster at M = 1 with 512-bit registers and g128, but
// slower with 256-bit ones at g64 and at M >= 32: it is a separate path ("native-planes"), chosen by the speed guard.
struct P8U4 {  // the planes (alo, ahi) x 4-bit codes as unsigned bytes, vpdpbusd
  static constexpr bool kLut = false, kWiden = false;
  template <class V, bool SYM, int MR, int NR>
  static inline void add(const Gemm& g, int64_t m0, const uint8_t* const* wr, int64_t k0, int64_t k1, int64_t pf,
                         typename V::I (&acc)[MR][NR]) {
    typedef typename V::I I;
    constexpr int64_t KB = V::KS8, C = 2 * KB;
    const int8_t* lo[MR];
    const int8_t* hi[MR];
    for (int i = 0; i < MR; i++) {
      lo[i] = g.alo + (m0 + i) * g.lda;
      hi[i] = g.ahi + (m0 + i) * g.lda;
    }
    I ah[MR][NR];
    for (int i = 0; i < MR; i++)
      for (int j = 0; j < NR; j++) ah[i][j] = V::zero_i();
    for (int64_t k = k0; k < k1; k += C) {
      if (pf)
        for (int j = 0; j < NR; j++) V::prefetch(wr[j] + (k >> 1) + pf);
      for (int j = 0; j < NR; j++) {
        I wl, wh;
        V::template split_u4<SYM>(V::load8(wr[j] + (k >> 1)), wl, wh);
        for (int i = 0; i < MR; i++) {
          acc[i][j] = V::dp8(V::dp8(acc[i][j], wl, V::load8(lo[i] + k)), wh, V::load8(lo[i] + k + KB));
          ah[i][j] = V::dp8(V::dp8(ah[i][j], wl, V::load8(hi[i] + k)), wh, V::load8(hi[i] + k + KB));
        }
      }
    }
    for (int i = 0; i < MR; i++)
      for (int j = 0; j < NR; j++) acc[i][j] = V::add_i(acc[i][j], V::slli32(ah[i][j], 7));
  }
};

// The planes product for one activation row when a group is one chunk (g128 on 512-bit registers): straight-line code
// per group, the group's four plane vectors loaded once for NR weight rows, the symmetric correction shared by them.
// Same integer sums and float steps as tile_u4 with P8U4; the generic tile kept its loop over one chunk (register
// copies) and spilled at 8 rows. 16 x Linear(4096, 4096), one thread, Intel Xeon, from memory: 0.79-0.81 vs 0.82-0.90
// ms a layer through modelpress, 0.73-0.75 vs 0.84-0.85 in a standalone harness (benchmarks/README, eighteenth session).
template <class V, bool SYM, int NR>
static void tile_p8_row(const Gemm& g, int64_t m, int64_t n0, int64_t nn, int64_t pf) {
  typedef typename V::I I;
  typedef typename V::F F;
  constexpr int64_t KB = V::KS8;
  const uint8_t* wr[NR];
  int64_t nr[NR];
  for (int j = 0; j < NR; j++) {
    nr[j] = n0 + (j < nn ? j : nn - 1);
    wr[j] = g.w + nr[j] * g.ldw;
  }
  const int8_t* lo = g.alo + m * g.lda;
  const int8_t* hi = g.ahi + m * g.lda;
  F accf[NR];
  for (int j = 0; j < NR; j++) accf[j] = V::zero_ps();
  for (int64_t gi = 0; gi < g.G; gi++) {
    const int64_t k = gi * 2 * KB;
    const I le = V::load8(lo + k), lodd = V::load8(lo + k + KB), he = V::load8(hi + k), hodd = V::load8(hi + k + KB);
    const int32_t as = g.asum[m * g.G + gi];
    const I corr = V::lane0(-8 * as);  // (symmetric codes: every row's)
    for (int j = 0; j < NR; j++) {
      if (pf) V::prefetch(wr[j] + (k >> 1) + pf);
      I wl, wh;
      V::template split_u4<SYM>(V::load8(wr[j] + (k >> 1)), wl, wh);
      const I c = SYM ? corr : V::lane0(-(int32_t)g.gzero[nr[j] * g.G + gi] * as);
      const I a = V::dp8(V::dp8(c, wl, le), wh, lodd);
      const I h = V::dp8(V::dp8(V::zero_i(), wl, he), wh, hodd);
      accf[j] = V::fma(V::cvt(V::add_i(a, V::slli32(h, 7))), V::set1_ps(g.gscale[nr[j] * g.G + gi]), accf[j]);
    }
  }
  for (int j = 0; j < nn; j++)
    store_out(g, m, n0 + j, V::hsum(accf[j]) * g.ascale[m] + (g.bias ? g.bias[n0 + j] : 0.f));
}

template <class V, bool SYM, int NR>
static void drive_p8_row(const Gemm& g, int64_t m, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += NR)
    tile_p8_row<V, SYM, NR>(g, m, n, imin(NR, n1 - n), n + NR < n1 ? NR * g.ldw : 0);
}

// ---- drivers: blocks of 64 activation rows (kept in L2) x tiles of NR weight rows (kept in L1) ----------
typedef void (*tile_fn)(const Gemm&, int64_t, int64_t, int64_t, int64_t);
typedef void (*prep_fn)(const Gemm&, int64_t n0, int64_t nn);  // run once per tile of weight rows, before its row tiles

template <int MR, int NR, tile_fn T1, tile_fn T2, tile_fn T3, tile_fn T4, prep_fn PREP = nullptr>
static void drive(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t MB = 64;
  for (int64_t mb = m0; mb < m1; mb += MB) {
    const int64_t me = imin(m1, mb + MB);
    for (int64_t n = n0; n < n1; n += NR) {
      const int64_t nn = imin(NR, n1 - n);
      const int64_t pf = n + NR < n1 ? NR * g.ldw : 0;  // the next tile's rows, while this one runs
      if constexpr (PREP != nullptr) PREP(g, n, nn);
      int64_t m = mb;
      for (; m + MR <= me; m += MR) T4(g, m, n, nn, m == mb ? pf : 0);  // T4 is the full MR-row tile
      switch (me - m) {
        case 1: T1(g, m, n, nn, m == mb ? pf : 0); break;
        case 2: T2(g, m, n, nn, m == mb ? pf : 0); break;
        case 3: T3(g, m, n, nn, m == mb ? pf : 0); break;
        default: break;
      }
    }
  }
}

// ---- convolution, broadcast style (ConvGemm in common.h) -----------------------------------------------
// pixels l .. l + L32 of output channel o (those below c.L): fp32 as one vector store (at short rows the epilogue
// costs as much as the products), bf16 value by value
template <class V>
static inline void conv_store(const ConvGemm& c, int64_t o, int64_t l, typename V::F y) {
  constexpr int VL = V::L32;
  const int64_t n = imin(VL, c.L - l);
  if (!c.out16) {
    if (n == VL) V::storef(c.out + o * c.L + l, y);
    else V::storef_n(c.out + o * c.L + l, y, n);
    return;
  }
  alignas(64) float t[VL];
  V::storef(t, y);
  for (int64_t j = 0; j < n; j++) c.out16[o * c.L + l + j] = f32_to_bf16(t[j]);
}

template <class V, bool U8, int MO, int NV>
static void ctile(const ConvGemm& c, int64_t o0, int64_t no, int64_t l0, int64_t nl) {
  typedef typename V::I I;
  typedef typename V::F F;
  constexpr int P = U8 ? 4 : 2, VL = V::L32;
  I acc[MO][NV];
  for (int i = 0; i < MO; i++)
    for (int v = 0; v < NV; v++) acc[i][v] = V::zero_i();
  int64_t orow[MO];
  for (int i = 0; i < MO; i++) orow[i] = o0 + (i < no ? i : no - 1);
  for (int64_t q = 0; q < c.Kp / P; q++) {
    I xv[NV];
    for (int v = 0; v < NV; v++)
      xv[v] = U8 ? V::load8(c.x8 + (q * c.Lp + l0 + v * VL) * 4) : V::load_s16(c.x16 + (q * c.Lp + l0 + v * VL) * 2);
    for (int i = 0; i < MO; i++) {
      int32_t wq;
      if (U8) __builtin_memcpy(&wq, c.w8 + orow[i] * c.Kp + q * 4, 4);
      else __builtin_memcpy(&wq, c.w16 + orow[i] * c.Kp + q * 2, 4);
      const I wb = V::set1_i(wq);
      for (int v = 0; v < NV; v++) acc[i][v] = U8 ? V::dp8(acc[i][v], xv[v], wb) : V::dp16(acc[i][v], xv[v], wb);
    }
  }
  for (int i = 0; i < no && i < MO; i++) {
    const int64_t o = o0 + i;
    const F sc = V::set1_ps(c.xscale * c.wscale[o]), b = V::set1_ps(c.bias ? c.bias[o] : 0.f);
    const I corr = V::set1_i(U8 ? -c.zero * c.colsum[o] : 0);
    for (int v = 0; v < NV; v++) {
      const int64_t l = l0 + v * VL;
      if (l >= c.L) break;
      conv_store<V>(c, o, l, V::fma(V::cvt(V::add_i(acc[i][v], corr)), sc, b));
    }
  }
}

// Grouped scales (4-bit weights, int16 products): per group an exact int32 sum, then acc += sum * scale in fp32.
template <class V, int MO, int NV>
static void ctile_g(const ConvGemm& c, int64_t o0, int64_t no, int64_t l0) {
  typedef typename V::I I;
  typedef typename V::F F;
  constexpr int VL = V::L32;
  F accf[MO][NV];
  for (int i = 0; i < MO; i++)
    for (int v = 0; v < NV; v++) accf[i][v] = V::set1_ps(0.f);
  int64_t orow[MO];
  for (int i = 0; i < MO; i++) orow[i] = o0 + (i < no ? i : no - 1);
  const int64_t Q = c.Kp / 2;
  for (int64_t g = 0; g < c.G && g * c.gq < Q; g++) {
    I acc[MO][NV];
    for (int i = 0; i < MO; i++)
      for (int v = 0; v < NV; v++) acc[i][v] = V::zero_i();
    for (int64_t q = g * c.gq; q < imin(Q, (g + 1) * c.gq); q++) {
      I xv[NV];
      for (int v = 0; v < NV; v++) xv[v] = V::load_s16(c.x16 + (q * c.Lp + l0 + v * VL) * 2);
      for (int i = 0; i < MO; i++) {
        int32_t wq;
        __builtin_memcpy(&wq, c.w16 + orow[i] * c.Kp + q * 2, 4);
        const I wb = V::set1_i(wq);
        for (int v = 0; v < NV; v++) acc[i][v] = V::dp16(acc[i][v], xv[v], wb);
      }
    }
    for (int i = 0; i < MO; i++) {
      const F s = V::set1_ps(c.gscale[orow[i] * c.G + g]);
      for (int v = 0; v < NV; v++) accf[i][v] = V::fma(V::cvt(acc[i][v]), s, accf[i][v]);
    }
  }
  for (int i = 0; i < no && i < MO; i++) {
    const int64_t o = o0 + i;
    const F sc = V::set1_ps(c.xscale), b = V::set1_ps(c.bias ? c.bias[o] : 0.f);
    for (int v = 0; v < NV; v++) {
      const int64_t l = l0 + v * VL;
      if (l >= c.L) break;
      conv_store<V>(c, o, l, V::fma(accf[i][v], sc, b));
    }
  }
}

template <class V, bool U8>
static void k_conv(const ConvGemm& c, int64_t o0, int64_t o1) {
  constexpr int MO = V::MO, VL = V::L32;
  if (!U8 && c.gscale) {  // half the rows per tile: a float and an int accumulator per vector
    constexpr int MG = MO / 2 > 0 ? MO / 2 : 1;
    for (int64_t o = o0; o < o1; o += MG) {
      const int64_t no = imin(MG, o1 - o);
      int64_t l = 0;
      for (; l + 2 * VL <= c.Lp; l += 2 * VL) ctile_g<V, MG, 2>(c, o, no, l);
      if (l < c.Lp) ctile_g<V, MG, 1>(c, o, no, l);
    }
    return;
  }
  for (int64_t o = o0; o < o1; o += MO) {
    const int64_t no = imin(MO, o1 - o);
    int64_t l = 0;
    for (; l + 2 * VL <= c.Lp; l += 2 * VL) ctile<V, U8, MO, 2>(c, o, no, l, 2 * VL);
    if (l < c.Lp) ctile<V, U8, MO, 1>(c, o, no, l, VL);
  }
}

template <class V>
static conv_fn conv_u8_fn() {
  if constexpr (V::VNNI) return k_conv<V, true>;
  else return nullptr;
}

// ---- activation quantization (QuantFns in common.h) ----------------------------------------------------
template <class V>
static inline typename V::F ldx(const void* x, int bf16, int64_t k) {
  return bf16 ? V::loadbf((const uint16_t*)x + k) : V::loadf((const float*)x + k);
}

// the last n < LF values of a row (lanes from n on are 0): rows end with one masked step, not a scalar loop (a
// CTR model's rows of 8-13 values would run scalar from start to end)
template <class V>
static inline typename V::F ldx_n(const void* x, int bf16, int64_t k, int64_t n) {
  return bf16 ? V::loadbf_n((const uint16_t*)x + k, n) : V::loadf_n((const float*)x + k, n);
}

template <class V>
static bool q_range(const void* x, int bf16, int64_t K, int minmax, float* lo, float* hi) {
  typedef typename V::F F;
  F vlo = V::set1_ps(0.f), vhi = V::set1_ps(0.f);  // (the ranges include 0, so zero lanes change nothing)
  bool ok = true;
  const auto add = [&](F v) {
    ok &= V::finite(v);
    if (minmax) {
      vlo = V::minf(vlo, v);
      vhi = V::maxf(vhi, v);
    } else {
      vhi = V::maxf(vhi, V::absf(v));
    }
  };
  int64_t k = 0;
  for (; k + V::LF <= K; k += V::LF) add(ldx<V>(x, bf16, k));
  if (k < K) add(ldx_n<V>(x, bf16, k, K - k));
  *lo = V::hmin(vlo);
  *hi = V::hmax(vhi);
  return ok;
}

template <class V>
static void q_s16(const void* x, int bf16, int64_t K, float inv, int16_t* out) {
  const typename V::F vi = V::set1_ps(inv);
  int64_t k = 0;
  for (; k + V::LF <= K; k += V::LF) V::store_s16(out + k, V::cvt_rne(V::mulf(ldx<V>(x, bf16, k), vi)));
  if (k < K) V::store_s16_n(out + k, V::cvt_rne(V::mulf(ldx_n<V>(x, bf16, k, K - k), vi)), K - k);
}

template <class V>
static void q_u8(const void* x, int bf16, int64_t K, float scale, int32_t zero, uint8_t* out8, int16_t* out16) {
  typedef typename V::F F;
  typedef typename V::I I;
  const F vs = V::set1_ps(scale), lim = V::set1_ps(512.f), nlim = V::set1_ps(-512.f);
  const I vz = V::set1_i(zero), lo = V::set1_i(0), hi = V::set1_i(255), nz = V::set1_i(-zero);
  const auto code = [&](F v) { return V::clamp_i(V::add_i(V::cvt_rne(V::minf(V::maxf(V::divf(v, vs), nlim), lim)), vz), lo, hi); };
  int64_t k = 0;
  for (; k + V::LF <= K; k += V::LF) {
    const I u = code(ldx<V>(x, bf16, k));
    if (out8) V::store_u8(out8 + k, u);
    else V::store_s16(out16 + k, V::add_i(u, nz));
  }
  if (k < K) {
    const int64_t n = K - k;
    const I u = code(ldx_n<V>(x, bf16, k, n));
    if (out8) V::store_u8_n(out8 + k, u, n);
    else V::store_s16_n(out16 + k, V::add_i(u, nz), n);
  }
}

// ---- dequantization to bf16 or fp32 (tiles for a bf16 / fp32 matrix product) -------------------------------------------
// Rows in their natural order (4-bit rows over the padded grid, G * gsize values), 16 values at a time: the codes
// as int8 values (4-bit: the two nibbles of 8 bytes interleaved back into k order, then xor / zero point / table),
// widened to fp32 and multiplied by their scale: the same fp32 product as the reference, (float)value * scale, then
// rounded to bf16 (nearest even; finite here). 128-bit integer instructions, then 512-bit float ones on the
// AVX-512 builds, 256-bit ones on the others. 4-bit groups are a multiple of 16 values (native.bf16_supported).
static inline __m128i nibbles16(const uint8_t* b) {  // 8 bytes -> 16 codes (byte j: k = 2j low nibble, 2j + 1 high)
  const __m128i v = _mm_loadl_epi64((const __m128i*)b), m = _mm_set1_epi8(15);
  return _mm_unpacklo_epi8(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m));
}

static inline __m128i bf16x8(__m256 f) {  // 8 fp32 -> 8 bf16, round to nearest even (finite values)
  __m256i u = _mm256_castps_si256(f);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));  // (values < 2^16: exact)
}

// 16 int8 values times s, as fp32 or bf16: two 256-bit halves, or (W512) one 512-bit register
template <bool W512>
static inline void put16(float* o, __m128i v, float s) {
  if constexpr (W512) {
    _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), _mm512_set1_ps(s)));
  } else {
    const __m256 sv = _mm256_set1_ps(s);
    _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), sv));
    _mm256_storeu_ps(o + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), sv));
  }
}
template <bool W512>
static inline void put16(uint16_t* o, __m128i v, float s) {
  if constexpr (W512) {
    __m512i u = _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), _mm512_set1_ps(s)));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
    _mm256_storeu_si256((__m256i*)o, _mm512_cvtepi32_epi16(u));
  } else {
    const __m256 sv = _mm256_set1_ps(s);
    _mm_storeu_si128((__m128i*)o, bf16x8(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), sv)));
    const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
    _mm_storeu_si128((__m128i*)(o + 8), bf16x8(_mm256_mul_ps(hi, sv)));
  }
}

static inline uint16_t bf16_finite(float f) {  // round to nearest even; f is finite here
  union { float f; uint32_t u; } v;
  v.f = f;
  return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}
static inline void put_deq(uint16_t* o, float v) { *o = bf16_finite(v); }
static inline void put_deq(float* o, float v) { *o = v; }

template <class V, class T>  // T = uint16_t (bf16) or float
static void deq_rows(const Gemm& g, int bits, int sym, int64_t n0, int64_t n1, T* out) {
  constexpr bool W512 = V::LF == 16;
  const int64_t kg = bits == 8 ? g.K : g.G * g.gsize;
  for (int64_t n = n0; n < n1; n++) {
    T* o = out + (n - n0) * kg;
    if (bits == 8) {
      const int8_t* w = (const int8_t*)(g.w + n * g.ldw);
      const float s = g.wscale[n];
      int64_t k = 0;
      for (; k + 16 <= g.K; k += 16) put16<W512>(o + k, _mm_loadu_si128((const __m128i*)(w + k)), s);
      for (; k < g.K; k++) put_deq(o + k, (float)w[k] * s);
      continue;
    }
    const uint8_t* w = g.w + n * g.ldw;
    const __m128i tbl = g.lut ? _mm_loadu_si128((const __m128i*)g.lut) : _mm_setzero_si128(), m8 = _mm_set1_epi8(8);
    for (int64_t gi = 0; gi < g.G; gi++) {
      const float s = g.gscale[n * g.G + gi];
      const __m128i z = _mm_set1_epi8((char)(sym ? 8 : g.gzero ? g.gzero[n * g.G + gi] : 0));
      for (int64_t k = gi * g.gsize; k < (gi + 1) * g.gsize; k += 16) {
        const __m128i c = nibbles16(w + k / 2);
        // FP4: the table's integer value (times the halved group scale); sym: (c ^ 8) - 8; asym: c - zero
        put16<W512>(o + k, g.lut ? _mm_shuffle_epi8(tbl, c) : _mm_sub_epi8(sym ? _mm_xor_si128(c, m8) : c, z), s);
      }
    }
  }
}

template <class V>
static void deq_bf16(const Gemm& g, int bits, int sym, int64_t n0, int64_t n1, uint16_t* out) {
  deq_rows<V, uint16_t>(g, bits, sym, n0, n1, out);
}
template <class V>
static void deq_f32(const Gemm& g, int bits, int sym, int64_t n0, int64_t n1, float* out) {
  deq_rows<V, float>(g, bits, sym, n0, n1, out);
}

template <class V>
static QuantFns quant_fns() {
  return QuantFns{q_range<V>, q_s16<V>, q_u8<V>};
}

// Entry points: V::MR8 x V::NR8 tiles for 8-bit weights, V::MR4 x V::NR4 for 4-bit weights (MR <= 4).
template <class V>
static void k_s16s8(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int MR = V::MR8, NR = V::NR8;
  drive<MR, NR, tile_s16s8<V, 1, NR>, tile_s16s8<V, 2, NR>, tile_s16s8<V, (MR > 3 ? 3 : 1), NR>,
        tile_s16s8<V, MR, NR>>(g, m0, m1, n0, n1);
}

// int8 weights x planes (VNNI only): V::NR8_1 weight rows per tile for one activation row, else V::MR4 x V::NR4 (two
// accumulators per pair of rows)
template <class V>
static void k_p8s8(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (m1 - m0 == 1) {
    constexpr int N1 = V::NR8_1;
    drive<1, N1, tile_p8s8<V, 1, N1>, tile_p8s8<V, 1, N1>, tile_p8s8<V, 1, N1>, tile_p8s8<V, 1, N1>>(g, m0, m1, n0, n1);
    return;
  }
  constexpr int MR = V::MR4, NR = V::NR4;
  drive<MR, NR, tile_p8s8<V, 1, NR>, tile_p8s8<V, 2, NR>, tile_p8s8<V, (MR > 3 ? 3 : 1), NR>,
        tile_p8s8<V, MR, NR>>(g, m0, m1, n0, n1);
}

template <class V>
static gemm_fn p8s8_fn() {  // VNNI only (null otherwise)
  if constexpr (V::VNNI) return k_p8s8<V>;
  else return nullptr;
}

template <class V>
static void k_u8s8(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  constexpr int MR = V::MR8, NR = V::NR8;
  if constexpr (V::NR8_1 != NR) {
    if (m1 - m0 == 1) {  // one row: more weight rows per tile, more streams from memory (V::NR8_1)
      constexpr int N1 = V::NR8_1;
      drive<1, N1, tile_u8s8<V, 1, N1>, tile_u8s8<V, 1, N1>, tile_u8s8<V, 1, N1>, tile_u8s8<V, 1, N1>>(g, m0, m1, n0,
                                                                                                   n1);
      return;
    }
  }
  drive<MR, NR, tile_u8s8<V, 1, NR>, tile_u8s8<V, 2, NR>, tile_u8s8<V, (MR > 3 ? 3 : 1), NR>,
        tile_u8s8<V, MR, NR>>(g, m0, m1, n0, n1);
}

template <class V>
static gemm_fn u8s8_fn() {  // only with VNNI: without it there is no exact u8 x s8 product
  if constexpr (V::VNNI) return k_u8s8<V>;
  else return nullptr;
}

// the epilogue of the narrow products: y = (s - azero * colsum) * ascale * wscale + bias for int32 sums s (U8), or
// y = s * ascale * wscale + bias for fp32 sums (U8 false), L outputs of each of MR rows per vector, the last ones
// partial (masked stores). The last multiply and the bias are one explicit FMA: written as a multiply and an add,
// the compiler fused them in some rows of a block and not in others (256-bit builds), so a row's last bit depended
// on its place in the batch.
template <class V, int MR, bool U8, class T>
static void narrow_out(const Gemm& g, int64_t m0, int64_t n, int64_t n1, int nv, T (&acc)[MR][2]) {
  constexpr int L = V::LF;
  for (int v = 0; v < nv; v++) {
    const int64_t c = n + L * v, cnt = imin(L, n1 - c);
    if constexpr (L == 16) {  // AVX-512: masked loads and stores for the last columns
      const __mmask16 k = (__mmask16)((1u << cnt) - 1);
      const __m512 ws = g.wscale ? _mm512_maskz_loadu_ps(k, g.wscale + c) : _mm512_set1_ps(1.f);  // (null: gsp)
      const __m512 bias = g.bias ? _mm512_maskz_loadu_ps(k, g.bias + c) : _mm512_setzero_ps();
      const __m512i cs = U8 ? _mm512_maskz_loadu_epi32(k, g.colsum + c) : _mm512_setzero_si512();
      for (int i = 0; i < MR; i++) {
        const int64_t m = m0 + i;
        __m512 t;
        if constexpr (U8) t = V::cvt(V::sub_zx_i(acc[i][v], g.azero[m], cs));
        else t = acc[i][v];
        t = _mm512_fmadd_ps(_mm512_mul_ps(t, _mm512_set1_ps(g.ascale[m])), ws, bias);
        _mm512_mask_storeu_ps(g.out + m * g.ldo_m + c, k, t);
      }
      continue;
    }
    alignas(64) float ws[L], bias[L];
    alignas(64) int32_t cs[L];
    for (int j = 0; j < L; j++) {
      ws[j] = j < cnt ? (g.wscale ? g.wscale[c + j] : 1.f) : 0.f;
      bias[j] = j < cnt && g.bias ? g.bias[c + j] : 0.f;
      cs[j] = U8 && j < cnt ? g.colsum[c + j] : 0;
    }
    for (int i = 0; i < MR; i++) {
      const int64_t m = m0 + i;
      typename V::F t;
      if constexpr (U8) t = V::cvt(V::sub_zx_i(acc[i][v], g.azero[m], V::load8(cs)));
      else t = acc[i][v];
      t = V::fma(V::mulf(t, V::set1_ps(g.ascale[m])), V::loadf(ws), V::loadf(bias));
      float* o = g.out + m * g.ldo_m + c;
      if (cnt == L) V::storef(o, t);
      else V::storef_n(o, t, cnt);
    }
  }
}

// the narrow products' rows in blocks of 8, then 4, then 1 (R8, R4, R1: the row function at those block sizes)
typedef void (*narrow_rows_fn)(const Gemm&, int64_t m0, int64_t n0, int64_t n1);
template <narrow_rows_fn R8, narrow_rows_fn R4, narrow_rows_fn R1>
static void narrow_blocks(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  int64_t m = m0;
  for (; m + 8 <= m1; m += 8) R8(g, m, n0, n1);
  for (; m + 4 <= m1; m += 4) R4(g, m, n0, n1);
  for (; m < m1; m++) R1(g, m, n0, n1);
}

// acc[i][v] += the int32 products of rows m0 + i and columns n + L v .. (v < nv) over lanes q0 .. q1 of k: 4 uint8
// codes x 4 int8 weights per lane (U8: g.a8, g.wp, vpdpbusd) or 2 int16 values x 2 int16 weights (g.a16, g.wp16,
// vpmaddwd). Either way a lane is 4 bytes of a row (rows lda apart, or k-major: g.kmajor) and of each column's
// interleaved weights.
template <class V, int MR, bool U8>
static inline void narrow_sums(const Gemm& g, int64_t m0, int64_t n, int64_t q0, int64_t q1, int nv,
                               typename V::I (&acc)[MR][2]) {
  typedef typename V::I I;
  constexpr int L = V::LF;
  const int64_t np = (g.N + 15) / 16 * 16;
  const int64_t row_bytes = g.kmajor ? 4 : g.lda * (U8 ? 1 : 2), q_bytes = g.kmajor ? 4 * g.kmajor : 4;
  const uint8_t* aq = (U8 ? (const uint8_t*)g.a8 : (const uint8_t*)g.a16) + m0 * row_bytes + q0 * q_bytes;
  const uint8_t* wq = (U8 ? (const uint8_t*)g.wp : (const uint8_t*)g.wp16) + (q0 * np + n) * 4;
  for (int64_t q = q0; q < q1; q++, wq += np * 4, aq += q_bytes) {
    const I b0 = V::load8(wq);
    const I b1 = nv > 1 ? V::load8(wq + 4 * L) : b0;
    for (int i = 0; i < MR; i++) {
      int32_t a4;
      __builtin_memcpy(&a4, aq + i * row_bytes, 4);
      const I ai = V::set1_i(a4);
      acc[i][0] = U8 ? V::dp8(acc[i][0], ai, b0) : V::dp16(acc[i][0], ai, b0);
      if (nv > 1) acc[i][1] = U8 ? V::dp8(acc[i][1], ai, b1) : V::dp16(acc[i][1], ai, b1);
    }
  }
}

// ---- int8 weights x uint8 activations, outputs along the vector (VNNI): short rows ------------------------------
// The tiles above end each output with a reduction across its accumulator's lanes, which costs more than the
// products when K is a few dozen (a CTR model's 8-64-wide layers at thousands of rows: 2-13x slower than fp32 there).
// Here L outputs of a row share one accumulator: for every 4 values of k, the row's 4 activation codes (broadcast)
// times L columns' 4 weight codes (g.wp). The same exact int32 sums and epilogue as tile_u8s8; fp32 output with
// ldo_n == 1 only (the caller's check).
template <class V, int MR>
static void narrow_rows(const Gemm& g, int64_t m0, int64_t n0, int64_t n1) {
  typedef typename V::I I;
  constexpr int L = V::LF;  // outputs per vector
  const int64_t kq = (g.K + 3) / 4;
  for (int64_t n = n0; n < n1; n += 2 * L) {
    const int nv = n + L < n1 ? 2 : 1;
    I acc[MR][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = V::zero_i();
    narrow_sums<V, MR, true>(g, m0, n, 0, kq, nv, acc);
    narrow_out<V, MR, true>(g, m0, n, n1, nv, acc);
  }
}

template <class V>
static gemm_fn u8s8_narrow_fn() {
  if constexpr (V::VNNI) return narrow_blocks<narrow_rows<V, 8>, narrow_rows<V, 4>, narrow_rows<V, 1>>;
  else return nullptr;
}

// ---- int8 weights x int16 activations, outputs along the vector: short rows, any x86 build ------------------
// As the narrow uint8 product, for the int16 activations of weight-only layers (14-bit codes) and of int8 activations
// without VNNI (u - zero): for every 2 values of k, the row's 2 activations (broadcast) times L columns' 2 weights
// (g.wp16, int16), `vpmaddwd`. Exact int32 sums over blocks of 1024 pairs (1024 x 2 x 8128 x 128 < 2^31), added in
// fp32 lane by lane (the tiles add theirs after a reduction: the same products, float rounding apart), then the
// tiles' epilogue; fp32 output with ldo_n == 1 only. 4-bit weights (g.gsp): the blocks are their groups (an even
// group size, or one group per row), each group's exact sum times its scale, lane by lane, as the tiles do.
template <class V, int MR>
static void narrow16_rows(const Gemm& g, int64_t m0, int64_t n0, int64_t n1) {
  typedef typename V::I I;
  typedef typename V::F F;
  constexpr int L = V::LF;  // outputs per vector
  const int64_t kq = (g.K + 1) / 2, np = (g.N + 15) / 16 * 16;
  const int64_t QB = g.gsp ? (g.G > 1 ? g.gsize / 2 : kq) : 1024;
  for (int64_t n = n0; n < n1; n += 2 * L) {
    const int nv = n + L < n1 ? 2 : 1;
    F tot[MR][2];
    for (int i = 0; i < MR; i++) tot[i][0] = tot[i][1] = V::set1_ps(0.f);
    for (int64_t q0 = 0, gi = 0; q0 < kq; q0 += QB, gi++) {
      const int64_t q1 = imin(kq, q0 + QB);
      I acc[MR][2];
      for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = V::zero_i();
      narrow_sums<V, MR, false>(g, m0, n, q0, q1, nv, acc);
      if (g.gsp) {
        const F s0 = V::loadf(g.gsp + gi * np + n), s1 = nv > 1 ? V::loadf(g.gsp + gi * np + n + L) : s0;
        for (int i = 0; i < MR; i++) {
          tot[i][0] = V::fma(V::cvt(acc[i][0]), s0, tot[i][0]);
          if (nv > 1) tot[i][1] = V::fma(V::cvt(acc[i][1]), s1, tot[i][1]);
        }
      } else {
        for (int i = 0; i < MR; i++)
          for (int v = 0; v < nv; v++) tot[i][v] = V::addf(tot[i][v], V::cvt(acc[i][v]));
      }
    }
    narrow_out<V, MR, false>(g, m0, n, n1, nv, tot);
  }
}

template <class V>
static constexpr gemm_fn s16s8_narrow = narrow_blocks<narrow16_rows<V, 8>, narrow16_rows<V, 4>, narrow16_rows<V, 1>>;

// Blocks of at least WIDE_ROWS activation rows (common.h): each tile of NR weight rows is widened to int16 once (the
// weight's integer values: code - zero, or the table's values), into g.wide with the activation rows' stride, and
// read by every row tile of the block through W16, which then needs no per-group zero-point correction (S16X4 widens
// per row tile, and corrects each group's sums).
template <class V, bool SYM, class GP, int NR>
static void widen(const Gemm& g, int64_t n0, int64_t nn) {
  typename V::T4 tbl{};
  if constexpr (GP::kLut) tbl = V::lut4(g.lut);
  const int64_t kg = g.G * g.gsize;
  for (int j = 0; j < NR; j++) {
    const int64_t n = n0 + (j < nn ? j : nn - 1);  // (a partial tile repeats its last row, as tile_u4 does)
    const uint8_t* w = g.w + n * g.ldw;
    int16_t* o = g.wide + j * g.lda;
    const uint8_t* z = g.gzero ? g.gzero + n * g.G : nullptr;
    for (int64_t k = 0; k < kg; k += V::KU4) {
      typename V::I lo, hi;
      if constexpr (GP::kLut) {
        V::load_l4(w + (k >> 1), tbl, lo, hi);
      } else {  // symmetric codes come as c + 8 (xor 8); asymmetric ones as stored (one group per step: k_u4)
        V::template load_u4<SYM>(w + (k >> 1), lo, hi);
        const typename V::I zz = V::set1_16(SYM ? 8 : z[k / g.gsize]);
        lo = V::sub16(lo, zz);
        hi = V::sub16(hi, zz);
      }
      V::store_i(o + k, lo);
      V::store_i(o + k + V::KU4 / 2, hi);
    }
  }
}

// drive over MR x NR tiles of one 4-bit product (and, for W16, the widening of each tile of weight rows first)
template <class V, bool SYM, class GP, int SUB, int MR, int NR, prep_fn PREP = nullptr>
static void drive_u4(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  drive<MR, NR, tile_u4<V, SYM, 1, NR, GP, SUB>, tile_u4<V, SYM, (MR > 1 ? 2 : 1), NR, GP, SUB>,
        tile_u4<V, SYM, (MR > 3 ? 3 : 1), NR, GP, SUB>, tile_u4<V, SYM, MR, NR, GP, SUB>, PREP>(g, m0, m1, n0, n1);
}

// One 4-bit product over the tiles of a block: GP = S16U4 (codes), S16L4 (codes through a table) or P8U4 (planes);
// SUB groups of 16 per step (tile_u4)
template <class V, bool SYM, class GP, int SUB = 1>
static void k_u4(const Gemm& g, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if constexpr (GP::kWiden && V::MRW > 0 && (SYM || GP::kLut || SUB == 1)) {  // (asymmetric: one zero per step)
    static_assert(V::NRW <= WIDE_NR, "the caller's buffer holds WIDE_NR widened rows");
    if (g.wide && m1 - m0 >= WIDE_ROWS)
      return drive_u4<V, SYM, W16, SUB, V::MRW, V::NRW, widen<V, SYM, GP, V::NRW>>(g, m0, m1, n0, n1);
  }
  if constexpr (std::is_same<GP, P8U4>::value && SUB == 1) {
    if (m1 - m0 == 1 && g.gsize == 2 * V::KS8) return drive_p8_row<V, SYM, V::NR8_1>(g, m0, n0, n1);
  }
  if constexpr (V::NR1 > V::NR4 && SUB == 1) {  // one row: more weight rows per tile (each activation vector read for all of them)
    if (m1 - m0 == 1) return drive_u4<V, SYM, GP, SUB, 1, V::NR1>(g, m0, m1, n0, n1);
  }
  drive_u4<V, SYM, GP, SUB, V::MR4, V::NR4>(g, m0, m1, n0, n1);
}

template <class V>
static gemm_fn p8u4_fn(bool sym) {  // VNNI only (null otherwise)
  if constexpr (V::VNNI) return sym ? k_u4<V, true, P8U4> : k_u4<V, false, P8U4>;
  else return nullptr;
}

// ---- fp8 x fp8 products (common.h: Fp8Gemm), outputs along the vector ---------------------------------------------
// The products of two fp8 values are exact in fp32, so this is the reference path's computation up to the order of
// the fp32 sums (its scales applied to the sums instead of to every value). The weights (g.wp: bf16 bits of the fp8
// values, tiles of 32 columns with pairs of k interleaved, 2 bytes per weight) meet the activations two ways:
// - BF16 (AVX512-BF16 only; instantiated by fp8.cpp, compiled for it): the activations as bf16 pairs (g.a), one
//   broadcast of a row's pair times 16 columns' pairs per `vdpbf16ps`;
// - else (every x86 build): the activations as fp32 values (g.af), the weights widened to fp32 by a shift and a mask
//   per 2 L values, two FMAs per pair.
// Rows of the block MR at a time, 2 L outputs per step. S sums per output over alternate pairs of k, added at the end:
// short blocks keep enough chains in flight (one sum per output would wait on its latency: Linear(384, 1536) at 14
// rows went 69 -> 42 us with them, AVX-512 BF16 on the AMD EPYC).
template <class V, int MR, int S, bool BF16>
static void fp8_rows(const Fp8Gemm& g, int64_t m0, int64_t n) {
  typedef typename V::F F;
  constexpr int L = V::LF;
  static_assert(!BF16 || L == 16, "the bf16 product runs on 512-bit registers");
  const int64_t kq = (g.K + 1) / 2;
  const int nv = n + L < g.N ? 2 : 1;
  F acc[MR][2][S];
  for (int i = 0; i < MR; i++)
    for (int s = 0; s < S; s++) acc[i][0][s] = acc[i][1][s] = V::set1_ps(0.f);
  const uint16_t* w = g.wp + (n / 32) * kq * 64 + (n % 32) * 2;  // (tiles of 32 columns: 2 L divides 32)
  int64_t q = 0;
  const auto step = [&](int s) {
    if constexpr (BF16) {
      const __m512i b0 = _mm512_loadu_si512((const void*)w);
      const __m512i b1 = nv > 1 ? _mm512_loadu_si512((const void*)(w + 32)) : b0;
      for (int i = 0; i < MR; i++) {
        int32_t a2;
        __builtin_memcpy(&a2, g.a + (m0 + i) * g.lda + 2 * q, 4);
        const __m512i ai = _mm512_set1_epi32(a2);
        acc[i][0][s] = _mm512_dpbf16_ps(acc[i][0][s], (__m512bh)ai, (__m512bh)b0);
        if (nv > 1) acc[i][1][s] = _mm512_dpbf16_ps(acc[i][1][s], (__m512bh)ai, (__m512bh)b1);
      }
    } else {
      F e0, o0, e1, o1;
      V::bf16_pairs(w, e0, o0);
      if (nv > 1) V::bf16_pairs(w + 2 * L, e1, o1);
      else e1 = e0, o1 = o0;
      for (int i = 0; i < MR; i++) {
        const float* a = g.af + (m0 + i) * g.lda + 2 * q;
        const F a0 = V::set1_ps(a[0]), a1 = V::set1_ps(a[1]);
        acc[i][0][s] = V::fma(a1, o0, V::fma(a0, e0, acc[i][0][s]));
        if (nv > 1) acc[i][1][s] = V::fma(a1, o1, V::fma(a0, e1, acc[i][1][s]));
      }
    }
    q++;
    w += 64;
  };
  for (; q + S <= kq;)
    for (int s = 0; s < S; s++) step(s);
  for (int s = 0; q < kq; s++) step(s);
  for (int v = 0; v < nv; v++) {
    const int64_t c = n + L * v, cnt = imin(L, g.N - c);
    const F ws = V::mulf(V::loadf(g.wscale + c), V::set1_ps(g.ascale));
    const F bias = g.bias ? V::loadf(g.bias + c) : V::set1_ps(0.f);
    for (int i = 0; i < MR; i++) {
      F t = acc[i][v][0];
      for (int s = 1; s < S; s++) t = V::addf(t, acc[i][v][s]);
      float* o = g.out + (m0 + i) * g.ldo + c;
      if (cnt == L) V::storef(o, V::fma(t, ws, bias));
      else V::storef_n(o, V::fma(t, ws, bias), cnt);
    }
  }
}

// rows in chunks of about 64 KB of activations; in each, columns outermost: a step's weights (K x 2 L values) stay
// in L1 while every row of the chunk reads them. Blocks of MR rows, then shorter ones with more sums per output (the
// bf16 product's latency wants 16 chains, the FMAs' 8)
template <class V, bool BF16>
static void fp8_gemm(const Fp8Gemm& g, int64_t m0, int64_t m1) {
  constexpr int MR = V::LF == 16 ? 8 : 4;  // (AVX2: 2 x 4 sums of its 16 registers)
  constexpr int X = BF16 ? 2 : 1;          // the short blocks' extra factor of sums
  const int64_t chunk = imax(MR, ((BF16 ? 32768 : 16384) / imax(g.lda, 1)) / MR * MR);  // (bf16: 2 bytes a value)
  for (int64_t c0 = m0; c0 < m1; c0 += chunk) {
    const int64_t c1 = imin(m1, c0 + chunk);
    for (int64_t n = 0; n < g.N; n += 2 * V::LF) {
      int64_t m = c0;
      for (; m + MR <= c1; m += MR) fp8_rows<V, MR, 1, BF16>(g, m, n);
      if constexpr (MR > 4)
        for (; m + 4 <= c1; m += 4) fp8_rows<V, 4, X, BF16>(g, m, n);
      for (; m + 2 <= c1; m += 2) fp8_rows<V, 2, 2 * X, BF16>(g, m, n);
      for (; m < c1; m++) fp8_rows<V, 1, 4 * X, BF16>(g, m, n);
    }
  }
}
