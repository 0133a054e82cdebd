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

  // 16 pairs of codes (int32 lanes): floor(g) clamped to the activation range; g and the flagged lanes through the
  // pointers.
  __m512i estimate(__m512i a, __m512i b, __m512* g_out, __mmask16* flagged) const {
    const __m512 g = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), alpha, _mm512_fmadd_ps(_mm512_cvtepi32_ps(b), beta, c));
    const __m512 whole = _mm512_roundscale_ps(g, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 fraction = _mm512_sub_ps(g, whole);  // exact; 0 from |g| >= 2^23 on
    *flagged = _mm512_cmp_ps_mask(fraction, low, _CMP_LT_OQ) | _mm512_cmp_ps_mask(fraction, high, _CMP_GT_OQ) |
               _mm512_cmp_ps_mask(g, g, _CMP_UNORD_Q);
    *g_out = g;
    return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(whole, act_min), act_max));
  }
};

// The lookup of codes [begin, end): 16 at a time by the estimate, the flagged lanes and the tail from the table.
inline void lookup_range(const uint8_t* x, const uint8_t* y, const int8_t* codes, const AddFit& fit, int64_t begin,
                  int64_t end, int8_t* o) {
  const __m512i flip = _mm512_set1_epi32(0x80);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m512i xs = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    const __m512i ys = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(y + i)));
    const __m512i a = _mm512_xor_si512(xs, flip), b = _mm512_xor_si512(ys, flip);  // the codes + 128
    __m512 g;
    __mmask16 flagged;
    __m512i out = fit.estimate(_mm512_sub_epi32(a, flip), _mm512_sub_epi32(b, flip), &g, &flagged);
    if (flagged) {
      const __m512i got = _mm512_mask_i32gather_epi32(out, flagged, _mm512_or_si512(_mm512_slli_epi32(a, 8), b), codes, 1);
      out = _mm512_mask_mov_epi32(out, flagged, _mm512_srai_epi32(_mm512_slli_epi32(got, 24), 24));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), _mm512_cvtepi32_epi8(out));
  }
  for (; i < end; ++i) o[i] = codes[((x[i] ^ 0x80) << 8) | (y[i] ^ 0x80)];
}
#endif

}  // namespace mixprec
