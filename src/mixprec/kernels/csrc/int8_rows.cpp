// Fused CPU kernels for int8 linears: per-row (per-token) activation quantization and
// the float epilogue of an int32 accumulator. Compiled on first use by
// mixprec/kernels/native.py with -ffp-contract=off and without fast-math, so every
// float operation rounds exactly as the PyTorch reference path does. These loops run on
// the calling thread: measured here, splitting them over PyTorch's OpenMP threads made
// them 2-3x slower (0.24 ms against 0.08 ms to quantize 128 x 4096).
#include <ATen/ATen.h>
#include <immintrin.h>
#include "avx2_lanes.h"
#include "half_floats.h"
#include "split_rows.h"
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr float kScaleMin = 1.17549435e-38f;  // 2**-126, the smallest normal float32
constexpr float kRoundMagic = 12582912.0f;     // 1.5 * 2**23

// Codes of a span with one scale and zero point: q = clamp(round_half_even(x / s) + zp,
// code_min, code_max), stored as Code; returns whether the span holds NaN. Clamping x / s to
// [-bound, bound] first (bound >= 256 past every code range) keeps the magic-number rounding
// exact and maps +-inf to the ends; the comparisons are written so that NaN becomes -bound
// (code code_min). The AVX-512 loop gives the scalar loop's bits (max/min return their
// second operand for NaN, as the scalar comparisons do; cvtps2dq rounds half to even in the
// default rounding mode, as the magic-number addition does) at a third of its time (0.066 ms
// against 0.198 ms for 512,000 floats, one thread, measured here: the compiler turns the
// scalar clamps into chains of mask operations).
template <typename Code>
bool quantize_span(const float* __restrict in, Code* __restrict out, int64_t count, float s, int32_t zp,
                   int32_t code_min, int32_t code_max, float bound) {
  int64_t i = 0;
  bool has_nan = false;
#if defined(__AVX512F__)
  __mmask16 nan_lanes = 0;
  const __m512 divisor = _mm512_set1_ps(s), low = _mm512_set1_ps(-bound), high = _mm512_set1_ps(bound);
  const __m512i offset = _mm512_set1_epi32(zp);
  const __m512i lowest = _mm512_set1_epi32(code_min), highest = _mm512_set1_epi32(code_max);
  for (; i + 16 <= count; i += 16) {
    const __m512 x = _mm512_loadu_ps(in + i);
    nan_lanes |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(x, divisor), low), high);
    __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(v), offset);
    q = _mm512_min_epi32(_mm512_max_epi32(q, lowest), highest);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(q));  // low bytes: the codes
  }
  has_nan = nan_lanes != 0;
#endif
  const float low_code = static_cast<float>(code_min), high_code = static_cast<float>(code_max);
  for (; i < count; ++i) {
    float v = in[i] / s;
    has_nan |= std::isnan(in[i]);
    v = v > -bound ? v : -bound;
    v = v < bound ? v : bound;
    float rounded = (v + kRoundMagic) - kRoundMagic + static_cast<float>(zp);
    rounded = rounded > low_code ? rounded : low_code;
    rounded = rounded < high_code ? rounded : high_code;
    out[i] = static_cast<Code>(static_cast<int32_t>(rounded));
  }
  return has_nan;
}

// scale = max(max|row| / 127, 2**-126); q = round_half_even(x / scale) + Offset, stored
// as Code: int8 with Offset 0, or uint8 with Offset 128 (the u8 operand oneDNN's VNNI
// kernels take, with zero point 128). A row holding NaN or +-inf gets scale NaN and
// codes Offset, so its output row is NaN.
template <typename Code, int Offset>
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "per-row quantization takes a contiguous float32 CPU matrix");
  const int64_t rows = x.size(0), cols = x.size(1);
  auto q = at::empty({rows, cols}, x.options().dtype(Offset == 0 ? at::kChar : at::kByte));
  auto scale = at::empty({rows, 1}, x.options());
  const float* src = x.data_ptr<float>();
  Code* dst = reinterpret_cast<Code*>(q.data_ptr());
  float* scale_ptr = scale.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {  // one thread: see the top of this file
    const float* row = src + r * cols;
    Code* out = dst + r * cols;
    // For non-negative floats the IEEE order equals the integer order of the bit
    // patterns (inf = 0x7f800000, NaN above it), so max|x| is an integer max of
    // (bits & 0x7fffffff), which vectorizes and detects non-finite values exactly.
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(row);
    uint32_t amax_bits = 0;
    for (int64_t c = 0; c < cols; ++c) amax_bits = std::max(amax_bits, bits[c] & 0x7fffffffu);
    if (amax_bits >= 0x7f800000u) {
      scale_ptr[r] = std::numeric_limits<float>::quiet_NaN();
      std::fill(out, out + cols, static_cast<Code>(Offset));
      continue;
    }
    float amax;
    std::memcpy(&amax, &amax_bits, sizeof(amax));
    const float s = std::max(amax, 127.0f * kScaleMin) / 127.0f;
    scale_ptr[r] = s;
    int64_t c = 0;
#if defined(__AVX512F__)
    const __m512 divisor = _mm512_set1_ps(s);
    const __m512i offset = _mm512_set1_epi32(Offset);
    for (; c + 16 <= cols; c += 16) {  // cvtps2dq: round half to even, as below
      const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(row + c), divisor)), offset);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), _mm512_cvtepi32_epi8(q));
    }
#endif
    for (; c < cols; ++c) {
      // |row[c] / s| <= 127 < 2**22, where adding and subtracting 1.5 * 2**23 rounds to
      // the nearest integer, ties to even (the default rounding mode), exactly.
      const float rounded = (row[c] / s + kRoundMagic) - kRoundMagic;
      out[c] = static_cast<Code>(static_cast<int32_t>(rounded) + Offset);
    }
  }
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> quantize_rows_s8(const at::Tensor& x) { return quantize_rows<int8_t, 0>(x); }
std::tuple<at::Tensor, at::Tensor> quantize_rows_u8(const at::Tensor& x) { return quantize_rows<uint8_t, 128>(x); }

// Static activations, one scale and zero point for the tensor:
// q = clamp(round_half_even(x / scale) + zero_point, -128, 127); +-inf saturates.
// Returns (q, row_flag [M, 1]) with row_flag 1 for a row without NaN and NaN otherwise,
// so that rescaling the accumulator by it turns exactly the NaN rows into NaN.
std::tuple<at::Tensor, at::Tensor> quantize_rows_static_s8(const at::Tensor& x, double scale,
                                                           int64_t zero_point) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "quantize_rows_static_s8 takes a contiguous float32 CPU matrix");
  TORCH_CHECK(zero_point >= -128 && zero_point <= 127, "zero_point must lie in [-128, 127]");
  const int64_t rows = x.size(0), cols = x.size(1);
  auto q = at::empty({rows, cols}, x.options().dtype(at::kChar));
  auto flag = at::empty({rows, 1}, x.options());
  const float* src = x.data_ptr<float>();
  int8_t* dst = q.data_ptr<int8_t>();
  float* flag_ptr = flag.data_ptr<float>();
  const float s = static_cast<float>(scale);
  for (int64_t r = 0; r < rows; ++r) {  // one thread: see the top of this file
    const bool has_nan = quantize_span(src + r * cols, dst + r * cols, cols, s, static_cast<int32_t>(zero_point),
                                       -128, 127, 256.0f);
    flag_ptr[r] = has_nan ? std::numeric_limits<float>::quiet_NaN() : 1.0f;
  }
  return {q, flag};
}

// quantize_rows_static_s8 with the scale (float32) and zero point (int32) held in one-element
// CPU tensors, as the modules store them: torch.compile's graphs pass the buffers themselves
// instead of reading them back into Python numbers. The same bits.
std::tuple<at::Tensor, at::Tensor> quantize_rows_static_s8_t(const at::Tensor& x, const at::Tensor& scale,
                                                             const at::Tensor& zero_point) {
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat && scale.device().is_cpu(),
              "quantize_rows_static_s8_t takes the scale as a one-element float32 CPU tensor, got ",
              scale.numel(), " elements of ", scale.scalar_type());
  TORCH_CHECK(zero_point.numel() == 1 && zero_point.scalar_type() == at::kInt && zero_point.device().is_cpu(),
              "quantize_rows_static_s8_t takes the zero point as a one-element int32 CPU tensor, got ",
              zero_point.numel(), " elements of ", zero_point.scalar_type());
  return quantize_rows_static_s8(x, scale.item<float>(), zero_point.item<int32_t>());
}

// Work units per element given to split_rows: inputs of 2**19 elements and more run on
// both cores (64 x 28 x 28 x 16 floats: 0.26 ms on one thread, 0.15 ms on two, measured here).
constexpr int64_t kQuantizeWorkPerElement = 8;

// Per-tensor uint8 activations of a convolution, one pass over a contiguous float32 tensor
// holding `samples` equal consecutive blocks (channels-last [N, H, W, C]: one block a sample).
// Returns (q, sample_flag [samples]) with the flag 1 for a sample without NaN and NaN
// otherwise. Samples run in parallel once the work is large (split_rows.h).
std::tuple<at::Tensor, at::Tensor> quantize_samples_u8(const at::Tensor& x, int64_t samples, double scale,
                                                       int64_t zero_point) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "quantize_samples_u8 takes a contiguous float32 CPU tensor");
  TORCH_CHECK(samples >= 1 && x.numel() % samples == 0, "the tensor must split into `samples` equal blocks");
  TORCH_CHECK(zero_point >= 0 && zero_point <= 255, "zero_point must lie in [0, 255]");
  auto q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  auto flag = at::empty({samples}, x.options());
  const int64_t block = x.numel() / samples;
  const float* src = x.data_ptr<float>();
  uint8_t* dst = q.data_ptr<uint8_t>();
  float* flag_ptr = flag.data_ptr<float>();
  const float s = static_cast<float>(scale);
  const auto zp = static_cast<int32_t>(zero_point);
  mixprec::split_rows(samples, x.numel() * kQuantizeWorkPerElement, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const bool has_nan = quantize_span(src + n * block, dst + n * block, block, s, zp, 0, 255, 512.0f);
      flag_ptr[n] = has_nan ? std::numeric_limits<float>::quiet_NaN() : 1.0f;
    }
  });
  return {q, flag};
}

// y[m, n] = ((float(acc[m, n]) * row_scale[m]) * col_scale[n]) + bias[n], each step
// rounded to float32 (no fused multiply-add). The accumulator is int32, or float32
// already holding float(acc) (what oneDNN returns with unit scales).
// `out` may be the accumulator's own memory (each element is read before it is written).
template <typename Acc>
void rescale_impl(const at::Tensor& acc, const float* rs, const float* cs, const float* b, float* out) {
  const int64_t rows = acc.size(0), cols = acc.size(1);
  const Acc* a = static_cast<const Acc*>(acc.data_ptr());
  for (int64_t r = 0; r < rows; ++r) {  // one thread: see the top of this file
    const float s = rs[r];
    const Acc* arow = a + r * cols;
    float* yrow = out + r * cols;
    if (b != nullptr) {
      for (int64_t c = 0; c < cols; ++c) yrow[c] = static_cast<float>(arow[c]) * s * cs[c] + b[c];
    } else {
      for (int64_t c = 0; c < cols; ++c) yrow[c] = static_cast<float>(arow[c]) * s * cs[c];
    }
  }
}

// Writes the rescaled accumulator to `out` (float32 [M, N], possibly acc's own memory).
void rescale_into(const at::Tensor& acc, const at::Tensor& row_scale, const at::Tensor& col_scale,
                  const c10::optional<at::Tensor>& bias, float* out) {
  TORCH_CHECK(acc.dim() == 2 && (acc.scalar_type() == at::kInt || acc.scalar_type() == at::kFloat) &&
                  acc.is_contiguous(),
              "rescale_rows_cols takes a contiguous int32 or float32 accumulator");
  const int64_t rows = acc.size(0), cols = acc.size(1);
  TORCH_CHECK(row_scale.numel() == rows && row_scale.scalar_type() == at::kFloat && row_scale.is_contiguous(),
              "row_scale must be float32 with one value per row");
  TORCH_CHECK(col_scale.numel() == cols && col_scale.scalar_type() == at::kFloat && col_scale.is_contiguous(),
              "col_scale must be float32 with one value per column");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->numel() == cols && bias->scalar_type() == at::kFloat && bias->is_contiguous(),
                "bias must be float32 with one value per column");
  }
  const float* rs = row_scale.data_ptr<float>();
  const float* cs = col_scale.data_ptr<float>();
  const float* b = has_bias ? bias->data_ptr<float>() : nullptr;
  if (acc.scalar_type() == at::kInt) {
    rescale_impl<int32_t>(acc, rs, cs, b, out);
  } else {
    rescale_impl<float>(acc, rs, cs, b, out);
  }
}

at::Tensor rescale_rows_cols(const at::Tensor& acc, const at::Tensor& row_scale, const at::Tensor& col_scale,
                             const c10::optional<at::Tensor>& bias) {
  auto y = at::empty(acc.sizes(), acc.options().dtype(at::kFloat));
  rescale_into(acc, row_scale, col_scale, bias, y.data_ptr<float>());
  return y;
}

// In place: the int32 or float32 accumulator's memory receives the float32 result (one
// large buffer per call instead of two). Returns nothing (torch.compile functionalizes a custom
// operator that mutates an input, not one that returns an alias of it); callers read the float32
// result through acc (viewed as float32 when it was int32).
void rescale_rows_cols_(at::Tensor& acc, const at::Tensor& row_scale, const at::Tensor& col_scale,
                        const c10::optional<at::Tensor>& bias) {
  rescale_into(acc, row_scale, col_scale, bias, static_cast<float*>(acc.data_ptr()));
}

// The whole dynamic int8 linear in one call: per-row quantization of x [M, K],
// at::_int_mm against weight [N, K] (int32 accumulation), then the rescale epilogue.
at::Tensor int8_linear_dynamic(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                               const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.size(1) == x.size(1),
              "int8_linear_dynamic takes an int8 [N, K] weight matching x [M, K]");
  auto [q, row_scale] = quantize_rows_s8(x);
  auto acc = at::_int_mm(q, weight.t());
  rescale_rows_cols_(acc, row_scale, weight_scale, bias);
  return acc.view(at::kFloat);
}

// Weight-only int8 for few rows: y[m, n] = (sum_k x[m, k] * float(w[n, k])) * scale[n]
// + bias[n], the weight read once per call (4x fewer bytes than float32) and converted in
// registers. Blocks of kW8Channels output channels x up to kW8Rows rows of x share each
// converted chunk of 16 weights (AVX2: 8 weights, 2 rows of x at a time); blocks of channels are
// split over PyTorch's threads. Each sum is 16 (AVX2: 8) float32 lanes of fused multiply-adds over
// k = 16j + lane, then the lanes added in a fixed tree, then the k % 16 (8) tail: the order depends
// on K and the CPU only, so a row's output is the same bits whatever else shares its batch
// (results differ from a float32 matmul by rounding only).
constexpr int kW8Channels = 4;
constexpr int kW8Rows = 6;

// Group scales, when given (w8gN): `scales` holds kW8Channels rows of `groups` float32 values
// and each converted chunk of 16 weights is multiplied by its group's scale first (exact:
// an 8-bit code times an fp16 scale fits float32's significand), so the sums are of
// x * (q * s); the caller needs the group size to be a multiple of 16.
#if defined(MIXPREC_AVX2_LANES)
// w8_block's vector part with 8 lanes (AVX2 + FMA), for Pair (1 or 2) rows of x: 16 registers hold
// no more than 2 x 4 accumulators beside the 4 converted chunks. The sums of each row of x run over
// k = 8j + lane, then the lanes are added in avx2::sum_lanes's tree; a row's order depends on K only.
// `prefetch`: the next block's codes, one 64-byte line per 16 codes (as w8_block), or nullptr.
template <int Pair>
void w8_pass_avx2(const float* x, int64_t k_total, const int8_t* const* row_codes, const float* const* row_scales,
                  int64_t span, int64_t vector_end, const int8_t* prefetch, float* sums) {
  __m256 acc[Pair][kW8Channels];
  for (auto& row : acc)
    for (auto& a : row) a = _mm256_setzero_ps();
  int64_t k = 0;
  for (int64_t g = 0; k < vector_end; ++g) {
    __m256 scale[kW8Channels];
    if (row_scales[0] != nullptr)
      for (int c = 0; c < kW8Channels; ++c) scale[c] = _mm256_set1_ps(row_scales[c][g]);
    for (const int64_t span_end = std::min(k + span, vector_end); k < span_end; k += 8) {
      if (prefetch != nullptr && k % 16 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(prefetch + 4 * k), _MM_HINT_T0);
      __m256 wv[kW8Channels];
      for (int c = 0; c < kW8Channels; ++c) {
        wv[c] = mixprec::avx2::low8_to_floats(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row_codes[c] + k)));
        if (row_scales[0] != nullptr) wv[c] = _mm256_mul_ps(wv[c], scale[c]);
      }
      for (int r = 0; r < Pair; ++r) {
        __m256 xv = _mm256_loadu_ps(x + r * k_total + k);
        asm("" : "+x"(xv));  // one load of x per chunk (see w8_block)
        for (int c = 0; c < kW8Channels; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < Pair; ++r)
    for (int c = 0; c < kW8Channels; ++c) sums[r * kW8Channels + c] = mixprec::avx2::sum_lanes(acc[r][c]);
}
#endif

template <int Rows>
void w8_block(const float* x, int64_t k_total, const int8_t* w, int channels, const float* scales, int64_t group,
              float* sums) {
  // sums[r * kW8Channels + c] = dot(x row r, weight row c) for Rows rows and `channels` <= 4 rows of w
  int64_t k = 0;
#if defined(__AVX512F__) || defined(MIXPREC_AVX2_LANES)
#if defined(__AVX512F__)
  constexpr int64_t kLanes = 16;
#else
  constexpr int64_t kLanes = 8;
#endif
  const int64_t groups = scales != nullptr ? k_total / group : 0;
  const int64_t vector_end = k_total / kLanes * kLanes;
  const int64_t span = scales != nullptr ? group : vector_end;  // chunks that share one scale
  const int8_t* row_codes[kW8Channels];
  const int8_t* next_block = w + kW8Channels * k_total;  // contiguous, kW8Channels * k_total bytes
  const float* row_scales[kW8Channels];
  for (int c = 0; c < kW8Channels; ++c) {
    const int row = c < channels ? c : 0;
    row_codes[c] = w + row * k_total;
    row_scales[c] = scales != nullptr ? scales + row * groups : nullptr;
  }
#endif
#if defined(__AVX512F__)
  __m512 acc[Rows][kW8Channels];
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < kW8Channels; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t g = 0; k < vector_end; ++g) {
    __m512 scale[kW8Channels];
    if (scales != nullptr)
      for (int c = 0; c < kW8Channels; ++c) scale[c] = _mm512_set1_ps(row_scales[c][g]);
    for (const int64_t span_end = std::min(k + span, vector_end); k < span_end; k += 16) {
      // One 64-byte line of the next block per chunk of 16 codes: all of it by this block's end. A
      // block's rows are K bytes apart, each a stream too short for the hardware prefetcher to
      // catch (measured here: a 49,152 x 2,048 w8g32 head at M = 1 read its codes at half a plain
      // sum's bandwidth without this, 85-90% with it).
      _mm_prefetch(reinterpret_cast<const char*>(next_block + 4 * k), _MM_HINT_T0);
      __m512 wv[kW8Channels];
      for (int c = 0; c < kW8Channels; ++c) {
        wv[c] = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row_codes[c] + k))));
        if (scales != nullptr) wv[c] = _mm512_mul_ps(wv[c], scale[c]);
      }
      for (int r = 0; r < Rows; ++r) {
        __m512 xv = _mm512_loadu_ps(x + r * k_total + k);
        asm("" : "+v"(xv));  // one load of x per chunk, not one folded into every channel's FMA
        for (int c = 0; c < kW8Channels; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
      }
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < kW8Channels; ++c) sums[r * kW8Channels + c] = _mm512_reduce_add_ps(acc[r][c]);
#elif defined(MIXPREC_AVX2_LANES)
  for (int r = 0; r < Rows; r += 2) {  // the next block's codes are prefetched in the first pass only
    const int8_t* prefetch = r == 0 ? next_block : nullptr;
    if (r + 1 < Rows)
      w8_pass_avx2<2>(x + r * k_total, k_total, row_codes, row_scales, span, vector_end, prefetch,
                      sums + r * kW8Channels);
    else
      w8_pass_avx2<1>(x + r * k_total, k_total, row_codes, row_scales, span, vector_end, prefetch,
                      sums + r * kW8Channels);
  }
  k = vector_end;
#else
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < kW8Channels; ++c) sums[r * kW8Channels + c] = 0.0f;
#endif
  for (int r = 0; r < Rows; ++r)
    for (int c = 0; c < channels; ++c) {
      float tail = sums[r * kW8Channels + c];
      for (int64_t j = k; j < k_total; ++j) {
        const float weight = static_cast<float>(w[c * k_total + j]) *
                             (scales != nullptr ? scales[c * (k_total / group) + j / group] : 1.0f);
        tail = std::fma(x[r * k_total + j], weight, tail);
      }
      sums[r * kW8Channels + c] = tail;
    }
}

template <int Rows>
void w8_rows_into(const float* x, int64_t k_total, const int8_t* w, int channels, const float* scales, int64_t group,
                  float* sums, int rows) {
  if constexpr (Rows > 1) {
    if (rows < Rows) return w8_rows_into<Rows - 1>(x, k_total, w, channels, scales, group, sums, rows);
  }
  w8_block<Rows>(x, k_total, w, channels, scales, group, sums);
}

// Blocks [begin, end) of kW8Channels output channels for all rows of x. `group_scale`
// (fp16 [N, K / group]) selects w8gN: y = sum x * (q * s) + b; without it (w8):
// y = (sum x * q) * scale[n] + b.
void w8_channel_blocks(const float* xp, int64_t rows, int64_t cols, const int8_t* wp, int64_t outs,
                       const float* channel_scale, const at::Half* group_scale, int64_t group, const float* bp,
                       float* yp, int64_t begin, int64_t end) {
  float sums[kW8Rows * kW8Channels];
  const int64_t groups = group_scale != nullptr ? cols / group : 0;
  std::vector<float> scales(kW8Channels * groups);
  for (int64_t block = begin; block < end; ++block) {
    const int64_t n0 = block * kW8Channels;
    const int channels = static_cast<int>(std::min<int64_t>(kW8Channels, outs - n0));
    if (groups) mixprec::halves_to_floats(group_scale + n0 * groups, scales.data(), channels * groups);
    for (int64_t m0 = 0; m0 < rows; m0 += kW8Rows) {
      const int count = static_cast<int>(std::min<int64_t>(kW8Rows, rows - m0));
      w8_rows_into<kW8Rows>(xp + m0 * cols, cols, wp + n0 * cols, channels, groups ? scales.data() : nullptr, group,
                            sums, count);
      for (int r = 0; r < count; ++r)
        for (int c = 0; c < channels; ++c) {
          const int64_t n = n0 + c;
          const float sum = sums[r * kW8Channels + c];
          yp[(m0 + r) * outs + n] = (channel_scale != nullptr ? sum * channel_scale[n] : sum) +
                                    (bp != nullptr ? bp[n] : 0.0f);
        }
    }
  }
}

// Checks x and the codes, then runs w8_channel_blocks over PyTorch's threads.
at::Tensor w8_rows_launch(const at::Tensor& x, const at::Tensor& codes, const float* channel_scale,
                          const at::Half* group_scale, int64_t group, const c10::optional<at::Tensor>& bias) {
  const int64_t rows = x.size(0), cols = x.size(1), outs = codes.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->numel() == outs && bias->scalar_type() == at::kFloat && bias->is_contiguous()),
              "bias must be contiguous float32 [N]");
  auto y = at::empty({rows, outs}, x.options());
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  const int64_t blocks = (outs + kW8Channels - 1) / kW8Channels;
  mixprec::split_rows(blocks, rows * cols * outs, [&](int64_t begin, int64_t end) {
    w8_channel_blocks(x.data_ptr<float>(), rows, cols, codes.data_ptr<int8_t>(), outs, channel_scale, group_scale,
                      group, bp, y.data_ptr<float>(), begin, end);
  });
  return y;
}

void check_w8_operands(const at::Tensor& x, const at::Tensor& codes) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 [M, K]");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous() &&
                  codes.size(1) == x.size(1),
              "weight codes must be contiguous int8 [N, K]");
}

at::Tensor w8_linear_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& bias) {
  check_w8_operands(x, weight);
  TORCH_CHECK(scale.numel() == weight.size(0) && scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "scale must be contiguous float32 [N]");
  return w8_rows_launch(x, weight, scale.data_ptr<float>(), nullptr, 1, bias);
}

// w8gN for few rows: y = x @ (q * s)^T + b with fp16 scales per group of `group` (a multiple
// of 16) along K, the codes read once per call and scaled in registers (see w8_block).
at::Tensor w8g_linear_rows(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& bias) {
  check_w8_operands(x, codes);
  const int64_t cols = x.size(1);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == codes.size(0) && scale.scalar_type() == at::kHalf &&
                  scale.is_contiguous() && scale.size(1) >= 1 && cols % scale.size(1) == 0 &&
                  (cols / scale.size(1)) % 16 == 0,
              "scale must be contiguous fp16 [N, K / G] with G a multiple of 16");
  return w8_rows_launch(x, codes, nullptr, scale.data_ptr<at::Half>(), cols / scale.size(1), bias);
}

}  // namespace

TORCH_LIBRARY(mixprec, m) {
  m.def("quantize_rows_s8(Tensor x) -> (Tensor, Tensor)");
  m.def("quantize_rows_u8(Tensor x) -> (Tensor, Tensor)");
  m.def("quantize_rows_static_s8(Tensor x, float scale, int zero_point) -> (Tensor, Tensor)");
  m.def("quantize_rows_static_s8_t(Tensor x, Tensor scale, Tensor zero_point) -> (Tensor, Tensor)");
  m.def("quantize_samples_u8(Tensor x, int samples, float scale, int zero_point) -> (Tensor, Tensor)");
  m.def("int8_linear_dynamic(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias) -> Tensor");
  m.def("w8_linear_rows(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor");
  m.def("w8g_linear_rows(Tensor x, Tensor codes, Tensor scale, Tensor? bias) -> Tensor");
  m.def("rescale_rows_cols_(Tensor(a!) acc, Tensor row_scale, Tensor col_scale, Tensor? bias) -> ()");
  m.def("rescale_rows_cols(Tensor acc, Tensor row_scale, Tensor col_scale, Tensor? bias) -> Tensor");
}

// CPU kernels under the CPU dispatch key (not a catch-all), so torch.compile can pair each with
// its shape-only implementation (mixprec/kernels/fake_ops.py).
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("quantize_rows_s8", &quantize_rows_s8);
  m.impl("quantize_rows_u8", &quantize_rows_u8);
  m.impl("quantize_rows_static_s8", &quantize_rows_static_s8);
  m.impl("quantize_rows_static_s8_t", &quantize_rows_static_s8_t);
  m.impl("quantize_samples_u8", &quantize_samples_u8);
  m.impl("int8_linear_dynamic", &int8_linear_dynamic);
  m.impl("w8_linear_rows", &w8_linear_rows);
  m.impl("w8g_linear_rows", &w8g_linear_rows);
  m.impl("rescale_rows_cols_", &rescale_rows_cols_);
  m.impl("rescale_rows_cols", &rescale_rows_cols);
}
