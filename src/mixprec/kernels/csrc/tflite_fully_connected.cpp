// The integer engine's FULLY_CONNECTED (mixprec/integer/ops/fully_connected.py) in C++, int8 and 16x8:
// acc = bias + sum_k w[c, k] * (x[k] + input_offset), exact (int32 products summed in int32 for int8,
// whose reduction the caller bounds; in int64 for int16), then LiteRT's single-rounding rescale
// floor((acc * m + 2^(t - 1)) / 2^t), t = 31 - shift (exact in 128 bits), saturated to int32, plus the
// output offset, clamped to [act_min, act_max]. Per-channel or per-tensor multipliers. Rows are split
// over PyTorch's OpenMP threads.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include "split_rows.h"
#include "tflite_bias.h"
#include "tflite_rescale.h"

namespace {

inline int32_t rescale_single(int64_t acc, int32_t multiplier, int32_t shift) {
  const int total = 31 - shift;
  const __int128 product = static_cast<__int128>(acc) * multiplier;
  const __int128 rounded = (product + (static_cast<__int128>(1) << (total - 1))) >> total;
  return static_cast<int32_t>(std::clamp<__int128>(rounded, std::numeric_limits<int32_t>::min(),
                                                   std::numeric_limits<int32_t>::max()));
}

template <typename In, typename Sum>
void fully_connected(const In* x, const int8_t* w, const int64_t* bias, const int32_t* m, const int32_t* s,
                     bool per_channel, int64_t rows, int64_t in, int64_t outs, int32_t input_offset,
                     int32_t output_offset, int32_t act_min, int32_t act_max, In* out) {
  // the input offset through the weights' sums: acc = sum x w + input_offset * sum w + bias
  std::vector<int64_t> constant(static_cast<size_t>(outs));
  for (int64_t c = 0; c < outs; ++c) {
    int64_t sum = 0;
    for (int64_t k = 0; k < in; ++k) sum += w[c * in + k];
    constant[c] = int64_t{input_offset} * sum + (bias == nullptr ? 0 : bias[c]);
  }
  mixprec::split_rows_balanced(rows, rows * in * outs, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const In* row = x + r * in;
      for (int64_t c = 0; c < outs; ++c) {
        const int8_t* weights = w + c * in;
        Sum dot = 0;
        for (int64_t k = 0; k < in; ++k) dot += static_cast<Sum>(row[k]) * static_cast<Sum>(weights[k]);  // vectorizes
        const int64_t k = per_channel ? c : 0;
        const int64_t code = int64_t{rescale_single(int64_t{dot} + constant[c], m[k], s[k])} + output_offset;
        out[r * outs + c] = static_cast<In>(std::clamp<int64_t>(code, act_min, act_max));
      }
    }
  });
}

at::Tensor tflite_fully_connected(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                                  const at::Tensor& multiplier, const at::Tensor& shift, int64_t input_offset,
                                  int64_t output_offset, int64_t act_min, int64_t act_max) {
  const bool wide = x.scalar_type() == at::kShort;
  TORCH_CHECK(x.dim() == 2 && (wide || x.scalar_type() == at::kChar) && x.is_contiguous(),
              "x must be a contiguous int8 or int16 [rows, in] tensor");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous() && w.size(1) == x.size(1),
              "weights must be contiguous int8 [out, in] matching the input's features");
  const int64_t outs = w.size(0), in = w.size(1);
  TORCH_CHECK(in <= (wide ? (int64_t{1} << 24) : int64_t{32896}),
              "the reduction is longer than the accumulator allows");
  TORCH_CHECK(multiplier.scalar_type() == at::kInt && shift.scalar_type() == at::kInt && multiplier.is_contiguous() &&
                  shift.is_contiguous() && multiplier.numel() == shift.numel() &&
                  (multiplier.numel() == 1 || multiplier.numel() == outs),
              "multiplier and shift must be int32 [1] or [out]");
  const int32_t* m = multiplier.data_ptr<int32_t>();
  const int32_t* s = shift.data_ptr<int32_t>();
  for (int64_t i = 0; i < multiplier.numel(); ++i) {
    TORCH_CHECK(mixprec::fixed_point_in_range(m[i], s[i]), "multipliers must lie in [0, 2^31), shifts in [-31, 30]");
  }
  const int64_t code_max = wide ? 32767 : 127;
  TORCH_CHECK(-code_max - 1 <= act_min && act_min <= act_max && act_max <= code_max,
              "the activation range must lie inside the code range");
  TORCH_CHECK(wide ? (input_offset == 0 && output_offset == 0) : (std::abs(input_offset) <= 128),
              "offsets: 0 for int16, within [-128, 128] for int8");
  const std::vector<int64_t> bias64 = mixprec::bias_as_int64(bias, outs, wide);
  auto out = at::empty({x.size(0), outs}, x.options());
  const int64_t* b = bias64.empty() ? nullptr : bias64.data();
  const bool per_channel = multiplier.numel() > 1;
  const auto in_off = static_cast<int32_t>(input_offset), out_off = static_cast<int32_t>(output_offset);
  const auto low = static_cast<int32_t>(act_min), high = static_cast<int32_t>(act_max);
  if (wide) {
    fully_connected<int16_t, int64_t>(x.data_ptr<int16_t>(), w.data_ptr<int8_t>(), b, m, s, per_channel, x.size(0), in,
                                      outs, in_off, out_off, low, high, out.data_ptr<int16_t>());
  } else {
    fully_connected<int8_t, int32_t>(x.data_ptr<int8_t>(), w.data_ptr<int8_t>(), b, m, s, per_channel, x.size(0), in,
                                     outs, in_off, out_off, low, high, out.data_ptr<int8_t>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("tflite_fully_connected(Tensor x, Tensor w, Tensor? bias, Tensor multiplier, Tensor shift, int input_offset, "
        "int output_offset, int act_min, int act_max) -> Tensor");
}

// Under the CPU dispatch key, paired with its shape-only implementation (mixprec/kernels/fake_ops.py).
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("tflite_fully_connected", &tflite_fully_connected);
}
