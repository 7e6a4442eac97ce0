// Vector traits for gemm_impl.h: 512-bit (AVX-512BW) and 256-bit (AVX2) registers, with or without VNNI.
// Included inside an anonymous namespace of an instruction-set file, after its `#pragma GCC target`.
// VNNI products (vpdpwssd, vpdpbusd) and the AVX2 emulation of vpdpwssd (vpmaddwd + vpaddd) are exact:
// no int16 intermediate saturates (u8 x s8 pairs never go through vpmaddubsw).

template <bool VNNI_>
struct V512 {
  typedef __m512i I;
  typedef __m512 F;
  static constexpr bool VNNI = VNNI_;
  static constexpr int KS16 = 32, KS8 = 64, KU4 = 64;
  static constexpr int64_t S16_KMAX = 16384;  // 16384 / 16 lanes x 8128 x 128 < 2^31
  static constexpr int MR8 = 4, NR8 = 4, MR4 = 2, NR4 = 4, MO = 8, L32 = 16;
  static constexpr int MRW = 1, NRW = 4;  // widened 4-bit rows (gemm_impl.h: widen, W16): measured best of 1-4 x 2-8
  static constexpr int NR1 = 4;  // weight rows per tile at M = 1
  // the same for the uint8 product at M = 1: 8 rows, 8 streams from memory (16 x Linear(4096, 4096) W8A8, one
  // thread, Intel Xeon: 1.09-1.12 ms a layer against 1.13-1.21 with 4, as fast as fp32's GEMV reads its weights)
  static constexpr int NR8_1 = 8;
  static inline I zero_i() { return _mm512_setzero_si512(); }
  static inline F zero_ps() { return _mm512_setzero_ps(); }
  static inline I load_s16(const int16_t* p) { return _mm512_loadu_si512((const void*)p); }
  static inline void store_i(int16_t* p, I a) { _mm512_storeu_si512((void*)p, a); }
  static inline I set1_16(int v) { return _mm512_set1_epi16((short)v); }
  static inline I sub16(I a, I b) { return _mm512_sub_epi16(a, b); }
  static inline I load8(const void* p) { return _mm512_loadu_si512(p); }
  static inline I load_s8_s16(const int8_t* p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)p));
  }
  // the first n < KS16 (KS8) bytes only, zeros after: masked loads never touch the bytes past the row
  static inline I load_s8_s16_n(const int8_t* p, int64_t n) {
    return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8((__mmask32)((1u << n) - 1), p));
  }
  static inline I load8_n(const void* p, int64_t n) {
    return _mm512_maskz_loadu_epi8((__mmask64)((1ull << n) - 1), p);
  }
  template <bool SYM>
  static inline void load_u4(const uint8_t* p, I& lo, I& hi) {  // 32 bytes -> 64 codes as int16
    const I v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)p));
    const I m15 = _mm512_set1_epi16(15), m8 = _mm512_set1_epi16(8);
    if (SYM) {
      lo = _mm512_ternarylogic_epi32(v, m15, m8, 0x6A);  // (v & 15) ^ 8
      hi = _mm512_xor_si512(_mm512_srli_epi16(v, 4), m8);
    } else {
      lo = _mm512_and_si512(v, m15);
      hi = _mm512_srli_epi16(v, 4);
    }
  }
  // 4-bit codes through a table of 16 int8 values (pshufb in each 128-bit lane), widened to int16: 32 bytes -> the
  // values of the 32 low and the 32 high nibbles, as load_u4
  typedef __m256i T4;
  static inline T4 lut4(const int8_t* t) { return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)t)); }
  static inline void load_l4(const uint8_t* p, T4 tbl, I& lo, I& hi) {
    const __m256i b = _mm256_loadu_si256((const __m256i*)p), m = _mm256_set1_epi8(15);
    lo = _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(tbl, _mm256_and_si256(b, m)));
    hi = _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(tbl, _mm256_and_si256(_mm256_srli_epi16(b, 4), m)));
  }
  static inline I dp16(I acc, I a, I b) {
    if constexpr (VNNI) return _mm512_dpwssd_epi32(acc, a, b);
    else return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
  }
  static inline I dp8(I acc, I u, I s) {
    if constexpr (VNNI) return _mm512_dpbusd_epi32(acc, u, s);
    else return acc;  // never used: u8s8_fn returns null without VNNI
  }
  // planes kernel (gemm_impl.h: P8U4): low / high nibbles of KS8 bytes as unsigned bytes, xor 8 when SYM
  template <bool SYM>
  static inline void split_u4(I v, I& lo, I& hi) {
    const I m15 = _mm512_set1_epi8(15);
    if (SYM) {
      const I m8 = _mm512_set1_epi8(8);
      lo = _mm512_ternarylogic_epi32(v, m15, m8, 0x6A);  // (v & 15) ^ 8
      hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), m15, m8, 0x6A);
    } else {
      lo = _mm512_and_si512(v, m15);
      hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m15);
    }
  }
  static inline I slli32(I a, int n) { return _mm512_slli_epi32(a, n); }
  static inline I lane0(int32_t v) { return _mm512_maskz_set1_epi32(1, v); }
  // groups of 16, four to a step (tile_u4 with SUB = 4): int32 lanes 4r..4r+3 hold group r's pair sums; v[r] into
  // lane 4r (the others 0), and s[r] into lanes 4r..4r+3
  static inline I lanes4(const int32_t* v) {
    return _mm512_setr_epi32(v[0], 0, 0, 0, v[1], 0, 0, 0, v[2], 0, 0, 0, v[3], 0, 0, 0);
  }
  static inline F scales4(const float* s) {
    const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(s)));
  }
  static inline void prefetch(const void* p) { _mm_prefetch((const char*)p, _MM_HINT_T0); }
  static inline F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static inline F set1_ps(float v) { return _mm512_set1_ps(v); }
  static inline float hsum(F a) { return _mm512_reduce_add_ps(a); }
  static inline int32_t hsum_i(I a) { return _mm512_reduce_add_epi32(a); }
  // activation quantization (16 floats per vector)
  static constexpr int LF = 16;
  static inline F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static inline void storef(float* p, F a) { _mm512_storeu_ps(p, a); }
  // the lanes set in *bits (the int32 masks are for 256-bit registers); lanes left out read nothing and are 0
  static inline F loadf_m(const float* p, const uint16_t* bits, const int32_t*) {
    return _mm512_maskz_loadu_ps(_load_mask16((__mmask16*)bits), p);
  }
  static inline void storef_n(float* p, F a, int64_t n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), a); }
  // lanes of (a, b) picked by idx (bit 4: b), those not in `bits` 0 (the depthwise kernel's taps from registers)
  static constexpr bool PERM = true;
  static inline F perm2_m(uint16_t bits, F a, I idx, F b) { return _mm512_maskz_permutex2var_ps(bits, a, idx, b); }
  static inline F perm_m(uint16_t bits, I idx, F a) { return _mm512_maskz_permutexvar_ps(bits, idx, a); }
  static inline I iota_plus(int32_t v) {
    return _mm512_add_epi32(_mm512_set1_epi32(v), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  }
  static inline F loadbf(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  // the first n < LF values (the rest of a row: lanes from n on read nothing and are 0), and stores of n lanes
  static inline F loadf_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
  static inline F loadbf_n(const uint16_t* p, int64_t n) {
    const __m256i v = _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  }
  static inline void store_s16_n(int16_t* p, I a, int64_t n) {
    _mm512_mask_cvtepi32_storeu_epi16(p, (__mmask16)((1u << n) - 1), a);
  }
  static inline void store_u8_n(uint8_t* p, I a, int64_t n) {
    _mm512_mask_cvtepi32_storeu_epi8(p, (__mmask16)((1u << n) - 1), a);
  }
  // LF pairs of bf16 values (2 LF uint16): the first of each pair (even) and the second (odd) as fp32
  static inline void bf16_pairs(const uint16_t* p, F& even, F& odd) {
    const __m512i v = _mm512_loadu_si512((const void*)p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
  }
  static inline F absf(F a) { return _mm512_abs_ps(a); }
  static inline F maxf(F a, F b) { return _mm512_max_ps(a, b); }
  static inline F minf(F a, F b) { return _mm512_min_ps(a, b); }
  static inline F mulf(F a, F b) { return _mm512_mul_ps(a, b); }
  static inline F addf(F a, F b) { return _mm512_add_ps(a, b); }
  static inline F divf(F a, F b) { return _mm512_div_ps(a, b); }
  static inline bool finite(F a) {  // every lane finite (not NaN, not +-Inf)
    return _mm512_cmp_ps_mask(_mm512_abs_ps(a), _mm512_set1_ps(3.40282347e38f), _CMP_LE_OQ) == 0xFFFF;
  }
  static inline float hmax(F a) { return _mm512_reduce_max_ps(a); }
  static inline float hmin(F a) { return _mm512_reduce_min_ps(a); }
  static inline I cvt_rne(F a) { return _mm512_cvtps_epi32(a); }  // round half to even (default MXCSR)
  static inline I set1_i(int32_t v) { return _mm512_set1_epi32(v); }
  static inline I sub_zx_i(I acc, int32_t z, I colsum) {  // acc - z * colsum (int32 lanes)
    return _mm512_sub_epi32(acc, _mm512_mullo_epi32(_mm512_set1_epi32(z), colsum));
  }
  static inline I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  static inline I clamp_i(I a, I lo, I hi) { return _mm512_min_epi32(_mm512_max_epi32(a, lo), hi); }
  static inline void store_s16(int16_t* p, I a) { _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(a)); }
  static inline void store_u8(uint8_t* p, I a) { _mm_storeu_si128((__m128i*)p, _mm512_cvtepi32_epi8(a)); }
};

// VN: 0 = AVX2 only, 1 = AVX-VNNI (VEX encoded), 2 = AVX512-VL VNNI (EVEX encoded)
template <int VN>
struct V256 {
  typedef __m256i I;
  typedef __m256 F;
  static constexpr bool VNNI = VN != 0;
  static constexpr int KS16 = 16, KS8 = 32, KU4 = 32;
  static constexpr int64_t S16_KMAX = 8192;  // 8192 / 8 lanes x 8128 x 128 < 2^31
  static constexpr int MR8 = 2, NR8 = 4, MR4 = 2, NR4 = 2, MO = 4, L32 = 8;
  static constexpr int MRW = 1, NRW = 4, NR1 = 4, NR8_1 = 4;  // (16 registers: 8 rows would spill)
  static inline I zero_i() { return _mm256_setzero_si256(); }
  static inline F zero_ps() { return _mm256_setzero_ps(); }
  static inline I load_s16(const int16_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static inline void store_i(int16_t* p, I a) { _mm256_storeu_si256((__m256i*)p, a); }
  static inline I set1_16(int v) { return _mm256_set1_epi16((short)v); }
  static inline I sub16(I a, I b) { return _mm256_sub_epi16(a, b); }
  static inline I load8(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static inline I load_s8_s16(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }
  // the first n < KS16 (KS8) bytes only, zeros after (copied: AVX2 has no byte-masked loads)
  static inline I load_s8_s16_n(const int8_t* p, int64_t n) {
    alignas(16) int8_t t[16] = {0};
    for (int64_t i = 0; i < n; i++) t[i] = p[i];
    return load_s8_s16(t);
  }
  static inline I load8_n(const void* p, int64_t n) {
    alignas(32) uint8_t t[32] = {0};
    for (int64_t i = 0; i < n; i++) t[i] = ((const uint8_t*)p)[i];
    return load8(t);
  }
  template <bool SYM>
  static inline void load_u4(const uint8_t* p, I& lo, I& hi) {  // 16 bytes -> 32 codes as int16
    __m128i b = _mm_loadu_si128((const __m128i*)p);
    if (SYM) b = _mm_xor_si128(b, _mm_set1_epi8((char)0x88));  // both nibbles xor 8, before widening: one op
    const I v = _mm256_cvtepu8_epi16(b);
    lo = _mm256_and_si256(v, _mm256_set1_epi16(15));
    hi = _mm256_srli_epi16(v, 4);  // (a widened byte: nothing above its high nibble)
  }
  typedef __m128i T4;  // see V512::load_l4: 16 bytes -> the values of 16 low and 16 high nibbles
  static inline T4 lut4(const int8_t* t) { return _mm_loadu_si128((const __m128i*)t); }
  static inline void load_l4(const uint8_t* p, T4 tbl, I& lo, I& hi) {
    const __m128i b = _mm_loadu_si128((const __m128i*)p), m = _mm_set1_epi8(15);
    lo = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(tbl, _mm_and_si128(b, m)));
    hi = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(tbl, _mm_and_si128(_mm_srli_epi16(b, 4), m)));
  }
  static inline I dp16(I acc, I a, I b) {
    if constexpr (VN == 1) return _mm256_dpwssd_avx_epi32(acc, a, b);
    else if constexpr (VN == 2) return _mm256_dpwssd_epi32(acc, a, b);
    else return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
  }
  static inline I dp8(I acc, I u, I s) {
    if constexpr (VN == 1) return _mm256_dpbusd_avx_epi32(acc, u, s);
    else if constexpr (VN == 2) return _mm256_dpbusd_epi32(acc, u, s);
    else return acc;  // never used: u8s8_fn returns null without VNNI
  }
  template <bool SYM>
  static inline void split_u4(I v, I& lo, I& hi) {  // see V512
    const I m15 = _mm256_set1_epi8(15);
    lo = _mm256_and_si256(v, m15);
    hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
    if (SYM) {
      const I m8 = _mm256_set1_epi8(8);
      lo = _mm256_xor_si256(lo, m8);
      hi = _mm256_xor_si256(hi, m8);
    }
  }
  static inline I slli32(I a, int n) { return _mm256_slli_epi32(a, n); }
  static inline I lane0(int32_t v) { return _mm256_setr_epi32(v, 0, 0, 0, 0, 0, 0, 0); }
  static inline I lanes4(const int32_t* v) { return _mm256_setr_epi32(v[0], 0, 0, 0, v[1], 0, 0, 0); }  // see V512
  static inline F scales4(const float* s) {  // two floats loaded at once, each spread over 4 lanes
    const __m256 v = _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd((const double*)s)));
    return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  }
  static inline void prefetch(const void* p) { _mm_prefetch((const char*)p, _MM_HINT_T0); }
  static inline F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static inline F set1_ps(float v) { return _mm256_set1_ps(v); }
  static inline float hsum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline int32_t hsum_i(I a) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
  }
  // activation quantization (8 floats per vector)
  static constexpr int LF = 8;
  static inline void bf16_pairs(const uint16_t* p, F& even, F& odd) {  // see V512
    const __m256i v = _mm256_loadu_si256((const __m256i*)p);
    even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
  }
  static inline F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static inline void storef(float* p, F a) { _mm256_storeu_ps(p, a); }
  static inline F loadf_m(const float* p, const uint16_t*, const int32_t* vec) {  // see V512 (vmaskmovps: no faults)
    return _mm256_maskload_ps(p, _mm256_loadu_si256((const __m256i*)vec));
  }
  static inline void storef_n(float* p, F a, int64_t n) {
    _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), a);
  }
  static inline F loadbf(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  // see V512 (no masked 16- and 8-bit moves in AVX2: those go through a small buffer)
  static inline __m256i first_n(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline F loadf_n(const float* p, int64_t n) { return _mm256_maskload_ps(p, first_n(n)); }
  static constexpr bool PERM = false;  // (no masked two-source permutes: the depthwise kernel's masked loads)
  static inline F loadbf_n(const uint16_t* p, int64_t n) {
    uint16_t b[8] = {};
    for (int64_t i = 0; i < n; i++) b[i] = p[i];
    return loadbf(b);
  }
  static inline void store_s16_n(int16_t* p, I a, int64_t n) {
    int16_t b[8];
    store_s16(b, a);
    for (int64_t i = 0; i < n; i++) p[i] = b[i];
  }
  static inline void store_u8_n(uint8_t* p, I a, int64_t n) {
    uint8_t b[8];
    store_u8(b, a);
    for (int64_t i = 0; i < n; i++) p[i] = b[i];
  }
  static inline F absf(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static inline F maxf(F a, F b) { return _mm256_max_ps(a, b); }
  static inline F minf(F a, F b) { return _mm256_min_ps(a, b); }
  static inline F mulf(F a, F b) { return _mm256_mul_ps(a, b); }
  static inline F addf(F a, F b) { return _mm256_add_ps(a, b); }
  static inline F divf(F a, F b) { return _mm256_div_ps(a, b); }
  static inline bool finite(F a) {
    return _mm256_movemask_ps(_mm256_cmp_ps(absf(a), _mm256_set1_ps(3.40282347e38f), _CMP_LE_OQ)) == 0xFF;
  }
  static inline float hmax(F a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  static inline float hmin(F a) {
    __m128 s = _mm_min_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_min_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_min_ss(s, _mm_movehdup_ps(s)));
  }
  static inline I cvt_rne(F a) { return _mm256_cvtps_epi32(a); }
  static inline I set1_i(int32_t v) { return _mm256_set1_epi32(v); }
  static inline I sub_zx_i(I acc, int32_t z, I colsum) {
    return _mm256_sub_epi32(acc, _mm256_mullo_epi32(_mm256_set1_epi32(z), colsum));
  }
  static inline I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  static inline I clamp_i(I a, I lo, I hi) { return _mm256_min_epi32(_mm256_max_epi32(a, lo), hi); }
  static inline void store_s16(int16_t* p, I a) {  // 8 int32 (in range) -> 8 int16
    const __m256i q = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, a), 0xD8);
    _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(q));
  }
  static inline void store_u8(uint8_t* p, I a) {  // 8 int32 in [0, 255] -> 8 bytes
    const __m128i w = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packs_epi32(a, a), 0xD8));
    _mm_storel_epi64((__m128i*)p, _mm_packus_epi16(w, w));
  }
};

// 128-bit registers, only for the 4-bit products of groups of 16 values (NVFP4, int4:g16): the wider steps read
// 32 or 64 values of one group at a time. What tile_u4 and S16U4 / S16L4 use, nothing more.
struct V128 {
  typedef __m128i I;
  typedef __m128 F;
  static constexpr int KU4 = 16, MR4 = 2, NR4 = 2, MRW = 0, NRW = 0, NR1 = 2;  // (no widened rows: groups of 16 are rare)
  static inline I zero_i() { return _mm_setzero_si128(); }
  static inline F zero_ps() { return _mm_setzero_ps(); }
  static inline I load_s16(const int16_t* p) { return _mm_loadu_si128((const __m128i*)p); }
  template <bool SYM>
  static inline void load_u4(const uint8_t* p, I& lo, I& hi) {  // 8 bytes -> 16 codes as int16 (see V256)
    I b = _mm_loadl_epi64((const __m128i*)p);
    if (SYM) b = _mm_xor_si128(b, _mm_set1_epi8((char)0x88));
    const I v = _mm_cvtepu8_epi16(b);
    lo = _mm_and_si128(v, _mm_set1_epi16(15));
    hi = _mm_srli_epi16(v, 4);
  }
  typedef __m128i T4;
  static inline T4 lut4(const int8_t* t) { return _mm_loadu_si128((const __m128i*)t); }
  static inline void load_l4(const uint8_t* p, T4 tbl, I& lo, I& hi) {  // 8 bytes -> 8 low, 8 high nibbles' values
    const __m128i b = _mm_loadl_epi64((const __m128i*)p), m = _mm_set1_epi8(15);
    lo = _mm_cvtepi8_epi16(_mm_shuffle_epi8(tbl, _mm_and_si128(b, m)));
    hi = _mm_cvtepi8_epi16(_mm_shuffle_epi8(tbl, _mm_and_si128(_mm_srli_epi16(b, 4), m)));
  }
  static inline I dp16(I acc, I a, I b) { return _mm_add_epi32(acc, _mm_madd_epi16(a, b)); }
  static inline I lane0(int32_t v) { return _mm_setr_epi32(v, 0, 0, 0); }
  static inline void prefetch(const void* p) { _mm_prefetch((const char*)p, _MM_HINT_T0); }
  static inline F cvt(I a) { return _mm_cvtepi32_ps(a); }
  static inline F fma(F a, F b, F c) { return _mm_fmadd_ps(a, b, c); }
  static inline F set1_ps(float v) { return _mm_set1_ps(v); }
  static inline float hsum(F a) {
    __m128 s = _mm_add_ps(a, _mm_movehl_ps(a, a));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
