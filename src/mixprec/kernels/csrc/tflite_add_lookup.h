// The int8 ADD's lookup with its float32 estimate (see csrc/tflite_add.cpp, which fits and checks the estimate): shared
// by the ADD kernel and the convolutions that finish with an ADD (csrc/tflite_conv.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace mixprec {

constexpr int64_t kAddTableBytes = 65536 + 4;  // one code per pair of codes, then 4 bytes of slack for the gathers
constexpr int64_t kAddFitFloats = 7;            // alpha, beta, c, low, high, act_min, act_max

#if defined(__AVX512F__) && defined(__AVX512BW__)
struct AddFit {
  __m512 alpha, beta, c, low, high, act_min, act_max;

  explicit AddFit(const float* f)
      : alpha(_mm512_set1_ps(f[0])), beta(_mm512_set1_ps(f[1])), c(_mm512_set1_ps(f[2])), low(_mm512_set1_ps(f[3])),
        high(_mm512_set1_ps(f[4])), act_min(_mm512_set1_ps(f[5])), act_max(_mm512_set1_ps(f[6])) {}

  // 16 pairs of codes (int32 lanes): floor(g) clamped to the activation range (the clamp taken on g: the bounds
  // are whole numbers); g and the flagged lanes (fraction below low, NaN included, or above high) through the pointers.
  __attribute__((always_inline)) __m512i estimate(__m512i a, __m512i b, __m512* g_out, __mmask16* flagged) const {
    const __m512 g = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), alpha, _mm512_fmadd_ps(_mm512_cvtepi32_ps(b), beta, c));
    const __m512 fraction = _mm512_reduce_ps(g, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);  // g - floor(g), exact
    *flagged = _mm512_cmp_ps_mask(fraction, low, _CMP_NGE_UQ) | _mm512_cmp_ps_mask(fraction, high, _CMP_GT_OQ);
    *g_out = g;
    return _mm512_cvt_roundps_epi32(_mm512_min_ps(_mm512_max_ps(g, act_min), act_max),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  }
};

// 16 codes of x and y (bytes) from i on: their ADD, the flagged lanes read from the table (int32 lanes).
__attribute__((always_inline)) inline __m512i lookup16(const uint8_t* x, const uint8_t* y, const int8_t* codes,
                                                       const AddFit& fit, int64_t i) {
  const __m512i flip = _mm512_set1_epi32(0x80);
  const __m512i a = _mm512_xor_si512(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))),
                                     flip);  // the codes + 128
  const __m512i b = _mm512_xor_si512(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(y + i))),
                                     flip);
  __m512 g;
  __mmask16 flagged;
  const __m512i out = fit.estimate(_mm512_sub_epi32(a, flip), _mm512_sub_epi32(b, flip), &g, &flagged);
  if (!flagged) return out;
  const __m512i got = _mm512_mask_i32gather_epi32(out, flagged, _mm512_or_si512(_mm512_slli_epi32(a, 8), b), codes, 1);
  return _mm512_mask_mov_epi32(out, flagged, _mm512_srai_epi32(_mm512_slli_epi32(got, 24), 24));
}

#else
// Without AVX-512 there is no estimate: every code is read from the table.
struct AddFit {
  explicit AddFit(const float*) {}
};
#endif

// The lookup of codes [begin, end) into o (which may be x or y): with AVX-512 16 at a time by the estimate, the
// flagged lanes and the tail from the table; else all from the table.
__attribute__((always_inline)) inline void lookup_range(const uint8_t* x, const uint8_t* y, const int8_t* codes,
                                                        const AddFit& fit, int64_t begin, int64_t end, int8_t* o) {
  int64_t i = begin;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (; i + 16 <= end; i += 16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), _mm512_cvtepi32_epi8(lookup16(x, y, codes, fit, i)));
  }
#else
  (void)fit;
#endif
  for (; i < end; ++i) o[i] = codes[((x[i] ^ 0x80) << 8) | (y[i] ^ 0x80)];
}

}  // namespace mixprec
