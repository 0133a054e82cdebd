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
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "split_rows.h"

namespace {

// Input channels from which a CONV_2D sums each output channel as one dot product over the input
// channels (contiguous in the pixel and the weights); fewer run output channels innermost instead.
constexpr int64_t kDotChannels = 16;

inline int32_t srdhm(int32_t a, int32_t b) {
  if (a == std::numeric_limits<int32_t>::min() && b == std::numeric_limits<int32_t>::min()) {
    return std::numeric_limits<int32_t>::max();
  }
  const int64_t product = static_cast<int64_t>(a) * b;
  const int64_t nudge = product >= 0 ? (int64_t{1} << 30) : (1 - (int64_t{1} << 30));
  return static_cast<int32_t>((product + nudge) / (int64_t{1} << 31));  // C++ division: toward zero
}

inline int32_t rounding_divide_by_pot(int32_t x, int exponent) {
  const int32_t mask = static_cast<int32_t>((int64_t{1} << exponent) - 1);
  const int32_t remainder = x & mask;
  const int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
  return (x >> exponent) + (remainder > threshold ? 1 : 0);
}

inline int32_t requantize(int32_t acc, int32_t multiplier, int32_t shift) {
  const int left = shift > 0 ? shift : 0, right = shift > 0 ? 0 : -shift;
  const int64_t shifted = static_cast<int64_t>(acc) * (int64_t{1} << left);
  const int32_t saturated = static_cast<int32_t>(std::clamp<int64_t>(
      shifted, std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()));
  return rounding_divide_by_pot(srdhm(saturated, multiplier), right);
}

// TFLite's int64 MultiplyByQuantizedMultiplier (16x8): the multiplier reduced to 16 bits, one
// rounding (ties toward +inf), the result saturated to int32.
inline int32_t requantize_wide(int64_t acc, int32_t multiplier, int32_t shift) {
  const int64_t reduced = multiplier < 0x7FFF0000 ? (static_cast<int64_t>(multiplier) + (1 << 15)) >> 16 : 0x7FFF;
  const int total = 15 - shift;
  const int64_t result = (acc * reduced + (int64_t{1} << (total - 1))) >> total;
  return static_cast<int32_t>(std::clamp<int64_t>(result, std::numeric_limits<int32_t>::min(),
                                                  std::numeric_limits<int32_t>::max()));
}

struct Geometry {
  int64_t batch, height, width, channels, kh, kw, out_channels, out_h, out_w;
  int64_t stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left;
  bool depthwise;
};

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
  const int64_t work = g.batch * g.out_h * g.out_w * g.out_channels * g.kh * g.kw * (g.depthwise ? 1 : g.channels);
  mixprec::split_rows(g.batch * g.out_h, work, [&](int64_t begin, int64_t end) {
    std::vector<Sum> acc(g.out_channels);
    std::vector<Sum> shifted(std::max(g.out_channels, g.channels));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.out_h, y = row % g.out_h;
      for (int64_t xo = 0; xo < g.out_w; ++xo) {
        std::fill(acc.begin(), acc.end(), Sum{0});
        for (int64_t ky = 0; ky < g.kh; ++ky) {
          const int64_t iy = y * g.stride_h - g.pad_top + ky * g.dilation_h;
          if (iy < 0 || iy >= g.height) continue;
          for (int64_t kx = 0; kx < g.kw; ++kx) {
            const int64_t ix = xo * g.stride_w - g.pad_left + kx * g.dilation_w;
            if (ix < 0 || ix >= g.width) continue;
            const In* pixel = in + ((n * g.height + iy) * g.width + ix) * g.channels;
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
          }
        }
        In* dst = o + ((n * g.out_h + y) * g.out_w + xo) * g.out_channels;
        for (int64_t c = 0; c < g.out_channels; ++c) {
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

at::Tensor tflite_conv2d(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& multiplier, const at::Tensor& shift, int64_t stride_h, int64_t stride_w,
                         int64_t dilation_h, int64_t dilation_w, int64_t pad_top, int64_t pad_left, int64_t out_h,
                         int64_t out_w, int64_t input_offset, int64_t output_offset, int64_t act_min, int64_t act_max,
                         bool depthwise) {
  const bool wide = x.scalar_type() == at::kShort;
  TORCH_CHECK(x.dim() == 4 && (wide || x.scalar_type() == at::kChar) && x.is_contiguous(),
              "x must be int8 or int16 NHWC, contiguous");
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kChar && w.is_contiguous(), "weights must be int8 4-D");
  const Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), w.size(1), w.size(2),
                   depthwise ? w.size(3) : w.size(0), out_h, out_w, stride_h, stride_w, dilation_h, dilation_w,
                   pad_top, pad_left, depthwise};
  TORCH_CHECK(depthwise ? (w.size(0) == 1 && g.out_channels % g.channels == 0) : w.size(3) == g.channels,
              "weights do not match the input channels");
  TORCH_CHECK(multiplier.scalar_type() == at::kInt && shift.scalar_type() == at::kInt &&
                  multiplier.numel() == shift.numel() &&
                  (multiplier.numel() == 1 || multiplier.numel() == g.out_channels),
              "multiplier and shift must be int32 [1] or [out]");
  std::vector<int64_t> bias64;
  if (bias.has_value()) {
    TORCH_CHECK((bias->scalar_type() == at::kInt || (wide && bias->scalar_type() == at::kLong)) &&
                    bias->numel() == g.out_channels,
                "bias must be int32 [out] (int64 too for int16 input)");
    const at::Tensor b = bias->to(at::kLong).contiguous();
    bias64.assign(b.data_ptr<int64_t>(), b.data_ptr<int64_t>() + g.out_channels);
  }
  auto out = at::empty({g.batch, out_h, out_w, g.out_channels}, x.options());
  const int32_t* m = multiplier.data_ptr<int32_t>();
  const int32_t* s = shift.data_ptr<int32_t>();
  const bool per_channel = multiplier.numel() > 1;
  const int32_t in_off = static_cast<int32_t>(input_offset);
  // |int16 * int8| < 2^22, so a window of fewer than 2^9 products sums exactly in int32
  const int64_t window = g.kh * g.kw * (depthwise ? 1 : g.channels);
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
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("tflite_conv2d(Tensor x, Tensor w, Tensor? bias, Tensor multiplier, Tensor shift, int stride_h, "
        "int stride_w, int dilation_h, int dilation_w, int pad_top, int pad_left, int out_h, int out_w, "
        "int input_offset, int output_offset, int act_min, int act_max, bool depthwise) -> Tensor");
}

// CPU kernels under the CPU dispatch key (not a catch-all), so torch.compile can pair each with
// its shape-only implementation (mixprec/kernels/fake_ops.py).
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("tflite_conv2d", &tflite_conv2d);
}
