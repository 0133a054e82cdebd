// The integer engine's int8 CONV_2D and DEPTHWISE_CONV_2D (mixprec/integer/ops/conv.py) in C++:
// the same arithmetic as the numpy reference, which the tests pin it to byte for byte.
//
// NHWC int8 input, weights [out, kh, kw, in] (CONV_2D) or [1, kh, kw, out] (depthwise, input
// channel c / depth_multiplier feeds output c), int32 bias. For each output position and
// channel: acc = bias + sum (x + input_offset) * w over the in-image window points (exact in
// int32: the window is bounded so that it cannot overflow), then gemmlowp's double-rounding
// MultiplyByQuantizedMultiplier (SaturatingRoundingDoublingHighMul, then RoundingDivideByPOT,
// per channel or per tensor), the output offset and the activation clamp. Output rows
// (batch x height) are split over PyTorch's OpenMP threads.
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

at::Tensor tflite_conv2d_s8(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                            const at::Tensor& multiplier, const at::Tensor& shift, int64_t stride_h, int64_t stride_w,
                            int64_t dilation_h, int64_t dilation_w, int64_t pad_top, int64_t pad_left, int64_t out_h,
                            int64_t out_w, int64_t input_offset, int64_t output_offset, int64_t act_min,
                            int64_t act_max, bool depthwise) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kChar && x.is_contiguous(), "x must be int8 NHWC, contiguous");
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kChar && w.is_contiguous(), "weights must be int8 4-D");
  const int64_t batch = x.size(0), height = x.size(1), width = x.size(2), channels = x.size(3);
  const int64_t kh = w.size(1), kw = w.size(2);
  const int64_t out_channels = depthwise ? w.size(3) : w.size(0);
  TORCH_CHECK(depthwise ? (w.size(0) == 1 && out_channels % channels == 0) : w.size(3) == channels,
              "weights do not match the input channels");
  TORCH_CHECK(multiplier.scalar_type() == at::kInt && shift.scalar_type() == at::kInt &&
                  multiplier.numel() == shift.numel() && (multiplier.numel() == 1 || multiplier.numel() == out_channels),
              "multiplier and shift must be int32 [1] or [out]");
  const int32_t* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kInt && bias->numel() == out_channels && bias->is_contiguous(),
                "bias must be int32 [out]");
    b = bias->data_ptr<int32_t>();
  }
  auto out = at::empty({batch, out_h, out_w, out_channels}, x.options());
  const int8_t* in = x.data_ptr<int8_t>();
  const int8_t* wt = w.data_ptr<int8_t>();
  const int32_t* m = multiplier.data_ptr<int32_t>();
  const int32_t* s = shift.data_ptr<int32_t>();
  const bool per_channel = multiplier.numel() > 1;
  const int64_t depth_multiplier = depthwise ? out_channels / channels : 1;
  int8_t* o = out.data_ptr<int8_t>();
  const int32_t in_off = static_cast<int32_t>(input_offset);
  // For few input channels, CONV_2D weights laid out [kh, kw, in, out] once, so the innermost loop
  // runs over output channels, contiguous in both the weights and the accumulators (it
  // vectorizes); depthwise weights are [kh, kw, out] already.
  std::vector<int8_t> transposed;
  if (!depthwise && channels < kDotChannels) {
    transposed.resize(static_cast<size_t>(out_channels * kh * kw * channels));
    for (int64_t c = 0; c < out_channels; ++c)
      for (int64_t k = 0; k < kh * kw; ++k)
        for (int64_t i = 0; i < channels; ++i)
          transposed[(k * channels + i) * out_channels + c] = wt[(c * kh * kw + k) * channels + i];
  }
  const int64_t work = batch * out_h * out_w * out_channels * kh * kw * (depthwise ? 1 : channels);
  mixprec::split_rows(batch * out_h, work, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> acc(out_channels);
    std::vector<int32_t> shifted(out_channels > channels ? out_channels : channels);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / out_h, y = row % out_h;
      for (int64_t xo = 0; xo < out_w; ++xo) {
        for (int64_t c = 0; c < out_channels; ++c) acc[c] = b ? b[c] : 0;
        for (int64_t ky = 0; ky < kh; ++ky) {
          const int64_t iy = y * stride_h - pad_top + ky * dilation_h;
          if (iy < 0 || iy >= height) continue;
          for (int64_t kx = 0; kx < kw; ++kx) {
            const int64_t ix = xo * stride_w - pad_left + kx * dilation_w;
            if (ix < 0 || ix >= width) continue;
            const int8_t* pixel = in + ((n * height + iy) * width + ix) * channels;
            if (depthwise) {  // input channel c / depth_multiplier feeds output c
              const int8_t* wrow = wt + (ky * kw + kx) * out_channels;
              if (depth_multiplier == 1) {
                for (int64_t c = 0; c < out_channels; ++c) acc[c] += (pixel[c] + in_off) * wrow[c];
              } else {
                for (int64_t c = 0; c < out_channels; ++c) shifted[c] = pixel[c / depth_multiplier] + in_off;
                for (int64_t c = 0; c < out_channels; ++c) acc[c] += shifted[c] * wrow[c];
              }
            } else if (channels >= kDotChannels) {  // long windows: one dot product per output channel
              for (int64_t i = 0; i < channels; ++i) shifted[i] = pixel[i] + in_off;
              for (int64_t c = 0; c < out_channels; ++c) {
                const int8_t* wrow = wt + ((c * kh + ky) * kw + kx) * channels;
                int32_t sum = 0;
                for (int64_t i = 0; i < channels; ++i) sum += shifted[i] * wrow[i];
                acc[c] += sum;
              }
            } else {
              const int8_t* wblock = transposed.data() + (ky * kw + kx) * channels * out_channels;
              for (int64_t i = 0; i < channels; ++i) {
                const int32_t v = pixel[i] + in_off;
                const int8_t* wrow = wblock + i * out_channels;
                for (int64_t c = 0; c < out_channels; ++c) acc[c] += v * wrow[c];
              }
            }
          }
        }
        int8_t* dst = o + ((n * out_h + y) * out_w + xo) * out_channels;
        for (int64_t c = 0; c < out_channels; ++c) {
          const int64_t k = per_channel ? c : 0;
          const int64_t v = static_cast<int64_t>(requantize(acc[c], m[k], s[k])) + output_offset;
          dst[c] = static_cast<int8_t>(std::clamp<int64_t>(v, act_min, act_max));
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("tflite_conv2d_s8(Tensor x, Tensor w, Tensor? bias, Tensor multiplier, Tensor shift, int stride_h, "
        "int stride_w, int dilation_h, int dilation_w, int pad_top, int pad_left, int out_h, int out_w, "
        "int input_offset, int output_offset, int act_min, int act_max, bool depthwise) -> Tensor",
        &tflite_conv2d_s8);
}
