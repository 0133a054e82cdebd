// The integer engine's CONV_2D and DEPTHWISE_CONV_2D (mixprec/integer/ops/conv.py) in C++, int8
// and 16x8: the same arithmetic as the numpy reference, which the tests pin it to byte for byte.
//
// NHWC int8 input, weights [out, kh, kw, in] (CONV_2D) or [1, kh, kw, out] (depthwise, input
// channel c / depth_multiplier feeds output c), int32 bias. For each output position and
// channel: acc = bias + sum (x + input_offset) * w over the in-image window points (exact in
// int32: the window is bounded so that it cannot overflow), then gemmlowp's double-rounding
// MultiplyByQuantizedMultiplier (SaturatingRoundingDoublingHighMul, then RoundingDivideByPOT,
// per channel or per tensor), the output offset and the activation clamp. 16x8: int16 input with
// zero point 0, an int32 or int64 bias, int64 accumulation and TFLite's int64 rescale with the
// 16-bit reduced multiplier. Output rows (batch x height) are split over PyTorch's OpenMP threads.
//
// With AVX-512 the int8 rescale runs 16 channels at a time in float32 with a proven error bound, lanes
// too near a rounding boundary redone in integers (Int8Store16), and with
// AVX512-VNNI an int8 CONV_2D with a multiple of 16 output channels runs as a u8 x s8 GEMM over its
// windows (conv_gemm_vnni): the codes shifted by +128 into uint8 (x ^ 0x80) and the shift taken back
// exactly through the weights' sums, acc = sum (x + 128) w + (input_offset - 128) * sum w; an int8
// DEPTHWISE_CONV_2D with depth multiplier 1 and a multiple of 16 channels takes the same shift and dot
// products of four window points along a row, from each padded row laid out once in such quads (depthwise_vnni).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "split_rows.h"
#include "tflite_add_lookup.h"
#include "tflite_bias.h"
#include "tflite_rescale.h"
#include "tflite_store8.h"

namespace {

using mixprec::requantize;
#if defined(__AVX512F__) && defined(__AVX512BW__)
using mixprec::requantize16;
#endif

// Input channels from which a CONV_2D sums each output channel as one dot product over the input
// channels (contiguous in the pixel and the weights); fewer run output channels innermost instead.
constexpr int64_t kDotChannels = 16;

// TFLite's int64 MultiplyByQuantizedMultiplier (16x8): the multiplier reduced to 16 bits, one
// rounding (ties toward +inf), the result saturated to int32.
inline int32_t requantize_wide(int64_t acc, int32_t multiplier, int32_t shift) {
  const int64_t reduced = multiplier < 0x7FFF0000 ? (static_cast<int64_t>(multiplier) + (1 << 15)) >> 16 : 0x7FFF;
  const int total = 15 - shift;
  const int64_t result = (acc * reduced + (int64_t{1} << (total - 1))) >> total;
  return static_cast<int32_t>(std::clamp<int64_t>(result, std::numeric_limits<int32_t>::min(),
                                                  std::numeric_limits<int32_t>::max()));
}


#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr bool kVectorRescale = true;

// The int8 rescale and output offset of 16 int32 totals, in float32 and exact (mixprec::FloorRescale: floor(g) where
// g's fraction is at least 2e, the integer rescale requantize16 for the other lanes); the activation clamp follows on
// the int8 codes: clamp(), codes64(), operator().
class Int8Store16 {
 public:
  Int8Store16(const int32_t* m, const int32_t* s, bool per_channel, int64_t channels, int32_t output_offset,
              int32_t act_min, int32_t act_max)
      : m_(m), s_(s), per_channel_(per_channel), table_(static_cast<size_t>((per_channel ? channels / 16 : 1) * 48)),
        offset_(_mm512_set1_epi32(output_offset)), low_(_mm512_set1_epi32(act_min)),
        high_(_mm512_set1_epi32(act_max)), low_bytes_(_mm512_set1_epi8(static_cast<char>(act_min))),
        high_bytes_(_mm512_set1_epi8(static_cast<char>(act_max))) {
    const int64_t count = per_channel ? channels : 1;
    fast_ = std::all_of(m, m + count, mixprec::floor_rescale_fits);
    for (int64_t c = 0; c < static_cast<int64_t>(table_.size() / 3); ++c) {
      const int64_t k = per_channel ? c : 0;
      const mixprec::FloorRescale constants = mixprec::floor_rescale(m[k], s[k], output_offset);
      float* v = table_.data() + (c / 16) * 48 + c % 16;
      v[0] = constants.scale;
      v[16] = constants.base;
      v[32] = constants.base_negative;
    }
  }

  // The 16 int32 outputs (offset added) of totals whose first channel is first_channel, to be saturated
  // to int8 and clamped to the activation range (clamp()) by the caller.
  __m512i rescale(__m512i total, int64_t first_channel) const {
    if (!fast_) return exact(total, first_channel);
    __mmask16 near;
    const __m512i out = floor_of(total, first_channel, &near);
    return near ? _mm512_mask_mov_epi32(out, near, exact(total, first_channel)) : out;
  }

  // rescale() of four registers of totals, register k's first channel first_channel + channel_step k (16: four
  // blocks of one pixel; 0: four pixels of a 16-channel output): one test for the flagged lanes of all four.
  __attribute__((always_inline)) void rescale4(const __m512i (&total)[4], int64_t first_channel,
                                               __m512i (&out)[4], int64_t channel_step = 16) const {
    if (!fast_) {
      for (int k = 0; k < 4; ++k) out[k] = exact(total[k], first_channel + channel_step * k);
      return;
    }
    __mmask16 near[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) out[k] = floor_of(total[k], first_channel + channel_step * k, &near[k]);
    if (near[0] | near[1] | near[2] | near[3]) {
      for (int k = 0; k < 4; ++k) {
        if (near[k]) {
          out[k] = _mm512_mask_mov_epi32(out[k], near[k], exact(total[k], first_channel + channel_step * k));
        }
      }
    }
  }

  // int8 codes clamped to the activation range (lanes beyond the last channel clamped as well).
  __m512i clamp(__m512i codes) const { return _mm512_min_epi8(_mm512_max_epi8(codes, low_bytes_), high_bytes_); }

  // Four rescaled registers of 16 channels each as 64 codes in the registers' order: saturating packs (which
  // leave dword 4 L + k holding register k's lane-L dword), a dword transpose, the clamp.
  __m512i codes64(const __m512i (&v)[4]) const {
    const __m512i packed = _mm512_packs_epi16(_mm512_packs_epi32(v[0], v[1]), _mm512_packs_epi32(v[2], v[3]));
    return clamp(_mm512_permutexvar_epi32(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0),
                                          packed));
  }

  void operator()(__m512i total, int64_t first_channel, int8_t* dst) const {
    const __m128i codes = _mm512_cvtsepi32_epi8(rescale(total, first_channel));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_castsi512_si128(clamp(_mm512_castsi128_si512(codes))));
  }

 private:
  // floor(g) of 16 totals (see above) and the lanes to redo in integers (fraction of g below 2e): the fraction by
  // vreduceps (g - floor(g), exact), the floor by a conversion rounding down.
  __attribute__((always_inline)) __m512i floor_of(__m512i total, int64_t first_channel, __mmask16* near) const {
    const float* v = table_.data() + (per_channel_ ? first_channel / 16 : 0) * 48;
    const __mmask16 negative = _mm512_cmplt_epi32_mask(total, _mm512_setzero_si512());
    const __m512 c = _mm512_mask_mov_ps(_mm512_loadu_ps(v + 16), negative, _mm512_loadu_ps(v + 32));
    const __m512 g = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_loadu_ps(v), c);
    *near = _mm512_cmp_ps_mask(_mm512_reduce_ps(g, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC),
                               _mm512_set1_ps(2 * mixprec::kFloorMargin), _CMP_LT_OQ);
    return _mm512_cvt_roundps_epi32(g, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  }

  __m512i exact(__m512i total, int64_t first_channel) const {
    const int64_t k = per_channel_ ? first_channel : 0;
    const __m512i v = requantize16(total, per_channel_ ? _mm512_loadu_si512(m_ + k) : _mm512_set1_epi32(m_[0]),
                                   per_channel_ ? _mm512_loadu_si512(s_ + k) : _mm512_set1_epi32(s_[0]));
    return _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(v, offset_), low_), high_);
  }

  const int32_t* m_;
  const int32_t* s_;
  bool per_channel_, fast_ = false;
  std::vector<float> table_;  // per block of 16 channels: the scales, c + e, c + e for negative totals
  __m512i offset_, low_, high_, low_bytes_, high_bytes_;
};
#else
constexpr bool kVectorRescale = false;
#endif

// An int8 ADD that finishes a convolution (a residual connection): its output codes become ADD(conv, residual), or
// ADD(residual, conv) with residual_first, by the ADD's table and estimate (tflite_add_lookup), in place.
struct FinishingAdd {
  const int8_t* residual = nullptr;  // none: the convolution's codes as they are
  const int8_t* table = nullptr;
  bool residual_first = false;
  mixprec::AddFit fit{kNoFit};

  // Codes [begin, end) of the output o.
  void apply(int8_t* o, int64_t begin, int64_t end) const {
    if (residual == nullptr) return;
    const auto* conv = reinterpret_cast<const uint8_t*>(o);
    const auto* other = reinterpret_cast<const uint8_t*>(residual);
    mixprec::lookup_range(residual_first ? other : conv, residual_first ? conv : other, table, fit, begin, end, o);
  }

 private:
  static constexpr float kNoFit[mixprec::kAddFitFloats] = {0, 0, 0, 2, 1, -128, 127};  // every lane from the table
};

struct Geometry {
  int64_t batch, height, width, channels, kh, kw, out_channels, out_h, out_w;
  int64_t stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left;
  bool depthwise;
};

// Calls visit(ky, kx, offset of that input pixel's first channel) for each point of output (n, y, xo)'s
// window that lies inside the image (TFLite sums only those).
template <typename Visit>
inline void for_each_window_point(const Geometry& g, int64_t n, int64_t y, int64_t xo, const Visit& visit) {
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t iy = y * g.stride_h - g.pad_top + ky * g.dilation_h;
    if (iy < 0 || iy >= g.height) continue;
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t ix = xo * g.stride_w - g.pad_left + kx * g.dilation_w;
      if (ix < 0 || ix >= g.width) continue;
      visit(ky, kx, ((n * g.height + iy) * g.width + ix) * g.channels);
    }
  }
}

// An unpadded 1x1 stride-1 convolution on the input's own grid: each window is one pixel, consecutive windows
// consecutive in the input (the GEMMs read them in place when their length also suits the kernel).
inline bool windows_are_pixels(const Geometry& g) {
  return g.kh == 1 && g.kw == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_top == 0 && g.pad_left == 0 &&
         g.out_h == g.height && g.out_w == g.width;
}

// Writes output pixel `pixel`'s window (kh x kw points of `channels` elements of the NHWC input) to row in the order
// (ky, kx, channel) and returns the end of what it wrote. copy(dst, src, count) copies count input elements as the
// caller's element type holds them; outside(dst, count) writes count elements of a point outside the image.
template <typename T, typename Copy, typename Outside>
inline T* gather_window(const Geometry& g, const int8_t* in, int64_t pixel, T* row, const Copy& copy,
                        const Outside& outside) {
  const int64_t n = pixel / (g.out_h * g.out_w), y = pixel / g.out_w % g.out_h, xo = pixel % g.out_w;
  const int64_t ix0 = xo * g.stride_w - g.pad_left;
  const bool whole_rows = g.dilation_w == 1 && ix0 >= 0 && ix0 + g.kw <= g.width;  // kw pixels in one copy
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t iy = y * g.stride_h - g.pad_top + ky * g.dilation_h;
    if (whole_rows && iy >= 0 && iy < g.height) {
      copy(row, in + ((n * g.height + iy) * g.width + ix0) * g.channels, g.kw * g.channels);
      row += g.kw * g.channels;
      continue;
    }
    for (int64_t kx = 0; kx < g.kw; ++kx, row += g.channels) {
      const int64_t ix = ix0 + kx * g.dilation_w;
      if (iy < 0 || iy >= g.height || ix < 0 || ix >= g.width) {
        outside(row, g.channels);
      } else {
        copy(row, in + ((n * g.height + iy) * g.width + ix) * g.channels, g.channels);
      }
    }
  }
  return row;
}

// In: int8 (gemmlowp's rescale) or int16 (16x8: the reduced rescale). Sum: what the window's
// products are summed in (int32 wherever that cannot overflow); the bias joins in int64 at the end.
template <typename In, typename Sum>
void convolve(const Geometry& g, const In* in, const int8_t* wt, const std::vector<int64_t>& bias, const int32_t* m,
              const int32_t* s, bool per_channel, int32_t in_off, int64_t output_offset, int64_t act_min,
              int64_t act_max, In* o) {
  const int64_t depth_multiplier = g.depthwise ? g.out_channels / g.channels : 1;
  // For few input channels, CONV_2D weights laid out [kh, kw, in, out] once, so the innermost loop
  // runs over output channels, contiguous in both the weights and the accumulators (it
  // vectorizes); depthwise weights are [kh, kw, out] already.
  std::vector<int8_t> transposed;
  if (!g.depthwise && g.channels < kDotChannels) {
    transposed.resize(static_cast<size_t>(g.out_channels * g.kh * g.kw * g.channels));
    for (int64_t c = 0; c < g.out_channels; ++c)
      for (int64_t k = 0; k < g.kh * g.kw; ++k)
        for (int64_t i = 0; i < g.channels; ++i)
          transposed[(k * g.channels + i) * g.out_channels + c] = wt[(c * g.kh * g.kw + k) * g.channels + i];
  }
  // int8: the bias fits int32 (the converter's bounds), so the vector rescale adds it in int32
  std::vector<int32_t> bias32;
  if constexpr (sizeof(In) == 1) bias32.assign(bias.begin(), bias.end());  // int16's int64 biases stay wide
#if defined(__AVX512F__) && defined(__AVX512BW__)
  std::unique_ptr<Int8Store16> store;
  if constexpr (sizeof(In) == 1 && kVectorRescale) {
    store = std::make_unique<Int8Store16>(m, s, per_channel, g.out_channels, static_cast<int32_t>(output_offset),
                                          static_cast<int32_t>(act_min), static_cast<int32_t>(act_max));
  }
#elif defined(MIXPREC_AVX2_LANES)
  std::unique_ptr<mixprec::Int8Store8> store;
  if constexpr (sizeof(In) == 1) {
    store = std::make_unique<mixprec::Int8Store8>(m, s, per_channel, g.out_channels,
                                                  static_cast<int32_t>(output_offset), static_cast<int32_t>(act_min),
                                                  static_cast<int32_t>(act_max));
  }
#endif
  const int64_t work = g.batch * g.out_h * g.out_w * g.out_channels * g.kh * g.kw * (g.depthwise ? 1 : g.channels);
  mixprec::split_rows_balanced(g.batch * g.out_h, work, [&](int64_t begin, int64_t end) {
    std::vector<Sum> acc(g.out_channels);
    std::vector<Sum> shifted(std::max(g.out_channels, g.channels));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.out_h, y = row % g.out_h;
      for (int64_t xo = 0; xo < g.out_w; ++xo) {
        std::fill(acc.begin(), acc.end(), Sum{0});
        for_each_window_point(g, n, y, xo, [&](int64_t ky, int64_t kx, int64_t offset) {
          const In* pixel = in + offset;
          if (g.depthwise) {  // input channel c / depth_multiplier feeds output c
            const int8_t* wrow = wt + (ky * g.kw + kx) * g.out_channels;
            if (depth_multiplier == 1) {
              for (int64_t c = 0; c < g.out_channels; ++c) acc[c] += static_cast<Sum>(pixel[c] + in_off) * wrow[c];
            } else {
              for (int64_t c = 0; c < g.out_channels; ++c) shifted[c] = pixel[c / depth_multiplier] + in_off;
              for (int64_t c = 0; c < g.out_channels; ++c) acc[c] += shifted[c] * wrow[c];
            }
          } else if (g.channels >= kDotChannels) {  // long windows: one dot product per output channel
            for (int64_t i = 0; i < g.channels; ++i) shifted[i] = pixel[i] + in_off;
            for (int64_t c = 0; c < g.out_channels; ++c) {
              const int8_t* wrow = wt + ((c * g.kh + ky) * g.kw + kx) * g.channels;
              Sum sum = 0;
              for (int64_t i = 0; i < g.channels; ++i) sum += shifted[i] * wrow[i];
              acc[c] += sum;
            }
          } else {
            const int8_t* wblock = transposed.data() + (ky * g.kw + kx) * g.channels * g.out_channels;
            for (int64_t i = 0; i < g.channels; ++i) {
              const Sum v = pixel[i] + in_off;
              const int8_t* wrow = wblock + i * g.out_channels;
              for (int64_t c = 0; c < g.out_channels; ++c) acc[c] += v * wrow[c];
            }
          }
        });
        In* dst = o + ((n * g.out_h + y) * g.out_w + xo) * g.out_channels;
        int64_t first = 0;  // channels from here on take the scalar rescale
#if defined(__AVX512F__) && defined(__AVX512BW__)
        if constexpr (sizeof(In) == 1 && kVectorRescale) {
          for (; first + 16 <= g.out_channels; first += 16) {
            __m512i total = _mm512_loadu_si512(acc.data() + first);
            if (!bias32.empty()) total = _mm512_add_epi32(total, _mm512_loadu_si512(bias32.data() + first));
            (*store)(total, first, reinterpret_cast<int8_t*>(dst) + first);
          }
        }
#elif defined(MIXPREC_AVX2_LANES)
        if constexpr (sizeof(In) == 1) {
          for (; first + 8 <= g.out_channels; first += 8) {
            __m256i total = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc.data() + first));
            if (!bias32.empty()) {
              const auto* start = reinterpret_cast<const __m256i*>(bias32.data() + first);
              total = _mm256_add_epi32(total, _mm256_loadu_si256(start));
            }
            (*store)(total, first, reinterpret_cast<int8_t*>(dst) + first);
          }
        }
#endif
        for (int64_t c = first; c < g.out_channels; ++c) {
          const int64_t k = per_channel ? c : 0;
          const int64_t total = static_cast<int64_t>(acc[c]) + (bias.empty() ? 0 : bias[c]);
          int64_t v;
          if constexpr (sizeof(In) == 1) {  // the int8 bounds keep the total inside int32
            v = static_cast<int64_t>(requantize(static_cast<int32_t>(total), m[k], s[k])) + output_offset;
          } else {
            v = static_cast<int64_t>(requantize_wide(total, m[k], s[k])) + output_offset;
          }
          dst[c] = static_cast<In>(std::clamp<int64_t>(v, act_min, act_max));
        }
      }
    }
  });
}


#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Where each pixel of a tile finds its GEMM row: `rows` runs of `run` bytes (a multiple of 4), run r at
// offset[r] from the pixel's base (one run for a gathered or 1x1 row; a window's kh rows read in place).
struct WindowRuns {
  const int64_t* offset;
  int64_t rows, run;
};

// kPixels x kBlocks tile of the GEMM: acc[p][b] = start[16 b + lane] + sum_k u[p, k] * w[16 b + lane, k], u the
// codes plus 128 as uint8, the weights packed [depth / 4][blocks][16 lanes][4 consecutive window bytes] for vpdpbusd
// (each pixel's 4 codes broadcast from memory into every lane).
// The accumulators are locals, copied out once at the end: an output array updated in the loop
// stayed in memory (GCC stored every register back on each step).
template <int kPixels, int kBlocks>
inline void window_tile(const uint8_t* const* base, const WindowRuns& runs, const int8_t* packed, int64_t blocks,
                        const int32_t* start, __m512i (&out)[kPixels][kBlocks]) {
  __m512i acc[kPixels][kBlocks];
#pragma GCC unroll 8
  for (int p = 0; p < kPixels; ++p)
#pragma GCC unroll 4
    for (int b = 0; b < kBlocks; ++b) acc[p][b] = _mm512_loadu_si512(start + 16 * b);
  const int8_t* wk = packed;
  for (int64_t r = 0; r < runs.rows; ++r) {
    const int64_t at = runs.offset[r];
    for (int64_t k = 0; k < runs.run; k += 4, wk += blocks * 64) {
      __m512i w[kBlocks];
#pragma GCC unroll 4
      for (int b = 0; b < kBlocks; ++b) w[b] = _mm512_loadu_si512(wk + b * 64);
#pragma GCC unroll 8
      for (int p = 0; p < kPixels; ++p) {
        int32_t quad;
        std::memcpy(&quad, base[p] + at + k, 4);
        const __m512i broadcast = _mm512_set1_epi32(quad);
#pragma GCC unroll 4
        for (int b = 0; b < kBlocks; ++b) acc[p][b] = _mm512_dpbusd_epi32(acc[p][b], broadcast, w[b]);
      }
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < kPixels; ++p)
#pragma GCC unroll 4
    for (int b = 0; b < kBlocks; ++b) out[p][b] = acc[p][b];
}

// dst[i] = src[i] + 128 as uint8 (x ^ 0x80), count bytes.
inline void shift_to_unsigned(const int8_t* src, uint8_t* dst, int64_t count) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  int64_t i = 0;
  for (; i + 64 <= count; i += 64) {
    _mm512_storeu_si512(dst + i, _mm512_xor_si512(_mm512_loadu_si512(src + i), flip));
  }
  const __mmask64 tail = _cvtu64_mask64(count - i >= 64 ? ~0ULL : (1ULL << (count - i)) - 1);
  _mm512_mask_storeu_epi8(dst + i, tail, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, src + i), flip));
}

// An int8 CONV_2D as one GEMM over all output pixels (see the file header): each pixel's window,
// [kh, kw, in] like a weight row, is one GEMM row (the input itself for an unpadded 1x1, stride-1
// convolution; read in place, kh runs from one shifted copy of the input padded around the image, each run
// rounded up to 4 bytes under zero weights, where the window's rows are contiguous (dilation 1 along them);
// otherwise gathered per chunk of pixels, the row padded to a multiple of 4 under zero weights). Points
// outside the image take the code -input_offset, which contributes 0.
// Pixels per register tile: kTilePixels x 4 accumulators and 4 weight registers of the 32.
constexpr int kTilePixels = 6;
constexpr int64_t kGemmChunk = 10 * kTilePixels;
// Output pixels whose padded input rows a convolution read in place lays out at a time (see conv_gemm_vnni): at
// ResNet-8's shapes 20-90 KB of rows, within a core's L2.
constexpr int64_t kLocalPixels = 1024;

// A buffer of bytes for one call: up to kScratchKeep bytes reused from the calling thread's own (warm in its caches,
// no allocation), larger ones allocated for the call. One at a time per thread (the convolutions do not nest).
class ScratchBytes {
 public:
  explicit ScratchBytes(int64_t bytes) {
    if (bytes > kScratchKeep) {
      owned_.reset(new uint8_t[static_cast<size_t>(bytes)]);
      data_ = owned_.get();
      return;
    }
    thread_local std::vector<uint8_t> kept;
    if (static_cast<int64_t>(kept.size()) < bytes) kept.resize(static_cast<size_t>(bytes));
    data_ = kept.data();
  }
  uint8_t* data() const { return data_; }

 private:
  static constexpr int64_t kScratchKeep = int64_t{4} << 20;
  std::unique_ptr<uint8_t[]> owned_;
  uint8_t* data_ = nullptr;
};

// How conv_gemm_vnni reads a geometry's windows: directly (the input itself, an unpadded 1x1 stride-1
// convolution), in place (window rows contiguous, dilation 1 along them: from one shifted copy of the input padded
// so that every window lies inside it, kh runs of the row's kw x in bytes, each rounded up to 4 under zero weights,
// the bytes read past a row's end, the next pixel's, counting 0), or gathered (one run of the whole window).
struct GemmLayout {
  bool direct, in_place;
  int64_t window, run_count, real, run, depth;
};

inline GemmLayout gemm_layout(const Geometry& g) {
  const int64_t window = g.kh * g.kw * g.channels;
  const bool direct = windows_are_pixels(g) && window % 4 == 0;
  const bool in_place = !direct && g.dilation_w == 1;
  const int64_t run_count = in_place ? g.kh : 1, real = in_place ? g.kw * g.channels : window;
  const int64_t run = (real + 3) / 4 * 4;
  return {direct, in_place, window, run_count, real, run, run_count * run};
}

// The GEMM's weights [depth / 4][blocks][16 lanes][4 bytes] in the layout's runs, and per output channel the bias
// plus (input_offset - 128) times the weights' sum (the shift of the codes to uint8 taken back).
struct GemmWeights {
  std::vector<int8_t> packed;
  std::vector<int32_t> corrected;
};

GemmWeights pack_gemm_weights(const Geometry& g, const GemmLayout& layout, const int8_t* wt,
                              const std::vector<int64_t>& bias, int32_t in_off) {
  const int64_t outs = g.out_channels, blocks = outs / 16;
  GemmWeights packed{std::vector<int8_t>(static_cast<size_t>(layout.depth * outs), 0),
                     std::vector<int32_t>(static_cast<size_t>(outs))};
  for (int64_t c = 0; c < outs; ++c) {
    int32_t sum = 0;
    for (int64_t r = 0; r < layout.run_count; ++r) {
      for (int64_t j = 0; j < layout.real; ++j) {
        const int8_t w = wt[c * layout.window + r * layout.real + j];
        const int64_t k = r * layout.run + j;
        sum += w;
        packed.packed[static_cast<size_t>((((k / 4) * blocks + c / 16) * 16 + c % 16) * 4 + k % 4)] = w;
      }
    }
    packed.corrected[c] = static_cast<int32_t>((bias.empty() ? 0 : bias[c]) + int64_t{in_off - 128} * sum);
  }
  return packed;
}

void conv_gemm_vnni(const Geometry& g, const int8_t* in, const int8_t* packed_weights, const int32_t* corrected,
                    const int32_t* m, const int32_t* s, bool per_channel, int32_t in_off, int32_t output_offset,
                    int32_t act_min, int32_t act_max, const FinishingAdd& add, int8_t* o) {
  const GemmLayout layout = gemm_layout(g);
  const bool direct = layout.direct, in_place = layout.in_place;
  const int64_t window = layout.window, run = layout.run, depth = layout.depth;
  const int64_t outs = g.out_channels, blocks = outs / 16, pixels = g.batch * g.out_h * g.out_w;
  const int8_t outside = static_cast<int8_t>(-in_off);  // (x + input_offset) = 0: a point outside the image
  const Int8Store16 store(m, s, per_channel, outs, output_offset, act_min, act_max);
  // copies of a few bytes (a pixel's channels, a window row of a thin input) as one masked move
  auto copy = [](int8_t* dst, const int8_t* src, int64_t bytes) {
    if (bytes > 64) {
      std::memcpy(dst, src, static_cast<size_t>(bytes));
      return;
    }
    const __mmask64 mask = _cvtu64_mask64(bytes == 64 ? ~0ULL : (1ULL << bytes) - 1);
    _mm512_mask_storeu_epi8(dst, mask, _mm512_maskz_loadu_epi8(mask, src));
  };
  auto gather = [&](int64_t pixel, int8_t* row) {
    const auto fill = [outside](int8_t* dst, int64_t count) { std::memset(dst, outside, static_cast<size_t>(count)); };
    row = gather_window(g, in, pixel, row, copy, fill);
    std::memset(row, 0, static_cast<size_t>(depth - window));  // under zero weights
  };
  // one register tile of kPixels pixels from pixel `first` (all output channels), pixel i's runs at base[i]
  auto multiply = [&](auto pixels_tag, const uint8_t* const* base, const WindowRuns& runs, int64_t first) {
    constexpr int kPixels = decltype(pixels_tag)::value;
    int64_t b = 0;
    for (; b + 4 <= blocks; b += 4) {
      __m512i acc[kPixels][4];
      window_tile<kPixels, 4>(base, runs, packed_weights + b * 64, blocks, corrected + b * 16, acc);
      for (int i = 0; i < kPixels; ++i) {
        __m512i v[4];
        store.rescale4(acc[i], b * 16, v);
        _mm512_storeu_si512(o + (first + i) * outs + b * 16, store.codes64(v));
      }
    }
    for (; b < blocks; ++b) {  // the totals: the sums plus the bias and offset correction the tile started from
      __m512i acc[kPixels][1];
      window_tile<kPixels, 1>(base, runs, packed_weights + b * 64, blocks, corrected + b * 16, acc);
      int i = 0;
      if (blocks == 1) {  // 16 channels: four pixels' codes are 64 consecutive bytes, rescaled and stored together
        for (; i + 4 <= kPixels; i += 4) {
          const __m512i totals[4] = {acc[i][0], acc[i + 1][0], acc[i + 2][0], acc[i + 3][0]};
          __m512i v[4];
          store.rescale4(totals, 0, v, 0);
          _mm512_storeu_si512(o + (first + i) * 16, store.codes64(v));
        }
      }
      for (; i < kPixels; ++i) store(acc[i][0], b * 16, o + (first + i) * outs + b * 16);
    }
  };
  // chunks of pixels, each pixel's base given by base_of(pixel), called once per pixel in order
  auto multiply_all = [&](int64_t begin, int64_t end, const WindowRuns& runs, const auto& base_of) {
    const uint8_t* base[kTilePixels];
    int64_t p = begin;
    for (; p + kTilePixels <= end; p += kTilePixels) {
      for (int i = 0; i < kTilePixels; ++i) base[i] = base_of(p + i);
      multiply(std::integral_constant<int, kTilePixels>{}, base, runs, p);
    }
    for (; p < end; ++p) {
      base[0] = base_of(p);
      multiply(std::integral_constant<int, 1>{}, base, runs, p);
    }
    add.apply(o, begin * outs, end * outs);  // the chunk's codes, still in the cache
  };
  if (in_place) {
    // The padded image: every window inside it, points outside the image given the code -input_offset. Each stretch
    // of up to kLocalPixels output pixels lays out only the padded rows its windows read, as uint8 codes + 128 in the
    // layout of the whole padded batch from its first needed row on, in its thread's scratch, right before
    // multiplying them (still in the cache; no pass over the whole batch and no wait for every thread between the two).
    const int64_t rows = std::max(g.pad_top + g.height, (g.out_h - 1) * g.stride_h + (g.kh - 1) * g.dilation_h + 1);
    const int64_t cols = std::max(g.pad_left + g.width, (g.out_w - 1) * g.stride_w + g.kw);
    const int64_t sample = rows * cols * g.channels, line = cols * g.channels;
    const int64_t reach = (g.kh - 1) * g.dilation_h;  // padded rows below an output row's first that its windows read
    const auto blank = static_cast<uint8_t>(static_cast<uint8_t>(outside) ^ 0x80);
    const int64_t before = g.pad_left * g.channels, inside = g.width * g.channels;
    auto lay_out_row = [&](int64_t n, int64_t r, uint8_t* dst) {
      const int64_t iy = r - g.pad_top;
      if (iy < 0 || iy >= g.height) {
        std::memset(dst, blank, static_cast<size_t>(line));
        return;
      }
      std::memset(dst, blank, static_cast<size_t>(before));
      shift_to_unsigned(in + (n * g.height + iy) * inside, dst + before, inside);
      std::memset(dst + before + inside, blank, static_cast<size_t>(line - before - inside));
    };
    std::vector<int64_t> offset(static_cast<size_t>(g.kh));
    for (int64_t ky = 0; ky < g.kh; ++ky) offset[ky] = ky * g.dilation_h * line;
    const WindowRuns runs{offset.data(), g.kh, run};
    const int64_t step = g.stride_w * g.channels, row_step = g.stride_h * line, out_w = g.out_w, out_h = g.out_h;
    auto stretch = [&](int64_t begin, int64_t end) {
      const int64_t first_n = begin / (out_h * out_w), last_n = (end - 1) / (out_h * out_w);
      const int64_t first_y = begin / out_w % out_h, last_y = (end - 1) / out_w % out_h;
      // the stretch's rows from (first_n, first_row) to (last_n, last_row), at their offsets in the padded batch
      // less `origin`: a stretch inside one large image holds only its own rows
      const int64_t first_row = first_y * g.stride_h, last_row = last_y * g.stride_h + reach;
      const int64_t origin = first_row * line, bytes = (last_n - first_n) * sample + (last_row + 1) * line - origin;
      ScratchBytes local(bytes + 4);  // + the 4 bytes a last run may read past
      uint8_t* shifted = local.data();
      std::memset(shifted + bytes, 0, 4);
      for (int64_t n = first_n; n <= last_n; ++n) {
        const int64_t low = n == first_n ? first_row : 0, high = n == last_n ? last_row : rows - 1;
        for (int64_t r = low; r <= high; ++r) lay_out_row(n, r, shifted + (n - first_n) * sample + r * line - origin);
      }
      // pixels visited in order: their window bases by steps along a row and from row to row (no divisions)
      int64_t y = first_y, xo = begin % out_w, image = -origin;  // image: the current image's row 0, in bytes
      const uint8_t* row = shifted;
      multiply_all(begin, end, runs, [&](int64_t) {
        const uint8_t* base = row + xo * step;
        if (++xo == out_w) {
          xo = 0;
          if (++y == out_h) {
            y = 0;
            image += sample;
            row = shifted + image;
          } else {
            row += row_step;
          }
        }
        return base;
      });
    };
    mixprec::split_rows_balanced(pixels, pixels * depth * outs, [&](int64_t begin, int64_t end) {
      for (int64_t at = begin; at < end; at += kLocalPixels) stretch(at, std::min(end, at + kLocalPixels));
    });
    return;
  }
  const int64_t whole = 0;
  const WindowRuns runs{&whole, 1, depth};
  mixprec::split_rows_balanced(pixels, pixels * depth * outs, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> rows(direct ? 0 : static_cast<size_t>(kGemmChunk * depth));
    std::vector<uint8_t> shifted(static_cast<size_t>(kGemmChunk * depth));
    for (int64_t chunk = begin; chunk < end; chunk += kGemmChunk) {
      const int64_t count = std::min(kGemmChunk, end - chunk);
      const int8_t* codes = in + chunk * depth;
      if (!direct) {
        for (int64_t i = 0; i < count; ++i) gather(chunk + i, rows.data() + i * depth);
        codes = rows.data();
      }
      shift_to_unsigned(codes, shifted.data(), count * depth);
      multiply_all(chunk, chunk + count, runs,
                   [&](int64_t pixel) { return shifted.data() + (pixel - chunk) * depth; });
    }
  });
}
#endif

#if defined(MIXPREC_AVX2_LANES)
// An int8 CONV_2D as a GEMM in 16-bit integers on AVX2 (no VNNI; conv_gemm_avx2): each output pixel's window [kh,
// kw, in] gathered as int16 values x + input_offset (0 at points outside the image and in one element padding the
// window to an even length), the weights widened to int16 once and packed [depth / 2][blocks of 8 output
// channels][8 lanes][2 consecutive window elements], and vpmaddwd summing the pairs of products exactly in int32
// (|x + input_offset| <= 255, |w| <= 128), accumulated from the bias. No shift of the codes is taken back: the same
// integer sums as convolve().
struct Avx2GemmLayout {
  int64_t window, depth;  // the window's elements, rounded up to even
  bool direct;            // windows_are_pixels with an even window: each window widened straight from the input
};

inline Avx2GemmLayout avx2_gemm_layout(const Geometry& g) {
  const int64_t window = g.kh * g.kw * g.channels;
  return {window, (window + 1) / 2 * 2, windows_are_pixels(g) && window % 2 == 0};
}

// conv_gemm_avx2's accumulators start from the bias (int32 for int8 input), zeros without one.
std::vector<int32_t> gemm_start_avx2(const std::vector<int64_t>& bias, int64_t out_channels) {
  if (bias.empty()) return std::vector<int32_t>(static_cast<size_t>(out_channels), 0);
  return std::vector<int32_t>(bias.begin(), bias.end());
}

std::vector<int16_t> pack_gemm_weights_avx2(const Geometry& g, const int8_t* wt) {
  const Avx2GemmLayout layout = avx2_gemm_layout(g);
  const int64_t outs = g.out_channels, blocks = outs / 8;
  std::vector<int16_t> packed(static_cast<size_t>(layout.depth * outs), 0);
  for (int64_t c = 0; c < outs; ++c) {
    for (int64_t k = 0; k < layout.window; ++k) {
      packed[static_cast<size_t>((((k / 2) * blocks + c / 8) * 8 + c % 8) * 2 + k % 2)] = wt[c * layout.window + k];
    }
  }
  return packed;
}

// kPixels x kBlocks tile: acc[p][b] = bias[8 b + lane] + sum_k row_p[k] w[8 b + lane, k], each pixel's pair of
// elements broadcast into every lane.
template <int kPixels, int kBlocks>
inline void window_tile_avx2(const int16_t* const* rows, int64_t pairs, const int16_t* packed, int64_t blocks,
                             const int32_t* bias, __m256i (&out)[kPixels][kBlocks]) {
  __m256i acc[kPixels][kBlocks];
#pragma GCC unroll 8
  for (int p = 0; p < kPixels; ++p)
#pragma GCC unroll 4
    for (int b = 0; b < kBlocks; ++b) acc[p][b] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bias + 8 * b));
  const int16_t* wk = packed;
  for (int64_t k = 0; k < pairs; ++k, wk += blocks * 16) {
    __m256i w[kBlocks];
#pragma GCC unroll 4
    for (int b = 0; b < kBlocks; ++b) w[b] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 16 * b));
#pragma GCC unroll 8
    for (int p = 0; p < kPixels; ++p) {
      int32_t pair;
      std::memcpy(&pair, rows[p] + 2 * k, 4);
      const __m256i broadcast = _mm256_set1_epi32(pair);
#pragma GCC unroll 4
      for (int b = 0; b < kBlocks; ++b) acc[p][b] = _mm256_add_epi32(acc[p][b], _mm256_madd_epi16(broadcast, w[b]));
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < kPixels; ++p)
#pragma GCC unroll 4
    for (int b = 0; b < kBlocks; ++b) out[p][b] = acc[p][b];
}

// dst[i] = src[i] + offset as int16, count elements.
inline void widen_with_offset(const int8_t* src, int16_t* dst, int64_t count, int16_t offset) {
  const __m256i shift = _mm256_set1_epi16(offset);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m256i wide = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_add_epi16(wide, shift));
  }
  for (; i < count; ++i) dst[i] = static_cast<int16_t>(src[i] + offset);
}

// Pixels per register tile (kAvx2TilePixels x 2 accumulators, 2 weight registers and a broadcast of the 16) and per
// gathered chunk.
constexpr int kAvx2TilePixels = 6;
constexpr int64_t kAvx2Chunk = 8 * kAvx2TilePixels;

void conv_gemm_avx2(const Geometry& g, const int8_t* in, const int16_t* packed_weights, const int32_t* bias,
                    const int32_t* m, const int32_t* s, bool per_channel, int32_t in_off, int32_t output_offset,
                    int32_t act_min, int32_t act_max, const FinishingAdd& add, int8_t* o) {
  const Avx2GemmLayout layout = avx2_gemm_layout(g);
  const int64_t window = layout.window, depth = layout.depth, pairs = depth / 2;
  const int64_t outs = g.out_channels, blocks = outs / 8, pixels = g.batch * g.out_h * g.out_w;
  const auto offset = static_cast<int16_t>(in_off);
  const mixprec::Int8Store8 store(m, s, per_channel, outs, output_offset, act_min, act_max);
  auto gather = [&](int64_t pixel, int16_t* row) {
    const auto widen = [offset](int16_t* dst, const int8_t* src, int64_t count) {
      widen_with_offset(src, dst, count, offset);
    };
    const auto zero = [](int16_t* dst, int64_t count) { std::memset(dst, 0, static_cast<size_t>(count) * 2); };
    row = gather_window(g, in, pixel, row, widen, zero);
    if (depth > window) *row = 0;  // under zero weights
  };
  // one tile of kPixels pixels from pixel `first` (all output channels)
  auto multiply = [&](auto pixels_tag, const int16_t* const* rows, int64_t first) {
    constexpr int kPixels = decltype(pixels_tag)::value;
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
      __m256i acc[kPixels][2];
      window_tile_avx2<kPixels, 2>(rows, pairs, packed_weights + b * 16, blocks, bias + b * 8, acc);
      for (int i = 0; i < kPixels; ++i) {
        for (int k = 0; k < 2; ++k) store(acc[i][k], (b + k) * 8, o + (first + i) * outs + (b + k) * 8);
      }
    }
    if (b < blocks) {
      __m256i acc[kPixels][1];
      window_tile_avx2<kPixels, 1>(rows, pairs, packed_weights + b * 16, blocks, bias + b * 8, acc);
      for (int i = 0; i < kPixels; ++i) store(acc[i][0], b * 8, o + (first + i) * outs + b * 8);
    }
  };
  mixprec::split_rows_balanced(pixels, pixels * depth * outs, [&](int64_t begin, int64_t end) {
    std::vector<int16_t> gathered(static_cast<size_t>(kAvx2Chunk * depth));
    const int16_t* rows[kAvx2TilePixels];
    for (int64_t chunk = begin; chunk < end; chunk += kAvx2Chunk) {
      const int64_t count = std::min(kAvx2Chunk, end - chunk);
      if (layout.direct) {
        widen_with_offset(in + chunk * depth, gathered.data(), count * depth, offset);
      } else {
        for (int64_t i = 0; i < count; ++i) gather(chunk + i, gathered.data() + i * depth);
      }
      int64_t p = 0;
      for (; p + kAvx2TilePixels <= count; p += kAvx2TilePixels) {
        for (int i = 0; i < kAvx2TilePixels; ++i) rows[i] = gathered.data() + (p + i) * depth;
        multiply(std::integral_constant<int, kAvx2TilePixels>{}, rows, chunk + p);
      }
      for (; p < count; ++p) {
        rows[0] = gathered.data() + p * depth;
        multiply(std::integral_constant<int, 1>{}, rows, chunk + p);
      }
      add.apply(o, chunk * outs, (chunk + count) * outs);  // the chunk's codes, still in the cache
    }
  });
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// One padded row of `span` columns (pad_left of them before the image) as uint8 codes + 128, `lanes` bytes per
// column (channels rounded up to 64; the bytes past the channels are left as they are): the image row at `source`
// ([width][channels] int8), or nullptr for a row outside the image; columns outside take the code `outside`.
inline void lay_out_padded_row(const int8_t* source, int64_t width, int64_t pad_left, int64_t channels, int64_t span,
                               uint8_t outside, uint8_t* row) {
  const int64_t blocks = (channels + 63) / 64, lanes = blocks * 64;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), blank = _mm512_set1_epi8(static_cast<char>(outside));
  const __mmask64 tail = _cvtu64_mask64(channels % 64 == 0 ? ~0ULL : (1ULL << (channels % 64)) - 1);
  for (int64_t q = 0; q < span; ++q, row += lanes) {
    const int64_t ix = q - pad_left;
    if (source == nullptr || ix < 0 || ix >= width) {
      for (int64_t b = 0; b < blocks; ++b) _mm512_storeu_si512(row + 64 * b, blank);
      continue;
    }
    const int8_t* pixel = source + ix * channels;
    for (int64_t b = 0; b + 1 < blocks; ++b) {
      _mm512_storeu_si512(row + 64 * b, _mm512_xor_si512(_mm512_loadu_si512(pixel + 64 * b), flip));
    }
    const int64_t b = blocks - 1;
    _mm512_mask_storeu_epi8(row + 64 * b, tail, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, pixel + 64 * b), flip));
  }
}

// One output row of one 64-channel block of depthwise_vnni: for output column xo, tap t's four registers of quads
// at first[t] + xo * advance, against the block's weights [tap][4] (kept in registers when kTaps > 0: the taps
// known at compile time), plus the corrected bias, rescaled and stored as int8 (64 channels, `keep` of them).
struct DepthwiseRow {
  const __m512i* const* first;
  int64_t taps, advance;
  const __m512i* weights;
  const int32_t* corrected;
  int64_t first_channel, out_w;
  int8_t* dst;
  int64_t dst_stride;
  __mmask64 keep;
};

template <int kTaps>
inline void depthwise_row(const DepthwiseRow& r, const Int8Store16& store) {
  constexpr int kHeld = kTaps > 0 ? kTaps * 4 : 1;
  const int64_t taps = kTaps > 0 ? kTaps : r.taps, advance = r.advance, out_w = r.out_w, stride = r.dst_stride;
  const __mmask64 keep = r.keep;
  __m512i held[kHeld];
  const __m512i* first[kTaps > 0 ? kTaps : 1];
  if constexpr (kTaps > 0) {
#pragma GCC unroll 20
    for (int i = 0; i < kHeld; ++i) held[i] = r.weights[i];
#pragma GCC unroll 5
    for (int t = 0; t < kTaps; ++t) first[t] = r.first[t];
  }
  __m512i bias[4];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) bias[k] = _mm512_loadu_si512(r.corrected + 16 * k);
  int8_t* dst = r.dst;
  for (int64_t xo = 0; xo < out_w; ++xo, dst += stride) {
    __m512i acc[4] = {bias[0], bias[1], bias[2], bias[3]};
#pragma GCC unroll 5
    for (int64_t t = 0; t < taps; ++t) {
      const __m512i* e = (kTaps > 0 ? first[t] : r.first[t]) + xo * advance;
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        acc[k] = _mm512_dpbusd_epi32(acc[k], e[k], kTaps > 0 ? held[t * 4 + k] : r.weights[t * 4 + k]);
      }
    }
    __m512i v[4];
    store.rescale4(acc, r.first_channel, v);
    const __m512i codes = _mm512_packs_epi16(_mm512_packs_epi32(v[0], v[1]), _mm512_packs_epi32(v[2], v[3]));
    _mm512_mask_storeu_epi8(dst, keep, store.clamp(codes));
  }
}

// depthwise_vnni's weights in its registers' lane order (slot 64 b + 16 k + 4 L + j holds channel 64 b + 16 L + 4 k
// + j, see below), for lanes = channels rounded up to 64: the weights [block][tap][4 registers] (tap = kernel row x
// quad of four columns, columns past the kernel's width zero), per slot the bias plus (input_offset - 128) times the
// channel's weight sum, and the channel's multiplier and shift (padding slots: zero). Made once per record
// (tflite_depthwise_pack) or per call.
struct DepthwiseWeights {
  std::vector<__m512i> packed;
  std::vector<int32_t> corrected, slot_m, slot_s;
};

// Where depthwise_vnni reads those (from a DepthwiseWeights or a prepacked tensor).
struct DepthwiseView {
  const __m512i* packed;
  const int32_t *corrected, *slot_m, *slot_s;
};

inline int64_t depthwise_taps(int64_t kh, int64_t kw) { return kh * ((kw + 3) / 4); }

DepthwiseWeights pack_depthwise(int64_t channels, int64_t kh, int64_t kw, const int8_t* wt,
                                const std::vector<int64_t>& bias, const int32_t* m, const int32_t* s, bool per_channel,
                                int32_t in_off) {
  const int64_t lanes = (channels + 63) / 64 * 64, groups = (kw + 3) / 4, taps = depthwise_taps(kh, kw);
  auto channel_of = [](int64_t slot) {
    const int64_t within = slot % 64, k = within / 16, lane = within % 16 / 4, j = within % 4;
    return slot - within + 16 * lane + 4 * k + j;
  };
  const auto slots = static_cast<size_t>(lanes);
  DepthwiseWeights w{std::vector<__m512i>(static_cast<size_t>(lanes / 64 * taps * 4)),  // zeros
                     std::vector<int32_t>(slots, 0), std::vector<int32_t>(slots, 0), std::vector<int32_t>(slots, 0)};
  for (int64_t slot = 0; slot < lanes; ++slot) {
    const int64_t c = channel_of(slot);
    if (c >= channels) continue;  // padding channels: zero weights, outputs not stored
    int64_t sum = 0;
    for (int64_t t = 0; t < kh * kw; ++t) sum += wt[t * channels + c];
    w.corrected[slot] = static_cast<int32_t>((bias.empty() ? 0 : bias[c]) + int64_t{in_off - 128} * sum);
    w.slot_m[slot] = m[per_channel ? c : 0];
    w.slot_s[slot] = s[per_channel ? c : 0];
    for (int64_t ky = 0; ky < kh; ++ky) {
      for (int64_t kx = 0; kx < kw; ++kx) {
        auto* bytes = reinterpret_cast<int8_t*>(w.packed.data() + ((slot / 64) * taps + ky * groups + kx / 4) * 4);
        bytes[slot % 64 * 4 + kx % 4] = wt[(ky * kw + kx) * channels + c];
      }
    }
  }
  return w;
}

// An int8 DEPTHWISE_CONV_2D with depth multiplier 1 and a multiple of 16 channels as u8 x s8 dot products of four
// window points along a row (vpdpbusd), 64 channels per step. Each padded row of a sample is laid out once, into a
// ring of the rows an output row reads, as "quads": for every column q the codes of columns q, q + d, q + 2d, q +
// 3d (d the dilation) side by side per channel, shifted by +128 into uint8, points outside the image given the code
// -input_offset (so that x + input_offset = 0 there: TFLite sums only in-image points) and the shift taken back
// through the weights' sums, acc = sum (x + 128) w + (input_offset - 128) sum w. A row's taps 4i .. 4i + 3 are then
// one dot product against the quad at its column plus 4 i d, taps past the kernel's width under zero weights. The
// quads come from byte and word unpacks, which leave register k's lane 4 L + j holding channel 16 L + 4 k + j of
// the 64; the weights, bias and rescale tables take that order, and two saturating packs of the four rescaled
// registers restore the channels' order. The same integer sums as convolve().
void depthwise_vnni(const Geometry& g, const int8_t* in, const DepthwiseView& w, const int32_t* m, const int32_t* s,
                    bool per_channel, int32_t in_off, int32_t output_offset, int32_t act_min, int32_t act_max,
                    int8_t* o) {
  const int64_t channels = g.channels, blocks = (channels + 63) / 64, lanes = blocks * 64;
  const int64_t groups = (g.kw + 3) / 4, step = 4 * g.dilation_w;  // quads per kernel row, columns between them
  const int64_t reach_h = (g.out_h - 1) * g.stride_h + (g.kh - 1) * g.dilation_h + 1;
  const int64_t entries = (g.out_w - 1) * g.stride_w + (groups - 1) * step + 1;  // quads per laid-out row
  const int64_t span = entries + 3 * g.dilation_w;  // padded columns those quads read
  const int64_t taps = g.kh * groups;  // quads summed per output
  const Int8Store16 store(per_channel ? w.slot_m : m, per_channel ? w.slot_s : s, per_channel, lanes, output_offset,
                          act_min, act_max);
  const uint8_t outside = static_cast<uint8_t>(static_cast<int8_t>(-in_off) ^ 0x80);
  // row r of sample n's padded image as quads (entries x blocks x 4 registers) at `quads`
  auto lay_out_row = [&, span, entries, lanes, blocks, channels](int64_t n, int64_t r, __m512i* quads, uint8_t* row) {
    const int64_t iy = r - g.pad_top, pad_left = g.pad_left, width = g.width, dilation = g.dilation_w;
    const int8_t* source = iy >= 0 && iy < g.height ? in + (n * g.height + iy) * width * channels : nullptr;
    lay_out_padded_row(source, width, pad_left, channels, span, outside, row);
    for (int64_t q = 0; q < entries; ++q) {
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* at = row + q * lanes + 64 * b;
        const __m512i p0 = _mm512_loadu_si512(at), p1 = _mm512_loadu_si512(at + dilation * lanes);
        const __m512i p2 = _mm512_loadu_si512(at + 2 * dilation * lanes);
        const __m512i p3 = _mm512_loadu_si512(at + 3 * dilation * lanes);
        const __m512i low01 = _mm512_unpacklo_epi8(p0, p1), high01 = _mm512_unpackhi_epi8(p0, p1);
        const __m512i low23 = _mm512_unpacklo_epi8(p2, p3), high23 = _mm512_unpackhi_epi8(p2, p3);
        __m512i* dst = quads + (q * blocks + b) * 4;
        dst[0] = _mm512_unpacklo_epi16(low01, low23);
        dst[1] = _mm512_unpackhi_epi16(low01, low23);
        dst[2] = _mm512_unpacklo_epi16(high01, high23);
        dst[3] = _mm512_unpackhi_epi16(high01, high23);
      }
    }
  };
  // A ring of the rows one output row reads ((kh - 1) dilation + 1 consecutive padded rows, each laid out
  // once per sample as the output rows move down): small enough to stay in the L1 cache.
  const int64_t ring = (g.kh - 1) * g.dilation_h + 1, row_quads = entries * blocks * 4;
  mixprec::split_rows_balanced(g.batch * g.out_h, g.batch * g.out_h * g.out_w * channels * g.kh * g.kw,
                      [&](int64_t begin, int64_t end) {
    std::vector<__m512i> quads(static_cast<size_t>(ring * row_quads));
    std::vector<int64_t> held(static_cast<size_t>(ring), -1);  // n * reach_h + r of the row in each slot
    std::vector<uint8_t> row(static_cast<size_t>(span * lanes));
    std::vector<const __m512i*> rows(static_cast<size_t>(g.kh)), first(static_cast<size_t>(taps));
    for (int64_t index = begin; index < end; ++index) {
      const int64_t n = index / g.out_h, y = index % g.out_h;
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t r = y * g.stride_h + ky * g.dilation_h, slot = r % ring;
        __m512i* at = quads.data() + slot * row_quads;
        if (held[slot] != n * reach_h + r) {
          lay_out_row(n, r, at, row.data());
          held[slot] = n * reach_h + r;
        }
        rows[ky] = at;
      }
      int8_t* dst = o + (n * g.out_h + y) * g.out_w * channels;
      for (int64_t b = 0; b < blocks; ++b) {
        for (int64_t ky = 0; ky < g.kh; ++ky) {
          for (int64_t group = 0; group < groups; ++group) {
            first[ky * groups + group] = rows[ky] + (group * step * blocks + b) * 4;
          }
        }
        const int64_t count = std::min<int64_t>(64, channels - 64 * b);
        const DepthwiseRow row_out{first.data(), taps, g.stride_w * blocks * 4,
                                   w.packed + b * taps * 4, w.corrected + 64 * b, 64 * b, g.out_w,
                                   dst + 64 * b, channels,
                                   _cvtu64_mask64(count == 64 ? ~0ULL : (1ULL << count) - 1)};
        switch (taps) {
          case 1: depthwise_row<1>(row_out, store); break;
          case 2: depthwise_row<2>(row_out, store); break;
          case 3: depthwise_row<3>(row_out, store); break;
          case 4: depthwise_row<4>(row_out, store); break;
          case 5: depthwise_row<5>(row_out, store); break;
          default: depthwise_row<0>(row_out, store);
        }
      }
    }
  });
}
#endif

// Whether the int8 CONV_2D GEMM (conv_gemm_vnni; conv_gemm_avx2 on AVX2) runs this convolution: output channels a
// multiple of 16 (8), the code of a point outside the image (-input_offset) representable in int8.
inline bool takes_gemm(const Geometry& g, bool wide, int64_t input_offset) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return !wide && !g.depthwise && g.out_channels % 16 == 0 && input_offset >= -127 && input_offset <= 128;
#elif defined(MIXPREC_AVX2_LANES)
  return !wide && !g.depthwise && g.out_channels % 8 == 0 && input_offset >= -127 && input_offset <= 128;
#else
  return false;
#endif
}

// A prepacked GEMM: kPackHeader int64 naming what it was packed for (the geometry but the batch, and the input
// offset), then the corrected bias int32 [out], then the packed weights int8 [depth x out] (pack_gemm_weights); for
// conv_gemm_avx2 the bias int32 [out], then its int16 weights [depth x out] (pack_gemm_weights_avx2).
constexpr int64_t kPackHeader = 16;
#if defined(MIXPREC_AVX2_LANES)
constexpr int64_t kPackMagic = 0x6d78707263706132;  // "mxprcpa2"
#else
constexpr int64_t kPackMagic = 0x6d78707263707631;  // "mxprcpv1"
#endif

std::array<int64_t, kPackHeader> pack_header(const Geometry& g, int64_t input_offset) {
  return {kPackMagic, g.height, g.width, g.channels, g.kh, g.kw, g.out_channels, g.out_h, g.out_w, g.stride_h,
          g.stride_w, g.dilation_h, g.dilation_w, g.pad_top, g.pad_left, input_offset};
}

// A prepacked depthwise_vnni (tflite_depthwise_pack): kPackHeader int64 (kDepthwiseMagic, channels, kh, kw, input
// offset, the multipliers' count, then zeros), then int32 [lanes] each of the corrected bias, the slots' multipliers
// and shifts, then the weights [block][tap][4 registers] (DepthwiseWeights); every part 64-byte aligned.
constexpr int64_t kDepthwiseMagic = 0x6d78707264777631;  // "mxprdwv1"

std::array<int64_t, kPackHeader> depthwise_header(int64_t channels, int64_t kh, int64_t kw, int64_t input_offset,
                                                  int64_t multipliers) {
  return {kDepthwiseMagic, channels, kh, kw, input_offset, multipliers};
}

int64_t depthwise_pack_bytes(int64_t channels, int64_t kh, int64_t kw) {
  const int64_t lanes = (channels + 63) / 64 * 64;
  return kPackHeader * 8 + 3 * lanes * 4 + lanes / 64 * kh * ((kw + 3) / 4) * 4 * 64;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
DepthwiseView depthwise_view(const at::Tensor& pack, const Geometry& g, int64_t input_offset, int64_t multipliers) {
  const auto header = depthwise_header(g.channels, g.kh, g.kw, input_offset, multipliers);
  TORCH_CHECK(pack.scalar_type() == at::kChar && pack.is_contiguous() &&
                  pack.numel() == depthwise_pack_bytes(g.channels, g.kh, g.kw) &&
                  reinterpret_cast<uintptr_t>(pack.data_ptr<int8_t>()) % 64 == 0 &&
                  std::memcmp(pack.data_ptr<int8_t>(), header.data(), kPackHeader * 8) == 0,
              "prepacked depthwise weights must come from tflite_depthwise_pack for these weights, multipliers and "
              "input offset");
  const int64_t lanes = (g.channels + 63) / 64 * 64;
  const auto* words = reinterpret_cast<const int32_t*>(pack.data_ptr<int8_t>() + kPackHeader * 8);
  return {reinterpret_cast<const __m512i*>(words + 3 * lanes), words, words + lanes, words + 2 * lanes};
}
#endif

Geometry checked_geometry(int64_t batch, int64_t height, int64_t width, int64_t channels, const at::Tensor& w,
                          int64_t stride_h, int64_t stride_w, int64_t dilation_h, int64_t dilation_w, int64_t pad_top,
                          int64_t pad_left, int64_t out_h, int64_t out_w, bool depthwise) {
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kChar && w.is_contiguous(), "weights must be int8 4-D");
  const Geometry g{batch, height, width, channels, w.size(1), w.size(2), depthwise ? w.size(3) : w.size(0),
                   out_h, out_w, stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left, depthwise};
  TORCH_CHECK(depthwise ? (w.size(0) == 1 && g.out_channels % g.channels == 0) : w.size(3) == g.channels,
              "weights do not match the input channels");
  return g;
}

// The start of a prepacked GEMM after its header (the int32 starts, then the weights' weight_bytes), checked to come
// from tflite_conv2d_pack for this geometry and input offset; nullptr without a pack.
const int8_t* gemm_pack_body(const c10::optional<at::Tensor>& prepacked, const Geometry& g, int64_t input_offset,
                             int64_t weight_bytes) {
  if (!prepacked.has_value() || prepacked->numel() == 0) return nullptr;
  const auto header = pack_header(g, input_offset);
  const int64_t header_bytes = kPackHeader * 8;
  TORCH_CHECK(prepacked->scalar_type() == at::kChar && prepacked->is_contiguous() &&
                  prepacked->numel() == header_bytes + g.out_channels * 4 + weight_bytes &&
                  std::memcmp(prepacked->data_ptr<int8_t>(), header.data(), header_bytes) == 0,
              "prepacked weights must come from tflite_conv2d_pack for this geometry and input offset");
  return prepacked->data_ptr<int8_t>() + header_bytes;
}

// The GEMM's pack as one int8 tensor: the header, the int32 start of each output channel, the weights' bytes.
at::Tensor gemm_pack_tensor(const Geometry& g, int64_t input_offset, const std::vector<int32_t>& start,
                            const void* weights, int64_t weight_bytes, const at::TensorOptions& options) {
  const auto header = pack_header(g, input_offset);
  const int64_t header_bytes = kPackHeader * 8, start_bytes = g.out_channels * 4;
  auto out = at::empty({header_bytes + start_bytes + weight_bytes}, options);
  auto* bytes = out.data_ptr<int8_t>();
  std::memcpy(bytes, header.data(), static_cast<size_t>(header_bytes));
  std::memcpy(bytes + header_bytes, start.data(), static_cast<size_t>(start_bytes));
  std::memcpy(bytes + header_bytes + start_bytes, weights, static_cast<size_t>(weight_bytes));
  return out;
}

// The int8 CONV_2D GEMM's weights packed once for an input of height x width x channels (any batch), for
// tflite_conv2d's `prepacked`; an empty tensor where that convolution does not take the GEMM.
at::Tensor tflite_conv2d_pack(const at::Tensor& w, const c10::optional<at::Tensor>& bias, int64_t height,
                              int64_t width, int64_t channels, int64_t stride_h, int64_t stride_w, int64_t dilation_h,
                              int64_t dilation_w, int64_t pad_top, int64_t pad_left, int64_t out_h, int64_t out_w,
                              int64_t input_offset) {
  const Geometry g = checked_geometry(1, height, width, channels, w, stride_h, stride_w, dilation_h, dilation_w,
                                      pad_top, pad_left, out_h, out_w, false);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (!takes_gemm(g, false, input_offset)) return at::empty({0}, w.options());
  const GemmWeights packed = pack_gemm_weights(g, gemm_layout(g), w.data_ptr<int8_t>(),
                                               mixprec::bias_as_int64(bias, g.out_channels, false),
                                               static_cast<int32_t>(input_offset));
  return gemm_pack_tensor(g, input_offset, packed.corrected, packed.packed.data(),
                          static_cast<int64_t>(packed.packed.size()), w.options());
#elif defined(MIXPREC_AVX2_LANES)
  if (!takes_gemm(g, false, input_offset)) return at::empty({0}, w.options());
  const std::vector<int16_t> packed = pack_gemm_weights_avx2(g, w.data_ptr<int8_t>());
  return gemm_pack_tensor(g, input_offset,
                          gemm_start_avx2(mixprec::bias_as_int64(bias, g.out_channels, false), g.out_channels),
                          packed.data(), static_cast<int64_t>(packed.size()) * 2, w.options());
#else
  return at::empty({0}, w.options());
#endif
}

// depthwise_vnni's weights packed once (see depthwise_view), for tflite_conv2d's `prepacked`; an empty tensor where
// that depthwise convolution does not take depthwise_vnni. w: [1, kh, kw, channels] (depth multiplier 1).
at::Tensor tflite_depthwise_pack(const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& multiplier, const at::Tensor& shift, int64_t input_offset) {
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kChar && w.is_contiguous() && w.size(0) == 1,
              "depthwise weights must be int8 [1, kh, kw, channels]");
  const int64_t channels = w.size(3), kh = w.size(1), kw = w.size(2);
  TORCH_CHECK(multiplier.scalar_type() == at::kInt && shift.scalar_type() == at::kInt && multiplier.is_contiguous() &&
                  shift.is_contiguous() && multiplier.numel() == shift.numel() &&
                  (multiplier.numel() == 1 || multiplier.numel() == channels),
              "multiplier and shift must be int32 [1] or [channels]");
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (channels % 16 != 0 || input_offset < -127 || input_offset > 128) return at::empty({0}, w.options());
  const bool per_channel = multiplier.numel() > 1;
  const DepthwiseWeights packed =
      pack_depthwise(channels, kh, kw, w.data_ptr<int8_t>(), mixprec::bias_as_int64(bias, channels, false),
                     multiplier.data_ptr<int32_t>(), shift.data_ptr<int32_t>(), per_channel,
                     static_cast<int32_t>(input_offset));
  const auto header = depthwise_header(channels, kh, kw, input_offset, multiplier.numel());
  auto out = at::empty({depthwise_pack_bytes(channels, kh, kw)}, w.options());
  auto* bytes = out.data_ptr<int8_t>();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(bytes) % 64 == 0, "the allocator gave an unaligned pack");
  const size_t lane_bytes = packed.corrected.size() * 4;
  std::memcpy(bytes, header.data(), kPackHeader * 8);
  bytes += kPackHeader * 8;
  for (const auto* part : {&packed.corrected, &packed.slot_m, &packed.slot_s}) {
    std::memcpy(bytes, part->data(), lane_bytes);
    bytes += lane_bytes;
  }
  std::memcpy(bytes, packed.packed.data(), packed.packed.size() * 64);
  return out;
#else
  return at::empty({0}, w.options());
#endif
}

// The convolution's finishing ADD from tflite_conv2d's arguments (none without a residual), checked: an int8
// residual of the output's shape, the ADD's 65,540-byte table and its 7-float fit (tflite_add_fit).
FinishingAdd finishing_add(const at::Tensor& out, const c10::optional<at::Tensor>& residual,
                           const c10::optional<at::Tensor>& add_table, const c10::optional<at::Tensor>& add_fit,
                           bool residual_first) {
  if (!residual.has_value()) {
    TORCH_CHECK(!add_table.has_value() && !add_fit.has_value(), "an ADD's table and fit come with a residual");
    return {};
  }
  TORCH_CHECK(out.scalar_type() == at::kChar, "only an int8 convolution can finish with an ADD");
  TORCH_CHECK(residual->scalar_type() == at::kChar && residual->is_contiguous() && residual->sizes() == out.sizes(),
              "the residual must be a contiguous int8 tensor of the convolution's output shape ", out.sizes());
  TORCH_CHECK(add_table.has_value() && add_table->scalar_type() == at::kChar && add_table->is_contiguous() &&
                  add_table->numel() == mixprec::kAddTableBytes,
              "the ADD's table must be 65,540 contiguous int8 codes (AddParams.int8_table)");
  TORCH_CHECK(add_fit.has_value() && add_fit->scalar_type() == at::kFloat && add_fit->is_contiguous() &&
                  add_fit->numel() == mixprec::kAddFitFloats,
              "the ADD's fit must be the 7 contiguous float32 values tflite_add_fit gives for its table");
  FinishingAdd add;
  add.residual = residual->data_ptr<int8_t>();
  add.table = add_table->data_ptr<int8_t>();
  add.residual_first = residual_first;
  add.fit = mixprec::AddFit(add_fit->data_ptr<float>());
  return add;
}

at::Tensor tflite_conv2d(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& multiplier, const at::Tensor& shift, int64_t stride_h, int64_t stride_w,
                         int64_t dilation_h, int64_t dilation_w, int64_t pad_top, int64_t pad_left, int64_t out_h,
                         int64_t out_w, int64_t input_offset, int64_t output_offset, int64_t act_min, int64_t act_max,
                         bool depthwise, const c10::optional<at::Tensor>& prepacked,
                         const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& add_table,
                         const c10::optional<at::Tensor>& add_fit, bool residual_first) {
  const bool wide = x.scalar_type() == at::kShort;
  TORCH_CHECK(x.dim() == 4 && (wide || x.scalar_type() == at::kChar) && x.is_contiguous(),
              "x must be int8 or int16 NHWC, contiguous");
  const Geometry g = checked_geometry(x.size(0), x.size(1), x.size(2), x.size(3), w, stride_h, stride_w, dilation_h,
                                      dilation_w, pad_top, pad_left, out_h, out_w, depthwise);
  TORCH_CHECK(multiplier.scalar_type() == at::kInt && shift.scalar_type() == at::kInt &&
                  multiplier.numel() == shift.numel() &&
                  (multiplier.numel() == 1 || multiplier.numel() == g.out_channels),
              "multiplier and shift must be int32 [1] or [out]");
  const std::vector<int64_t> bias64 = mixprec::bias_as_int64(bias, g.out_channels, wide);
  auto out = at::empty({g.batch, out_h, out_w, g.out_channels}, x.options());
  const FinishingAdd add = finishing_add(out, residual, add_table, add_fit, residual_first);
  const int32_t* m = multiplier.data_ptr<int32_t>();
  const int32_t* s = shift.data_ptr<int32_t>();
  const bool per_channel = multiplier.numel() > 1;
  const int32_t in_off = static_cast<int32_t>(input_offset);
  // |int16 * int8| < 2^22, so a window of fewer than 2^9 products sums exactly in int32
  const int64_t window = g.kh * g.kw * (depthwise ? 1 : g.channels);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  // the GEMM path: int8 CONV_2D, output channels a multiple of 16, the outside code representable
  if (takes_gemm(g, wide, input_offset)) {
    GemmWeights local;
    const int8_t* packed_weights = nullptr;
    const int32_t* corrected = nullptr;
    if (const int8_t* body = gemm_pack_body(prepacked, g, input_offset, gemm_layout(g).depth * g.out_channels)) {
      corrected = reinterpret_cast<const int32_t*>(body);
      packed_weights = body + g.out_channels * 4;
    } else {
      local = pack_gemm_weights(g, gemm_layout(g), w.data_ptr<int8_t>(), bias64, in_off);
      packed_weights = local.packed.data();
      corrected = local.corrected.data();
    }
    conv_gemm_vnni(g, x.data_ptr<int8_t>(), packed_weights, corrected, m, s, per_channel, in_off,
                   static_cast<int32_t>(output_offset), static_cast<int32_t>(act_min), static_cast<int32_t>(act_max),
                   add, out.data_ptr<int8_t>());
    return out;
  }
  if (!wide && depthwise && g.out_channels == g.channels && g.channels % 16 == 0 && input_offset >= -127 &&
      input_offset <= 128) {
    DepthwiseWeights local;
    DepthwiseView view{};
    if (prepacked.has_value() && prepacked->numel() > 0) {
      view = depthwise_view(*prepacked, g, input_offset, multiplier.numel());
    } else {
      local = pack_depthwise(g.channels, g.kh, g.kw, w.data_ptr<int8_t>(), bias64, m, s, per_channel, in_off);
      view = {local.packed.data(), local.corrected.data(), local.slot_m.data(), local.slot_s.data()};
    }
    depthwise_vnni(g, x.data_ptr<int8_t>(), view, m, s, per_channel, in_off, static_cast<int32_t>(output_offset),
                   static_cast<int32_t>(act_min), static_cast<int32_t>(act_max), out.data_ptr<int8_t>());
    add.apply(out.data_ptr<int8_t>(), 0, out.numel());
    return out;
  }
#elif defined(MIXPREC_AVX2_LANES)
  if (takes_gemm(g, wide, input_offset)) {
    std::vector<int16_t> local_weights;
    std::vector<int32_t> local_start;
    const int16_t* packed_weights = nullptr;
    const int32_t* start = nullptr;
    if (const int8_t* body =
            gemm_pack_body(prepacked, g, input_offset, avx2_gemm_layout(g).depth * g.out_channels * 2)) {
      start = reinterpret_cast<const int32_t*>(body);
      packed_weights = reinterpret_cast<const int16_t*>(body + g.out_channels * 4);
    } else {
      local_weights = pack_gemm_weights_avx2(g, w.data_ptr<int8_t>());
      local_start = gemm_start_avx2(bias64, g.out_channels);
      packed_weights = local_weights.data();
      start = local_start.data();
    }
    conv_gemm_avx2(g, x.data_ptr<int8_t>(), packed_weights, start, m, s, per_channel, in_off,
                   static_cast<int32_t>(output_offset), static_cast<int32_t>(act_min), static_cast<int32_t>(act_max),
                   add, out.data_ptr<int8_t>());
    return out;
  }
#endif
  if (!wide) {
    convolve<int8_t, int32_t>(g, x.data_ptr<int8_t>(), w.data_ptr<int8_t>(), bias64, m, s, per_channel, in_off,
                              output_offset, act_min, act_max, out.data_ptr<int8_t>());
  } else if (window < 512) {
    convolve<int16_t, int32_t>(g, x.data_ptr<int16_t>(), w.data_ptr<int8_t>(), bias64, m, s, per_channel, in_off,
                               output_offset, act_min, act_max, out.data_ptr<int16_t>());
  } else {
    convolve<int16_t, int64_t>(g, x.data_ptr<int16_t>(), w.data_ptr<int8_t>(), bias64, m, s, per_channel, in_off,
                               output_offset, act_min, act_max, out.data_ptr<int16_t>());
  }
  if (!wide) add.apply(out.data_ptr<int8_t>(), 0, out.numel());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("tflite_conv2d(Tensor x, Tensor w, Tensor? bias, Tensor multiplier, Tensor shift, int stride_h, "
        "int stride_w, int dilation_h, int dilation_w, int pad_top, int pad_left, int out_h, int out_w, "
        "int input_offset, int output_offset, int act_min, int act_max, bool depthwise, Tensor? prepacked=None, "
        "Tensor? residual=None, Tensor? add_table=None, Tensor? add_fit=None, bool residual_first=False) -> Tensor");
  m.def("tflite_conv2d_pack(Tensor w, Tensor? bias, int height, int width, int channels, int stride_h, "
        "int stride_w, int dilation_h, int dilation_w, int pad_top, int pad_left, int out_h, int out_w, "
        "int input_offset) -> Tensor");
  m.def("tflite_depthwise_pack(Tensor w, Tensor? bias, Tensor multiplier, Tensor shift, int input_offset) -> Tensor");
}

// CPU kernels under the CPU dispatch key (not a catch-all), so torch.compile can pair each with
// its shape-only implementation (mixprec/kernels/fake_ops.py).
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("tflite_conv2d", &tflite_conv2d);
  m.impl("tflite_conv2d_pack", &tflite_conv2d_pack);
  m.impl("tflite_depthwise_pack", &tflite_depthwise_pack);
}
