// The integer engine's ADD of two same-shaped int8 / int16 tensors (mixprec/integer/ops/elementwise.py,
// LiteRT's reference_integer_ops::Add) in C++, per element:
//   a' = MBQM((a + a_offset) * 2^left_shift, a_multiplier, a_shift)   (likewise b')
//   out = clamp(MBQM(a' + b', output_multiplier, output_shift) + output_offset, act_min, act_max)
// MBQM gemmlowp's double rounding (tflite_rescale.h); left_shift 20 (int8) or 15 (int16); every
// intermediate fits int32 (|a + a_offset| <= 255: 255 * 2^20 < 2^28; int16: 2^15 * 2^15 = 2^30).
// Elementwise; large tensors split in contiguous ranges over PyTorch's threads.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "split_rows.h"
#include "tflite_rescale.h"

namespace {

struct AddRecord {
  int32_t a_offset, b_offset, a_multiplier, a_shift, b_multiplier, b_shift, left_shift;
};

template <typename Code>
void add_range(const Code* a, const Code* b, int64_t begin, int64_t end, const AddRecord& r,
               const mixprec::CodeRescale& output, Code* out) {
  int64_t i = begin;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512i a_off = _mm512_set1_epi32(r.a_offset), b_off = _mm512_set1_epi32(r.b_offset);
  const __m512i a_m = _mm512_set1_epi32(r.a_multiplier), a_s = _mm512_set1_epi32(r.a_shift);
  const __m512i b_m = _mm512_set1_epi32(r.b_multiplier), b_s = _mm512_set1_epi32(r.b_shift);
  const auto widen = [](const Code* p) {
    if constexpr (sizeof(Code) == 1) {
      return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    } else {
      return _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
  };
  for (; i + 16 <= end; i += 16) {
    const __m512i sa = _mm512_slli_epi32(_mm512_add_epi32(widen(a + i), a_off), r.left_shift);
    const __m512i sb = _mm512_slli_epi32(_mm512_add_epi32(widen(b + i), b_off), r.left_shift);
    const __m512i total = _mm512_add_epi32(mixprec::requantize16(sa, a_m, a_s), mixprec::requantize16(sb, b_m, b_s));
    output.store16(total, out + i);
  }
#endif
  for (; i < end; ++i) {
    const int32_t sa = (int32_t{a[i]} + r.a_offset) * (int32_t{1} << r.left_shift);
    const int32_t sb = (int32_t{b[i]} + r.b_offset) * (int32_t{1} << r.left_shift);
    output.store1(mixprec::requantize(sa, r.a_multiplier, r.a_shift) + mixprec::requantize(sb, r.b_multiplier,
                                                                                          r.b_shift),
                  out + i);
  }
}

// body(begin, end) over contiguous ranges of `count` elements, blocks of kBlock handed to PyTorch's threads when the
// work (about kOpsPerElement vector instructions per element) is large enough.
template <typename Body>
void for_element_blocks(int64_t count, const Body& body) {
  constexpr int64_t kBlock = 4096;
  constexpr int64_t kOpsPerElement = 16;  // tflite_add: three rescales and the adds; the lookup: a gather's share
  const int64_t blocks = (count + kBlock - 1) / kBlock;
  mixprec::split_rows_balanced(blocks, count * kOpsPerElement, [&](int64_t first, int64_t last) {
    body(first * kBlock, std::min(count, last * kBlock));
  });
}

at::Tensor tflite_add(const at::Tensor& a, const at::Tensor& b, int64_t a_offset, int64_t b_offset,
                      int64_t a_multiplier, int64_t a_shift, int64_t b_multiplier, int64_t b_shift,
                      int64_t output_multiplier, int64_t output_shift, int64_t output_offset, int64_t act_min,
                      int64_t act_max) {
  TORCH_CHECK((a.scalar_type() == at::kChar || a.scalar_type() == at::kShort) && a.is_contiguous(),
              "a must be a contiguous int8 or int16 tensor");
  TORCH_CHECK(b.scalar_type() == a.scalar_type() && b.is_contiguous() && b.sizes() == a.sizes(),
              "b must be a contiguous tensor of a's type and shape");
  TORCH_CHECK(std::abs(a_offset) <= 255 && std::abs(b_offset) <= 255 && std::abs(output_offset) <= 255,
              "offsets must lie in [-255, 255]");
  TORCH_CHECK(mixprec::fixed_point_in_range(a_multiplier, a_shift) && a_shift <= 0 &&
                  mixprec::fixed_point_in_range(b_multiplier, b_shift) && b_shift <= 0 &&
                  mixprec::fixed_point_in_range(output_multiplier, output_shift) && output_shift <= 0,
              "multipliers must lie in [0, 2^31) with shifts in [-31, 0]");
  const bool wide = a.scalar_type() == at::kShort;
  const int64_t low = wide ? -32768 : -128, high = wide ? 32767 : 127;
  TORCH_CHECK(low <= act_min && act_min <= act_max && act_max <= high, "the activation range must lie within ",
              wide ? "int16" : "int8", " and not be empty");
  const AddRecord record{static_cast<int32_t>(a_offset),     static_cast<int32_t>(b_offset),
                         static_cast<int32_t>(a_multiplier), static_cast<int32_t>(a_shift),
                         static_cast<int32_t>(b_multiplier), static_cast<int32_t>(b_shift), wide ? 15 : 20};
  const mixprec::CodeRescale output(static_cast<int32_t>(output_multiplier), static_cast<int32_t>(output_shift),
                                    static_cast<int32_t>(output_offset), static_cast<int32_t>(act_min),
                                    static_cast<int32_t>(act_max));
  auto out = at::empty(a.sizes(), a.options());
  for_element_blocks(a.numel(), [&](int64_t begin, int64_t end) {
    if (wide) {
      add_range(a.data_ptr<int16_t>(), b.data_ptr<int16_t>(), begin, end, record, output, out.data_ptr<int16_t>());
    } else {
      add_range(a.data_ptr<int8_t>(), b.data_ptr<int8_t>(), begin, end, record, output, out.data_ptr<int8_t>());
    }
  });
  return out;
}

// out[i] = table[(a[i] + 128) * 256 + b[i] + 128] for int8 a, b: an int8 ADD whose 65,536 results were computed
// once (by tflite_add on every pair of codes), one gathered load per element instead of three rescales (0.34 ->
// 0.24 ms on 800k elements here). The table ends in 4 bytes of slack: each gather reads a dword at its entry.
constexpr int64_t kTableBytes = 65536 + 4;

at::Tensor tflite_add_lookup(const at::Tensor& a, const at::Tensor& b, const at::Tensor& table) {
  TORCH_CHECK(a.scalar_type() == at::kChar && a.is_contiguous(), "a must be a contiguous int8 tensor");
  TORCH_CHECK(b.scalar_type() == at::kChar && b.is_contiguous() && b.sizes() == a.sizes(),
              "b must be a contiguous int8 tensor of a's shape");
  TORCH_CHECK(table.scalar_type() == at::kChar && table.is_contiguous() && table.numel() == kTableBytes,
              "the table must be 65,540 contiguous int8 codes (one per pair of codes, then 4 bytes of slack)");
  auto out = at::empty(a.sizes(), a.options());
  const auto* x = reinterpret_cast<const uint8_t*>(a.data_ptr<int8_t>());
  const auto* y = reinterpret_cast<const uint8_t*>(b.data_ptr<int8_t>());
  const int8_t* codes = table.data_ptr<int8_t>();
  int8_t* o = out.data_ptr<int8_t>();
  for_element_blocks(a.numel(), [&](int64_t begin, int64_t end) {
    int64_t i = begin;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512i flip = _mm512_set1_epi32(0x80), byte = _mm512_set1_epi32(0xFF);
    for (; i + 16 <= end; i += 16) {
      const __m512i xs = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i)));
      const __m512i ys = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(y + i)));
      const __m512i index =
          _mm512_or_si512(_mm512_slli_epi32(_mm512_xor_si512(xs, flip), 8), _mm512_xor_si512(ys, flip));
      const __m512i got = _mm512_and_si512(_mm512_i32gather_epi32(index, codes, 1), byte);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), _mm512_cvtepi32_epi8(got));
    }
#endif
    for (; i < end; ++i) o[i] = codes[((x[i] ^ 0x80) << 8) | (y[i] ^ 0x80)];
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("tflite_add_lookup(Tensor a, Tensor b, Tensor table) -> Tensor");
  m.def("tflite_add(Tensor a, Tensor b, int a_offset, int b_offset, int a_multiplier, int a_shift, "
        "int b_multiplier, int b_shift, int output_multiplier, int output_shift, int output_offset, int act_min, "
        "int act_max) -> Tensor");
}

// Under the CPU dispatch key, paired with its shape-only implementation (mixprec/kernels/fake_ops.py).
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("tflite_add", &tflite_add);
  m.impl("tflite_add_lookup", &tflite_add_lookup);
}
