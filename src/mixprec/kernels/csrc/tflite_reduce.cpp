// The integer engine's MEAN (mixprec/integer/ops/mean.py) in C++: an int8 or int16 tensor viewed as
// [outer, middle, inner] (the reduced axes contiguous in the middle) summed over the middle axis into
// int32 [outer, inner] (tflite_sum_middle), or summed and rescaled into codes of its own type
// (tflite_mean_middle: LiteRT's QuantizedMeanOrSum, clamp(MBQM(sum - correction) + offset)). Exact: the
// caller bounds the middle axis (2^23 int8 or 2^16 int16 elements per sum) so that no sum leaves int32.
// Outer rows are split over PyTorch's OpenMP threads.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include "split_rows.h"
#include "tflite_rescale.h"

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 int8 or int16 codes widened to int32.
inline __m512i widen16(const int8_t* at) {
  return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
}
inline __m512i widen16(const int16_t* at) {
  return _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)));
}
#endif

// Sums over the middle axis of outer rows [begin, end), 64 inner positions at a time in registers: row o's
// int32 sums (inner of them) written to target(o), then handed to finish(o, sums).
template <typename In, typename Target, typename Finish>
void sum_rows(const In* x, int64_t begin, int64_t end, int64_t middle, int64_t inner, const Target& target,
              const Finish& finish) {
  for (int64_t o = begin; o < end; ++o) {
    int32_t* acc = target(o);
    const In* rows = x + o * middle * inner;
    int64_t first = 0;  // inner positions from here on take the plain loop
#if defined(__AVX512F__) && defined(__AVX512BW__)
    // 64 positions at a time in four registers over all rows (the plain loop kept its sums in memory)
    for (; first + 64 <= inner; first += 64) {
      __m512i total[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                          _mm512_setzero_si512()};
      for (int64_t m = 0; m < middle; ++m) {
        const In* row = rows + m * inner + first;
        for (int k = 0; k < 4; ++k) total[k] = _mm512_add_epi32(total[k], widen16(row + 16 * k));
      }
      for (int k = 0; k < 4; ++k) _mm512_storeu_si512(acc + first + 16 * k, total[k]);
    }
#endif
    std::fill(acc + first, acc + inner, 0);
    for (int64_t m = 0; m < middle; ++m) {
      const In* row = rows + m * inner;
      for (int64_t i = first; i < inner; ++i) acc[i] += row[i];  // vectorizes: contiguous in both
    }
    finish(o, acc);
  }
}

template <typename In>
void sum_middle(const In* x, int64_t outer, int64_t middle, int64_t inner, int32_t* out) {
  mixprec::split_rows_balanced(outer, outer * middle * inner, [&](int64_t begin, int64_t end) {
    sum_rows(x, begin, end, middle, inner, [&](int64_t o) { return out + o * inner; }, [](int64_t, const int32_t*) {});
  });
}

// MEAN's rescale of each row's sums: clamp(MBQM(sum - correction, multiplier, shift) + offset, low, high).
template <typename In>
void mean_middle(const In* x, int64_t outer, int64_t middle, int64_t inner, int32_t correction, int32_t multiplier,
                 int32_t shift, int32_t offset, int32_t low, int32_t high, In* out) {
  const mixprec::CodeRescale rescale(multiplier, shift, offset, low, high);
  mixprec::split_rows_balanced(outer, outer * middle * inner, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> sums(static_cast<size_t>(inner));
    sum_rows(x, begin, end, middle, inner, [&](int64_t) { return sums.data(); }, [&](int64_t o, const int32_t* row) {
      In* dst = out + o * inner;
      int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      const __m512i c = _mm512_set1_epi32(correction);
      for (; i + 16 <= inner; i += 16) rescale.store16(_mm512_sub_epi32(_mm512_loadu_si512(row + i), c), dst + i);
#endif
      for (; i < inner; ++i) rescale.store1(row[i] - correction, dst + i);
    });
  });
}

at::Tensor tflite_sum_middle(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3 && (x.scalar_type() == at::kChar || x.scalar_type() == at::kShort) && x.is_contiguous(),
              "x must be a contiguous int8 or int16 [outer, middle, inner] tensor");
  const int64_t limit = x.scalar_type() == at::kChar ? int64_t{1} << 23 : int64_t{1} << 16;
  TORCH_CHECK(x.size(1) <= limit, "the middle axis holds more elements than an exact int32 sum allows");
  auto out = at::empty({x.size(0), x.size(2)}, x.options().dtype(at::kInt));
  if (x.scalar_type() == at::kChar) {
    sum_middle(x.data_ptr<int8_t>(), x.size(0), x.size(1), x.size(2), out.data_ptr<int32_t>());
  } else {
    sum_middle(x.data_ptr<int16_t>(), x.size(0), x.size(1), x.size(2), out.data_ptr<int32_t>());
  }
  return out;
}

at::Tensor tflite_mean_middle(const at::Tensor& x, int64_t correction, int64_t multiplier, int64_t shift,
                              int64_t offset, int64_t low, int64_t high) {
  TORCH_CHECK(x.dim() == 3 && (x.scalar_type() == at::kChar || x.scalar_type() == at::kShort) && x.is_contiguous(),
              "x must be a contiguous int8 or int16 [outer, middle, inner] tensor");
  const bool narrow = x.scalar_type() == at::kChar;
  const int64_t limit = narrow ? int64_t{1} << 23 : int64_t{1} << 16, code_max = narrow ? 127 : 32767;
  TORCH_CHECK(x.size(1) <= limit, "the middle axis holds more elements than an exact int32 sum allows");
  TORCH_CHECK(mixprec::fixed_point_in_range(multiplier, shift),
              "the multiplier must lie in [0, 2^31) and the shift in [-31, 30]");
  TORCH_CHECK(std::abs(correction) <= (int64_t{1} << 31) - 1 - code_max * x.size(1),
              "sum - correction must stay inside int32");
  TORCH_CHECK(-code_max - 1 <= low && low <= high && high <= code_max, "the clamp must lie inside the code range");
  auto out = at::empty({x.size(0), x.size(2)}, x.options());
  const auto c = static_cast<int32_t>(correction), m = static_cast<int32_t>(multiplier);
  const auto s = static_cast<int32_t>(shift), z = static_cast<int32_t>(offset);
  const auto lo = static_cast<int32_t>(low), hi = static_cast<int32_t>(high);
  if (narrow) {
    mean_middle(x.data_ptr<int8_t>(), x.size(0), x.size(1), x.size(2), c, m, s, z, lo, hi, out.data_ptr<int8_t>());
  } else {
    mean_middle(x.data_ptr<int16_t>(), x.size(0), x.size(1), x.size(2), c, m, s, z, lo, hi, out.data_ptr<int16_t>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("tflite_sum_middle(Tensor x) -> Tensor");
  m.def("tflite_mean_middle(Tensor x, int correction, int multiplier, int shift, int offset, int low, int high) "
        "-> Tensor");
}

// Under the CPU dispatch key, paired with their shape-only implementations (mixprec/kernels/fake_ops.py).
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("tflite_sum_middle", &tflite_sum_middle);
  m.impl("tflite_mean_middle", &tflite_mean_middle);
}
