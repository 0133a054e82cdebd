// The integer engine's QUANTIZE between two int8 / int16 grids (mixprec/integer/ops/conversions.py,
// LiteRT's Requantize) in C++: clamp(MBQM(q + input_offset, multiplier, shift) + output_offset, lo, hi)
// per element, [lo, hi] the output type's range, MBQM gemmlowp's double rounding (tflite_rescale.h).
// Elementwise, on the calling thread (memory-bound: a few microseconds per 10^4 elements).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>

#include "tflite_rescale.h"

namespace {

template <typename In, typename Out>
void requantize_all(const In* x, int64_t count, int32_t input_offset, int32_t multiplier, int32_t shift,
                    int32_t output_offset, Out* out) {
  constexpr int32_t low = std::numeric_limits<Out>::min(), high = std::numeric_limits<Out>::max();
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512i m = _mm512_set1_epi32(multiplier), s = _mm512_set1_epi32(shift);
  const __m512i in_off = _mm512_set1_epi32(input_offset), out_off = _mm512_set1_epi32(output_offset);
  const __m512i lo = _mm512_set1_epi32(low), hi = _mm512_set1_epi32(high);
  for (; i + 16 <= count; i += 16) {
    __m512i codes;
    if constexpr (sizeof(In) == 1) {
      codes = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    } else {
      codes = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)));
    }
    const __m512i scaled = mixprec::requantize16(_mm512_add_epi32(codes, in_off), m, s);
    const __m512i result = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(scaled, out_off), lo), hi);
    if constexpr (sizeof(Out) == 1) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(result));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi32_epi16(result));
    }
  }
#endif
  for (; i < count; ++i) {
    const int64_t code = int64_t{mixprec::requantize(int32_t{x[i]} + input_offset, multiplier, shift)} + output_offset;
    out[i] = static_cast<Out>(std::clamp<int64_t>(code, low, high));
  }
}

template <typename In>
void requantize_from(const at::Tensor& x, int32_t input_offset, int32_t multiplier, int32_t shift,
                     int32_t output_offset, at::Tensor& out) {
  if (out.scalar_type() == at::kChar) {
    requantize_all(x.data_ptr<In>(), x.numel(), input_offset, multiplier, shift, output_offset,
                   out.data_ptr<int8_t>());
  } else {
    requantize_all(x.data_ptr<In>(), x.numel(), input_offset, multiplier, shift, output_offset,
                   out.data_ptr<int16_t>());
  }
}

at::Tensor tflite_requantize(const at::Tensor& x, int64_t input_offset, int64_t multiplier, int64_t shift,
                             int64_t output_offset, bool wide) {
  TORCH_CHECK((x.scalar_type() == at::kChar || x.scalar_type() == at::kShort) && x.is_contiguous(),
              "x must be a contiguous int8 or int16 tensor");
  TORCH_CHECK(multiplier >= 0 && multiplier <= std::numeric_limits<int32_t>::max() && shift >= -31 && shift <= 30,
              "the multiplier must lie in [0, 2^31) and the shift in [-31, 30]");
  TORCH_CHECK(std::abs(input_offset) <= 65536 && std::abs(output_offset) <= 65536,
              "offsets must lie within the int16 range");
  auto out = at::empty(x.sizes(), x.options().dtype(wide ? at::kShort : at::kChar));
  const auto in_off = static_cast<int32_t>(input_offset), m = static_cast<int32_t>(multiplier);
  const auto s = static_cast<int32_t>(shift), out_off = static_cast<int32_t>(output_offset);
  if (x.scalar_type() == at::kChar) {
    requantize_from<int8_t>(x, in_off, m, s, out_off, out);
  } else {
    requantize_from<int16_t>(x, in_off, m, s, out_off, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("tflite_requantize(Tensor x, int input_offset, int multiplier, int shift, int output_offset, bool wide) "
        "-> Tensor");
}

// Under the CPU dispatch key, paired with its shape-only implementation (mixprec/kernels/fake_ops.py).
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("tflite_requantize", &tflite_requantize);
}
