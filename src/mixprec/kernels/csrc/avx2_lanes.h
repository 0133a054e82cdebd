// Helpers of the 8-lane (AVX2 + FMA) loops that run where AVX-512 is absent: a fixed-order sum of
// a vector's lanes and the signed int4 code table, shared by the w8 and w4 weight-only kernels.
#pragma once

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define MIXPREC_AVX2_LANES 1
#include <immintrin.h>

namespace mixprec::avx2 {

// (l0 + l4) + (l2 + l6) + ((l1 + l5) + (l3 + l7)), in that tree whatever the input: a sum's bits
// depend on its lanes only.
inline float sum_lanes(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

// Byte i (0..15) holds the two's complement int4 code i as an int8: the table for _mm_shuffle_epi8.
inline __m128i int4_code_bytes() { return _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1); }

// Float32 lanes of the 8 int8 values in the low half of `codes`.
inline __m256 low8_to_floats(__m128i codes) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes)); }

// Float32 lanes of the 8 int8 values in the high half of `codes`.
inline __m256 high8_to_floats(__m128i codes) { return low8_to_floats(_mm_unpackhi_epi64(codes, codes)); }

}  // namespace mixprec::avx2
#endif
