// The int8 rescale of 8 int32 totals on AVX2 + FMA (CPUs without AVX-512): the integer engine's convolutions store
// their codes through it. The same float32 arithmetic as the AVX-512 store (mixprec::FloorRescale, whose comment
// proves it exact): g = fma(float(total), scale, base), floor(g) where g's fraction is at least 2e, and the lanes
// nearer a whole number (about one in 8,000) or all lanes for multipliers outside FloorRescale's range redone by
// the scalar requantize(); then the output offset (in the base), the activation clamp, int8.
#pragma once

#include "avx2_lanes.h"

#if defined(MIXPREC_AVX2_LANES)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tflite_rescale.h"

namespace mixprec {

class Int8Store8 {
 public:
  // m, s: int32 multipliers and shifts per channel (per_channel) or one of each; the table covers channels / 8
  // whole blocks (one block for a single multiplier).
  Int8Store8(const int32_t* m, const int32_t* s, bool per_channel, int64_t channels, int32_t output_offset,
             int32_t act_min, int32_t act_max)
      : m_(m), s_(s), per_channel_(per_channel), output_offset_(output_offset), act_min_(act_min), act_max_(act_max),
        table_(static_cast<size_t>((per_channel ? channels / 8 : 1) * 24)), low_(_mm256_set1_epi32(act_min)),
        high_(_mm256_set1_epi32(act_max)) {
    fast_ = std::all_of(m, m + (per_channel ? channels : 1), floor_rescale_fits);
    for (int64_t c = 0; c < static_cast<int64_t>(table_.size() / 3); ++c) {
      const int64_t k = per_channel ? c : 0;
      const FloorRescale constants = floor_rescale(m[k], s[k], output_offset);
      float* v = table_.data() + (c / 8) * 24 + c % 8;
      v[0] = constants.scale;
      v[8] = constants.base;
      v[16] = constants.base_negative;
    }
  }

  // The 8 codes (offset added, clamped to the activation range) as int32 lanes, for totals whose first channel is
  // first_channel (a multiple of 8).
  __m256i rescale(__m256i total, int64_t first_channel) const {
    if (!fast_) return patch(total, first_channel, _mm256_setzero_si256(), 0xFF);
    const float* v = table_.data() + (per_channel_ ? first_channel / 8 : 0) * 24;
    const __m256 negative = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_setzero_si256(), total));
    const __m256 c = _mm256_blendv_ps(_mm256_loadu_ps(v + 8), _mm256_loadu_ps(v + 16), negative);
    const __m256 g = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_loadu_ps(v), c);
    const __m256 whole = _mm256_floor_ps(g);
    // g - floor(g) is exact except for g in (-1, 0) near 0, where it rounds toward 1: never below 2e either way
    const int near = _mm256_movemask_ps(
        _mm256_cmp_ps(_mm256_sub_ps(g, whole), _mm256_set1_ps(2 * kFloorMargin), _CMP_LT_OQ));
    const __m256i out = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(whole), low_), high_);
    return near ? patch(total, first_channel, out, near) : out;
  }

  // rescale() stored as 8 int8 codes at dst.
  void operator()(__m256i total, int64_t first_channel, int8_t* dst) const {
    const __m256i v = rescale(total, first_channel);
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packs_epi16(words, words));
  }

 private:
  // `out` with the lanes set in `lanes` rescaled by the scalar requantize().
  __m256i patch(__m256i total, int64_t first_channel, __m256i out, int lanes) const {
    alignas(32) int32_t totals[8], codes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(totals), total);
    _mm256_store_si256(reinterpret_cast<__m256i*>(codes), out);
    for (int i = 0; i < 8; ++i) {
      if (!(lanes >> i & 1)) continue;
      const int64_t k = per_channel_ ? first_channel + i : 0;
      const int64_t code = int64_t{requantize(totals[i], m_[k], s_[k])} + output_offset_;
      codes[i] = static_cast<int32_t>(std::clamp<int64_t>(code, act_min_, act_max_));
    }
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(codes));
  }

  const int32_t* m_;
  const int32_t* s_;
  bool per_channel_, fast_ = false;
  int32_t output_offset_, act_min_, act_max_;
  std::vector<float> table_;  // per block of 8 channels: the scales, c + e, c + e for negative totals
  __m256i low_, high_;
};

}  // namespace mixprec
#endif
