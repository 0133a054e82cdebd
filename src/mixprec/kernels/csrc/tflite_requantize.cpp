// The integer engine's QUANTIZE between two int8 / int16 grids, and float32 NCHW images onto a graph's NHWC input
// grid. QUANTIZE between grids (mixprec/integer/ops/conversions.py,
// LiteRT's Requantize) in C++: clamp(MBQM(q + input_offset, multiplier, shift) + output_offset, lo, hi)
// per element, [lo, hi] the output type's range, MBQM gemmlowp's double rounding (tflite_rescale.h).
// Elementwise, on the calling thread (memory-bound: a few microseconds per 10^4 elements).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include "tflite_rescale.h"

namespace {

template <typename In, typename Out>
void requantize_all(const In* x, int64_t count, int32_t input_offset, int32_t multiplier, int32_t shift,
                    int32_t output_offset, Out* out) {
  const mixprec::CodeRescale rescale(multiplier, shift, output_offset, std::numeric_limits<Out>::min(),
                                     std::numeric_limits<Out>::max());
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512i offset = _mm512_set1_epi32(input_offset);
  for (; i + 16 <= count; i += 16) {
    __m512i codes;
    if constexpr (sizeof(In) == 1) {
      codes = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
    } else {
      codes = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)));
    }
    rescale.store16(_mm512_add_epi32(codes, offset), out + i);
  }
#endif
  for (; i < count; ++i) rescale.store1(int32_t{x[i]} + input_offset, out + i);
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
  TORCH_CHECK(mixprec::fixed_point_in_range(multiplier, shift),
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

// float32 NCHW -> the graph input's NHWC int8 / int16 codes (mixprec Quantization.nearest_codes):
// clamp(round_half_even(double(x) / scale) + zero_point, lo, hi), the quotient in double as numpy's; infinities
// saturate, NaN (which has no code) is refused.
at::Tensor tflite_quantize_nchw(const at::Tensor& x, double scale, int64_t zero_point, bool wide) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 4 && x.is_contiguous(),
              "x must be a contiguous float32 NCHW tensor");
  TORCH_CHECK(scale > 0 && std::isfinite(scale), "the scale must be positive and finite");
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  auto out = at::empty({n, x.size(2), x.size(3), c}, x.options().dtype(wide ? at::kShort : at::kChar));
  const float* src = x.data_ptr<float>();
  const double low = wide ? -32768.0 : -128.0, high = wide ? 32767.0 : 127.0;
  bool finite_or_inf = true;
  std::vector<int32_t> plane_codes(static_cast<size_t>(hw));
  for (int64_t sample = 0; sample < n; ++sample) {
    for (int64_t channel = 0; channel < c; ++channel) {
      const float* plane = src + (sample * c + channel) * hw;
      int64_t i = 0;
#if defined(__AVX512F__)
      // 8 at a time, the same operations in double: the quotient, round half to even, + zero point, the clamp
      const __m512d vs = _mm512_set1_pd(scale), vz = _mm512_set1_pd(static_cast<double>(zero_point));
      const __m512d vlo = _mm512_set1_pd(low), vhi = _mm512_set1_pd(high);
      for (; i + 8 <= hw; i += 8) {
        const __m512d v = _mm512_cvtps_pd(_mm256_loadu_ps(plane + i));
        finite_or_inf &= _mm512_cmp_pd_mask(v, v, _CMP_UNORD_Q) == 0;
        const __m512d rounded =
            _mm512_roundscale_pd(_mm512_div_pd(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512d code = _mm512_min_pd(_mm512_max_pd(_mm512_add_pd(rounded, vz), vlo), vhi);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(plane_codes.data() + i), _mm512_cvtpd_epi32(code));
      }
#endif
      for (; i < hw; ++i) {
        const double v = static_cast<double>(plane[i]);
        finite_or_inf &= !std::isnan(v);
        plane_codes[i] = static_cast<int32_t>(
            std::clamp(std::nearbyint(v / scale) + static_cast<double>(zero_point), low, high));
      }
      if (wide) {
        int16_t* dst = out.data_ptr<int16_t>() + sample * hw * c + channel;
        for (int64_t k = 0; k < hw; ++k) dst[k * c] = static_cast<int16_t>(plane_codes[k]);
      } else {
        int8_t* dst = out.data_ptr<int8_t>() + sample * hw * c + channel;
        for (int64_t k = 0; k < hw; ++k) dst[k * c] = static_cast<int8_t>(plane_codes[k]);
      }
    }
  }
  TORCH_CHECK(finite_or_inf, "x holds NaN, which has no code");
  return out;
}

// int8 / int16 codes -> float32 values: float((double(q) - zero_point) * scale), as Quantization.values_of
// rounded to float32 (the product of a code difference and a float32 scale is exact in double).
at::Tensor tflite_dequantize(const at::Tensor& q, double scale, int64_t zero_point) {
  TORCH_CHECK((q.scalar_type() == at::kChar || q.scalar_type() == at::kShort) && q.is_contiguous(),
              "q must be a contiguous int8 or int16 tensor");
  auto out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  const auto zero = static_cast<double>(zero_point);
  const int64_t count = q.numel();
  if (q.scalar_type() == at::kChar) {
    const int8_t* src = q.data_ptr<int8_t>();
    for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<float>((static_cast<double>(src[i]) - zero) * scale);
  } else {
    const int16_t* src = q.data_ptr<int16_t>();
    for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<float>((static_cast<double>(src[i]) - zero) * scale);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("tflite_dequantize(Tensor q, float scale, int zero_point) -> Tensor");
  m.def("tflite_quantize_nchw(Tensor x, float scale, int zero_point, bool wide) -> Tensor");
  m.def("tflite_requantize(Tensor x, int input_offset, int multiplier, int shift, int output_offset, bool wide) "
        "-> Tensor");
}

// Under the CPU dispatch key, paired with its shape-only implementation (mixprec/kernels/fake_ops.py).
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("tflite_requantize", &tflite_requantize);
  m.impl("tflite_quantize_nchw", &tflite_quantize_nchw);
  m.impl("tflite_dequantize", &tflite_dequantize);
}
