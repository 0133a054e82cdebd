// The integer engine's MEAN sums (mixprec/integer/ops/mean.py) in C++: an int8 or int16 tensor viewed
// as [outer, middle, inner] (the reduced axes contiguous in the middle) summed over the middle axis
// into int32 [outer, inner]. Exact: the caller bounds the middle axis (2^23 int8 or 2^16 int16
// elements per sum) so that no sum leaves int32. Outer rows are split over PyTorch's OpenMP threads.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "split_rows.h"

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

template <typename In>
void sum_middle(const In* x, int64_t outer, int64_t middle, int64_t inner, int32_t* out) {
  mixprec::split_rows(outer, outer * middle * inner, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      int32_t* acc = out + o * inner;
      const In* rows = x + o * middle * inner;
      int64_t first = 0;  // inner positions from here on take the plain loop
#if defined(__AVX512F__) && defined(__AVX512BW__)
      // 64 positions at a time in four registers over all rows (the plain loop kept its sums in memory)
      for (; first + 64 <= inner; first += 64) {
        __m512i sums[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                           _mm512_setzero_si512()};
        for (int64_t m = 0; m < middle; ++m) {
          const In* row = rows + m * inner + first;
          for (int k = 0; k < 4; ++k) sums[k] = _mm512_add_epi32(sums[k], widen16(row + 16 * k));
        }
        for (int k = 0; k < 4; ++k) _mm512_storeu_si512(acc + first + 16 * k, sums[k]);
      }
#endif
      std::fill(acc + first, acc + inner, 0);
      for (int64_t m = 0; m < middle; ++m) {
        const In* row = rows + m * inner;
        for (int64_t i = first; i < inner; ++i) acc[i] += row[i];  // vectorizes: contiguous in both
      }
    }
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("tflite_sum_middle(Tensor x) -> Tensor");
}

// Under the CPU dispatch key, paired with its shape-only implementation (mixprec/kernels/fake_ops.py).
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("tflite_sum_middle", &tflite_sum_middle);
}
