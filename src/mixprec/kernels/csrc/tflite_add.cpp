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
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "split_rows.h"
#include "tflite_add_lookup.h"
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

// An ADD record's offsets and fixed-point multipliers (each below one: shifts <= 0).
void check_add_record(int64_t a_offset, int64_t b_offset, int64_t a_multiplier, int64_t a_shift, int64_t b_multiplier,
                      int64_t b_shift, int64_t output_multiplier, int64_t output_shift, int64_t output_offset) {
  TORCH_CHECK(std::abs(a_offset) <= 255 && std::abs(b_offset) <= 255 && std::abs(output_offset) <= 255,
              "offsets must lie in [-255, 255]");
  TORCH_CHECK(mixprec::fixed_point_in_range(a_multiplier, a_shift) && a_shift <= 0 &&
                  mixprec::fixed_point_in_range(b_multiplier, b_shift) && b_shift <= 0 &&
                  mixprec::fixed_point_in_range(output_multiplier, output_shift) && output_shift <= 0,
              "multipliers must lie in [0, 2^31) with shifts in [-31, 0]");
}

at::Tensor tflite_add(const at::Tensor& a, const at::Tensor& b, int64_t a_offset, int64_t b_offset,
                      int64_t a_multiplier, int64_t a_shift, int64_t b_multiplier, int64_t b_shift,
                      int64_t output_multiplier, int64_t output_shift, int64_t output_offset, int64_t act_min,
                      int64_t act_max) {
  TORCH_CHECK((a.scalar_type() == at::kChar || a.scalar_type() == at::kShort) && a.is_contiguous(),
              "a must be a contiguous int8 or int16 tensor");
  TORCH_CHECK(b.scalar_type() == a.scalar_type() && b.is_contiguous() && b.sizes() == a.sizes(),
              "b must be a contiguous tensor of a's type and shape");
  check_add_record(a_offset, b_offset, a_multiplier, a_shift, b_multiplier, b_shift, output_multiplier, output_shift,
                   output_offset);
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

// out[i] = table[(a[i] + 128) * 256 + b[i] + 128] for int8 a, b: an int8 ADD whose 65,536 results were computed once
// (by tflite_add on every pair of codes). Most elements are not read from the table but estimated: with the real
// multipliers r_a, r_b, r_out (multiplier * 2^shift / 2^31) the ADD is close to g = a alpha + b beta + c, alpha =
// 2^20 r_a r_out, beta = 2^20 r_b r_out, c = a_offset alpha + b_offset beta + output_offset + 1/2 (float32, one fma
// per operand), and its code is floor(g) clamped to the activation range, except where g lies near a whole number
// (the three rescales' roundings, float32's own). How near is not bounded on paper but measured: tflite_add_fit runs
// the estimate on all 65,536 pairs and sets margins so that every pair whose clamped floor(g) is not its code has a
// fraction g - floor(g) below `low` or above `high`; such lanes (flagged) read the table by a masked gather. The fit
// is then checked by running this kernel on all 65,536 pairs against the table; where that or the fit fails, every
// lane is flagged (low = 2: the table alone). So every pair of codes gives the table's code. The table alone: 0.24
// ms on 800k elements (a gather per 16 elements, about 29 cycles each here); see BENCHMARKS.md for the estimate's.

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The margins of fit's estimate against the table (see above): false where some pair's estimate is off by more
// than one code.
bool fit_margins(const int8_t* codes, float* f) {
  const mixprec::AddFit candidate(f);
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  float low = 0.0f, high = 1.0f;
  for (int32_t first = -128; first < 128; ++first) {
    for (int32_t second = -128; second < 128; second += 16) {
      __m512 g;
      __mmask16 flagged;
      alignas(64) int32_t estimate[16];
      alignas(64) float gs[16];
      const __m512i seconds = _mm512_add_epi32(_mm512_set1_epi32(second), lanes);
      _mm512_store_si512(estimate, candidate.estimate(_mm512_set1_epi32(first), seconds, &g, &flagged));
      _mm512_store_ps(gs, g);
      for (int lane = 0; lane < 16; ++lane) {
        const int32_t exact = codes[(first + 128) * 256 + second + lane + 128];
        const float fraction = gs[lane] - std::floor(gs[lane]);
        if (estimate[lane] == exact + 1) {
          low = std::max(low, std::nextafter(fraction, 2.0f));
        } else if (estimate[lane] == exact - 1) {
          high = std::min(high, std::nextafter(fraction, -1.0f));
        } else if (estimate[lane] != exact) {
          return false;
        }
      }
    }
  }
  f[3] = low;
  f[4] = high;
  return true;
}
#endif

at::Tensor tflite_add_lookup(const at::Tensor& a, const at::Tensor& b, const at::Tensor& table, const at::Tensor& fit) {
  TORCH_CHECK(a.scalar_type() == at::kChar && a.is_contiguous(), "a must be a contiguous int8 tensor");
  TORCH_CHECK(b.scalar_type() == at::kChar && b.is_contiguous() && b.sizes() == a.sizes(),
              "b must be a contiguous int8 tensor of a's shape");
  TORCH_CHECK(table.scalar_type() == at::kChar && table.is_contiguous() && table.numel() == mixprec::kAddTableBytes,
              "the table must be 65,540 contiguous int8 codes (one per pair of codes, then 4 bytes of slack)");
  TORCH_CHECK(fit.scalar_type() == at::kFloat && fit.is_contiguous() && fit.numel() == mixprec::kAddFitFloats,
              "the fit must be the 7 contiguous float32 values tflite_add_fit gives for this table");
  auto out = at::empty(a.sizes(), a.options());
  const auto* x = reinterpret_cast<const uint8_t*>(a.data_ptr<int8_t>());
  const auto* y = reinterpret_cast<const uint8_t*>(b.data_ptr<int8_t>());
  const int8_t* codes = table.data_ptr<int8_t>();
  int8_t* o = out.data_ptr<int8_t>();
  const mixprec::AddFit vector_fit(fit.data_ptr<float>());
  for_element_blocks(a.numel(), [&](int64_t begin, int64_t end) {
    mixprec::lookup_range(x, y, codes, vector_fit, begin, end, o);
  });
  return out;
}

// The estimate's coefficients and margins for a table (see tflite_add_lookup): float32 [alpha, beta, c, low, high,
// act_min, act_max], low = 2 where the estimate cannot serve (every lane then read from the table).
at::Tensor tflite_add_fit(const at::Tensor& table, int64_t a_offset, int64_t b_offset, int64_t a_multiplier,
                          int64_t a_shift, int64_t b_multiplier, int64_t b_shift, int64_t output_multiplier,
                          int64_t output_shift, int64_t output_offset, int64_t act_min, int64_t act_max) {
  TORCH_CHECK(table.scalar_type() == at::kChar && table.is_contiguous() && table.numel() == mixprec::kAddTableBytes,
              "the table must be 65,540 contiguous int8 codes (one per pair of codes, then 4 bytes of slack)");
  check_add_record(a_offset, b_offset, a_multiplier, a_shift, b_multiplier, b_shift, output_multiplier, output_shift,
                   output_offset);
  TORCH_CHECK(-128 <= act_min && act_min <= act_max && act_max <= 127,
              "the activation range must lie within int8 and not be empty");
  const auto real = [](int64_t multiplier, int64_t shift) {
    return static_cast<double>(multiplier) * std::ldexp(1.0, static_cast<int>(shift) - 31);
  };
  const double out = real(output_multiplier, output_shift) * 1048576.0;
  const double alpha = real(a_multiplier, a_shift) * out, beta = real(b_multiplier, b_shift) * out;
  auto fit = at::empty({mixprec::kAddFitFloats}, table.options().dtype(at::kFloat));
  float* f = fit.data_ptr<float>();
  const float values[mixprec::kAddFitFloats] = {static_cast<float>(alpha), static_cast<float>(beta),
                                    static_cast<float>(a_offset * alpha + b_offset * beta + output_offset + 0.5),
                                    2.0f, 1.0f, static_cast<float>(act_min), static_cast<float>(act_max)};
  std::copy(values, values + mixprec::kAddFitFloats, f);
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const int8_t* codes = table.data_ptr<int8_t>();
  if (fit_margins(codes, f)) {  // then the kernel itself on every pair, against the table
    std::vector<uint8_t> x(65536), y(65536);
    std::vector<int8_t> got(65536);
    for (int64_t k = 0; k < 65536; ++k) {  // the bytes of the codes k / 256 - 128 and k % 256 - 128: entry k
      x[k] = static_cast<uint8_t>((k >> 8) ^ 0x80);
      y[k] = static_cast<uint8_t>((k & 0xFF) ^ 0x80);
    }
    mixprec::lookup_range(x.data(), y.data(), codes, mixprec::AddFit(f), 0, 65536, got.data());
    if (!std::equal(got.begin(), got.end(), codes)) f[3] = 2.0f;
  } else {
    f[3] = 2.0f;
  }
#endif
  return fit;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("tflite_add_lookup(Tensor a, Tensor b, Tensor table, Tensor fit) -> Tensor");
  m.def("tflite_add_fit(Tensor table, int a_offset, int b_offset, int a_multiplier, int a_shift, int b_multiplier, "
        "int b_shift, int output_multiplier, int output_shift, int output_offset, int act_min, int act_max) -> Tensor");
  m.def("tflite_add(Tensor a, Tensor b, int a_offset, int b_offset, int a_multiplier, int a_shift, "
        "int b_multiplier, int b_shift, int output_multiplier, int output_shift, int output_offset, int act_min, "
        "int act_max) -> Tensor");
}

// Under the CPU dispatch key, paired with its shape-only implementation (mixprec/kernels/fake_ops.py).
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("tflite_add", &tflite_add);
  m.impl("tflite_add_lookup", &tflite_add_lookup);
  m.impl("tflite_add_fit", &tflite_add_fit);
}
