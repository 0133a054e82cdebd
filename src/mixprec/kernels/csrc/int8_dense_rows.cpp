// The few-row (decoding) path of the `int8` linear whose weight is the dense int8 [N, K] tensor
// (layers below oneDNN's packing threshold, which otherwise run torch._int_mm: that call repacks the
// weight every time). Each weight row is streamed once, front to back, lanes along k: 64 bytes per
// step, vpdpbusd of the activation codes (u8, the int8 code + 128) with the weights (s8) into 16 int32
// lanes, and of ones with the weights for the row's sum, so acc = sum_k q * w = sum (q + 128) * w
// - 128 * sum w, exact in int32 (wrapping sums reach the exact value, |acc| <= K * 2**14). Sixteen
// rows' lane vectors are then added across lanes by a permute tree into one vector (lane r: row r),
// and the epilogue is int8_rows_common.h's: the torch._int_mm path's bits. CPUs with AVX2 and without
// AVX512-VNNI run the int16 form below (vpmaddwd), the same sums.
#include <ATen/ATen.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "int8_rows_common.h"
#include "split_rows.h"

namespace {

constexpr int64_t kRows = 16;    // weight rows reduced together (the lanes of the output vector)

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kNative = true;

// Adds each of v[0..15] across its 16 lanes: lane r of the result is the sum of v[r]. Four levels,
// each adding the two halves of every lane group while interleaving two inputs.
inline __m512i sum_lanes(__m512i (&v)[kRows]) {
  static const int32_t lower[4][16] = {
      {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
      {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
      {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
      {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}};
  static const int32_t upper[4][16] = {
      {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
      {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31},
      {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31},
      {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}};
  int64_t count = kRows;
  for (int level = 0; level < 4; ++level, count /= 2) {
    const __m512i lo = _mm512_loadu_si512(lower[level]), hi = _mm512_loadu_si512(upper[level]);
    for (int64_t i = 0; i < count / 2; ++i)
      v[i] = _mm512_add_epi32(_mm512_permutex2var_epi32(v[2 * i], lo, v[2 * i + 1]),
                              _mm512_permutex2var_epi32(v[2 * i], hi, v[2 * i + 1]));
  }
  return v[0];
}

// y rows [0, Rows) for weight rows [16 * begin, 16 * end).
template <int Rows>
void row_blocks(const uint8_t* q, int64_t cols, const int8_t* w, const float* row_scale, const float* col_scale,
                const float* bias, int64_t outs, int64_t begin, int64_t end, float* y) {
  const int64_t whole = cols / 64, tail = cols % 64;
  const __mmask64 tail_mask = tail == 0 ? 0 : (~__mmask64{0} >> (64 - tail));
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t n0 = b * kRows, count = std::min(kRows, outs - n0);
    __m512i dots[Rows][kRows], sums[kRows];
    for (int64_t r = 0; r < kRows; ++r) {
      __m512i acc[Rows], sum = _mm512_setzero_si512();
      for (int m = 0; m < Rows; ++m) acc[m] = _mm512_setzero_si512();
      if (r < count) {
        const int8_t* row = w + (n0 + r) * cols;
        for (int64_t c = 0; c < whole; ++c) {
          const __m512i wv = _mm512_loadu_si512(row + 64 * c);
          sum = _mm512_dpbusd_epi32(sum, ones, wv);
          for (int m = 0; m < Rows; ++m)
            acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_loadu_si512(q + m * cols + 64 * c), wv);
        }
        if (tail != 0) {  // the missing bytes read as zeros in both operands
          const __m512i wv = _mm512_maskz_loadu_epi8(tail_mask, row + 64 * whole);
          sum = _mm512_dpbusd_epi32(sum, ones, wv);
          for (int m = 0; m < Rows; ++m)
            acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_maskz_loadu_epi8(tail_mask, q + m * cols + 64 * whole), wv);
        }
      }
      for (int m = 0; m < Rows; ++m) dots[m][r] = acc[m];
      sums[r] = sum;
    }
    const __m512i shift = _mm512_slli_epi32(sum_lanes(sums), 7);  // 128 * sum w per row
    const __mmask16 lanes = static_cast<__mmask16>(count == kRows ? 0xFFFFu : (1u << count) - 1u);
    const __m512 cs = _mm512_maskz_loadu_ps(lanes, col_scale + n0);
    const __m512 bs = bias ? _mm512_maskz_loadu_ps(lanes, bias + n0) : _mm512_setzero_ps();
    for (int m = 0; m < Rows; ++m)
      mixprec::int8_rows::store_rescaled(_mm512_sub_epi32(sum_lanes(dots[m]), shift), row_scale[m], cs,
                                         bias ? &bs : nullptr, lanes, y + m * outs + n0);
  }
}
#elif defined(__AVX2__)
constexpr bool kNative = true;

// The 8 int32 lanes of v added in a fixed tree (integer sums: the order cannot change the result).
inline int32_t sum_lanes(__m256i v) {
  __m128i half = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  half = _mm_add_epi32(half, _mm_unpackhi_epi64(half, half));
  return _mm_cvtsi128_si32(_mm_add_epi32(half, _mm_shuffle_epi32(half, 1)));
}

// Without VNNI: the activation codes as int16 (q - 128, the int8 codes), each weight row widened to
// int16 16 bytes at a time, and vpmaddwd's pair sums (at most 2 * 128 * 128 in magnitude: no
// saturation, unlike vpmaddubsw's int16 pairs) added into 8 int32 lanes per row of x. The same exact
// sums as the VNNI form, the epilogue of int8_rows_common.h in scalar code: the same bits.
template <int Rows>
void row_blocks(const uint8_t* q, int64_t cols, const int8_t* w, const float* row_scale, const float* col_scale,
                const float* bias, int64_t outs, int64_t begin, int64_t end, float* y) {
  const int64_t whole = cols / 16 * 16;
  std::vector<int16_t> codes(Rows * cols);
  for (int64_t i = 0; i < Rows * cols; ++i) codes[i] = static_cast<int16_t>(q[i] - 128);
  const int16_t* x = codes.data();
  for (int64_t n = std::min(outs, begin * kRows); n < std::min(outs, end * kRows); ++n) {
    const int8_t* row = w + n * cols;
    __m256i acc[Rows];
    for (auto& a : acc) a = _mm256_setzero_si256();
    for (int64_t c = 0; c < whole; c += 16) {
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c)));
      for (int m = 0; m < Rows; ++m)
        acc[m] = _mm256_add_epi32(
            acc[m], _mm256_madd_epi16(wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * cols + c))));
    }
    for (int m = 0; m < Rows; ++m) {
      int32_t sum = sum_lanes(acc[m]);
      for (int64_t c = whole; c < cols; ++c) sum += int32_t{x[m * cols + c]} * row[c];
      const float scaled = static_cast<float>(sum) * row_scale[m] * col_scale[n];
      y[m * outs + n] = bias ? scaled + bias[n] : scaled;
    }
  }
}
#else
constexpr bool kNative = false;
#endif

bool int8_dense_rows_available() { return kNative; }

// y [M, N] float32 of the int8 linear for uint8 codes q [M, K] (any M >= 1, four rows at a time; the int8
// codes + 128), their per-row scales and the dense int8 weight [N, K] with its per-channel scales.
at::Tensor int8_dense_rows(const at::Tensor& q, const at::Tensor& row_scale, const at::Tensor& weight,
                           const at::Tensor& col_scale, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(kNative, "int8_dense_rows: this build has neither the AVX512-VNNI nor the AVX2 kernel");
  TORCH_CHECK(q.dim() == 2, "int8_dense_rows takes contiguous uint8 CPU codes [M, K], got ", q.toString(), " ",
              q.sizes());
  const int64_t rows = q.size(0), cols = q.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous() &&
                  weight.device().is_cpu() && weight.size(1) == cols,
              "int8_dense_rows takes a contiguous int8 CPU weight [N, K] with K = ", cols, ", got ", weight.toString(),
              " ", weight.sizes());
  const int64_t outs = weight.size(0);
  const bool has_bias = mixprec::int8_rows::check_operands("int8_dense_rows", q, row_scale, col_scale, bias, outs,
                                                           std::numeric_limits<int64_t>::max());
  auto y = at::empty({rows, outs}, col_scale.options());
#if (defined(__AVX512VNNI__) && defined(__AVX512BW__)) || defined(__AVX2__)
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float *rs = row_scale.data_ptr<float>(), *cs = col_scale.data_ptr<float>();
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // Memory-bound: both threads pay from 256 KiB of weights on (split_rows's 2**22 is for compute).
  // Rows of x four at a time (kMaxRows), each chunk against this thread's weight rows.
  const auto body = [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < rows; m0 += mixprec::int8_rows::kMaxRows) {
      const uint8_t* qm = qp + m0 * cols;
      const float* rm = rs + m0;
      float* ym = yp + m0 * outs;
      switch (std::min(mixprec::int8_rows::kMaxRows, rows - m0)) {
        case 1: row_blocks<1>(qm, cols, wp, rm, cs, bp, outs, begin, end, ym); break;
        case 2: row_blocks<2>(qm, cols, wp, rm, cs, bp, outs, begin, end, ym); break;
        case 3: row_blocks<3>(qm, cols, wp, rm, cs, bp, outs, begin, end, ym); break;
        default: row_blocks<4>(qm, cols, wp, rm, cs, bp, outs, begin, end, ym); break;
      }
    }
  };
  const int64_t blocks = (outs + kRows - 1) / kRows;
  if (outs * cols >= mixprec::kStreamingParallelBytes && blocks > 1 && !at::in_parallel_region())
    at::parallel_for(0, blocks, 1, body);
  else
    body(0, blocks);
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("int8_dense_rows_available() -> bool", &int8_dense_rows_available);
  m.def("int8_dense_rows(Tensor q, Tensor row_scale, Tensor weight, Tensor col_scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("int8_dense_rows", &int8_dense_rows);
}
