// gemmlowp's double-rounding MultiplyByQuantizedMultiplier, which LiteRT's int8 kernels rescale with
// (SaturatingRoundingDoublingHighMul, then RoundingDivideByPOT: ties away from zero in both), on one int32
// and on 16 lanes; shared by the integer engine's kernels (tflite_conv.cpp, tflite_reduce.cpp).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace mixprec {

// Whether a multiplier and shift have gemmlowp's fixed-point form: multiplier in [0, 2^31), shift in [-31, 30].
inline bool fixed_point_in_range(int64_t multiplier, int64_t shift) {
  return multiplier >= 0 && multiplier <= std::numeric_limits<int32_t>::max() && shift >= -31 && shift <= 30;
}

inline int32_t srdhm(int32_t a, int32_t b) {
  if (a == std::numeric_limits<int32_t>::min() && b == std::numeric_limits<int32_t>::min()) {
    return std::numeric_limits<int32_t>::max();
  }
  const int64_t product = static_cast<int64_t>(a) * b;
  const int64_t nudge = product >= 0 ? (int64_t{1} << 30) : (1 - (int64_t{1} << 30));
  return static_cast<int32_t>((product + nudge) / (int64_t{1} << 31));  // C++ division: toward zero
}

inline int32_t rounding_divide_by_pot(int32_t x, int exponent) {
  const int32_t mask = static_cast<int32_t>((int64_t{1} << exponent) - 1);
  const int32_t remainder = x & mask;
  const int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
  return (x >> exponent) + (remainder > threshold ? 1 : 0);
}

inline int32_t requantize(int32_t acc, int32_t multiplier, int32_t shift) {
  const int left = shift > 0 ? shift : 0, right = shift > 0 ? 0 : -shift;
  const int64_t shifted = static_cast<int64_t>(acc) * (int64_t{1} << left);
  const int32_t saturated = static_cast<int32_t>(std::clamp<int64_t>(
      shifted, std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()));
  return rounding_divide_by_pot(srdhm(saturated, multiplier), right);
}

// 2^e as a double, exactly std::ldexp(1.0, e) (a normal number's bits for -1022 <= e <= 1023), without the
// library call: the rescale tables take two per channel on every call.
inline double power_of_two(int e) {
  if (e < -1022 || e > 1023) return std::ldexp(1.0, e);
  const uint64_t bits = static_cast<uint64_t>(e + 1023) << 52;
  double value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// The int8 rescale plus output offset in float32, exact where it is used (the convolutions' vector stores, 16 lanes
// with AVX-512, 8 with AVX2). With a right shift R = -shift >= 0, requantize() + offset is floor(X) for X = V + c,
// V = total * m / 2^(31 + R) and c = offset + 1/2 + 2^-(R+1) - [p < -2^30] 2^-R (p = total * m; for R = 0 just
// offset + 1/2): srdhm is floor((p + 2^30) / 2^31), RoundingDivideByPOT floor((q + 2^(R-1) - [q < 0]) / 2^R), and
// nested floor divisions of integers compose. A left shift L is R = 0 with V = total * m * 2^(L - 31) (where total *
// 2^L saturates, |V| >= m >= 2^30 clamps the same way). The sign term is taken from total < 0, the same as p < -2^30
// except for total = -1 with m = 2^30, where both give floor(1/2 - 2^-R) = floor(1/2) = 0 for R > 0. In float32,
// g = fma(float(total), scale, base or base_negative) = fma(float(total), float(m / 2^(31 + R)), float(c + e)) with
// e = kFloorMargin = 2^-14: where it matters (|g| <= 129, so |V| <= 258) the two operand roundings and the fma's cost
// |V| 2^-23 + |g| 2^-24 and c's 2^-17, together under 3/4 e. So floor(g) = floor(X) wherever g's fraction g -
// floor(g) is at least 2e; lanes within 2e above a whole number (about one in 8,000, and every lane with |g| >=
// 2^23, whose fraction is 0) take the integer rescale instead. Where |X| > 129 floor(g) may be off by the larger
// error, but it lies past the int8 range on the same side as floor(X), so saturating to int8 and the activation
// clamp, which every caller applies, give the same code. Multipliers outside {0} u [2^30, 2^31) (never written by
// quantize_multiplier) always take the integer one (floor_rescale_fits).
constexpr float kFloorMargin = 1.0f / 16384;

struct FloorRescale {
  float scale, base, base_negative;  // float(m / 2^(31 + R)), float(c + e) for total >= 0 and for total < 0
};

inline bool floor_rescale_fits(int32_t multiplier) { return multiplier == 0 || multiplier >= (int32_t{1} << 30); }

inline FloorRescale floor_rescale(int32_t multiplier, int32_t shift, int32_t output_offset) {
  const int64_t right = shift > 0 ? 0 : -int64_t{shift};
  const double tie = right > 0 ? power_of_two(static_cast<int>(-right - 1)) : 0.0;
  const double base = output_offset + 0.5 + tie + kFloorMargin;
  return {static_cast<float>(static_cast<double>(multiplier) * power_of_two(static_cast<int>(shift - 31))),
          static_cast<float>(base), static_cast<float>(base - 2 * tie)};
}

#if defined(__AVX512F__) && defined(__AVX512BW__)

// gemmlowp's SaturatingRoundingDoublingHighMul of 16 lanes by multipliers in [0, 2^31) (so the single
// overflowing case a = b = -2^31 cannot occur). For a 64-bit
// product p, (p + nudge) / 2^31 toward zero with the nudge 2^30 (p >= 0) or 1 - 2^30 (p < 0) equals
// floor((p + 2^30) / 2^31) in both cases, one arithmetic shift: the even and the odd lanes' products.
inline __m512i srdhm16(__m512i a, __m512i b) {
  const __m512i half = _mm512_set1_epi64(int64_t{1} << 30);
  const __m512i even = _mm512_srai_epi64(_mm512_add_epi64(_mm512_mul_epi32(a, b), half), 31);
  const __m512i odd = _mm512_srai_epi64(
      _mm512_add_epi64(_mm512_mul_epi32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32)), half), 31);
  return _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// requantize() on 16 lanes: saturating left shift, srdhm, RoundingDivideByPOT, all per lane.
inline __m512i requantize16(__m512i acc, __m512i multiplier, __m512i shift) {
  const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi32(1);
  const __m512i left = _mm512_max_epi32(shift, zero), right = _mm512_max_epi32(_mm512_sub_epi32(zero, shift), zero);
  __m512i shifted = acc;
  if (_mm512_cmpgt_epi32_mask(left, zero)) {  // rare: multipliers above 1
    shifted = _mm512_sllv_epi32(acc, left);
    const __mmask16 overflow = _mm512_cmpneq_epi32_mask(_mm512_srav_epi32(shifted, left), acc);
    const __mmask16 negative = _mm512_cmplt_epi32_mask(acc, zero);
    shifted = _mm512_mask_mov_epi32(shifted, overflow & ~negative,
                                    _mm512_set1_epi32(std::numeric_limits<int32_t>::max()));
    shifted = _mm512_mask_mov_epi32(shifted, overflow & negative,
                                    _mm512_set1_epi32(std::numeric_limits<int32_t>::min()));
  }
  const __m512i x = srdhm16(shifted, multiplier);
  const __m512i mask = _mm512_sub_epi32(_mm512_sllv_epi32(one, right), one);
  const __m512i remainder = _mm512_and_si512(x, mask);
  const __m512i threshold = _mm512_mask_add_epi32(_mm512_srli_epi32(mask, 1), _mm512_cmplt_epi32_mask(x, zero),
                                                  _mm512_srli_epi32(mask, 1), one);
  return _mm512_mask_add_epi32(_mm512_srav_epi32(x, right), _mm512_cmpgt_epi32_mask(remainder, threshold),
                               _mm512_srav_epi32(x, right), one);
}
#endif

// The per-tensor rescale of a code-producing op on 16 int32 lanes or one value: clamp(requantize(x) + offset, low,
// high), stored as int8 or int16 codes.
class CodeRescale {
 public:
  CodeRescale(int32_t multiplier, int32_t shift, int32_t offset, int32_t low, int32_t high)
      : multiplier_(multiplier), shift_(shift), offset_(offset), low_(low), high_(high)
#if defined(__AVX512F__) && defined(__AVX512BW__)
        , m_(_mm512_set1_epi32(multiplier)), s_(_mm512_set1_epi32(shift)), z_(_mm512_set1_epi32(offset)),
        lo_(_mm512_set1_epi32(low)), hi_(_mm512_set1_epi32(high))
#endif
  {}

#if defined(__AVX512F__) && defined(__AVX512BW__)
  template <typename Out>
  void store16(__m512i x, Out* dst) const {
    const __m512i codes = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(requantize16(x, m_, s_), z_), lo_), hi_);
    if constexpr (sizeof(Out) == 1) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(codes));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(codes));
    }
  }
#endif

  template <typename Out>
  void store1(int32_t x, Out* dst) const {
    const int64_t code = int64_t{requantize(x, multiplier_, shift_)} + offset_;
    *dst = static_cast<Out>(std::clamp<int64_t>(code, low_, high_));
  }

 private:
  int32_t multiplier_, shift_, offset_, low_, high_;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  __m512i m_, s_, z_, lo_, hi_;
#endif
};

}  // namespace mixprec
