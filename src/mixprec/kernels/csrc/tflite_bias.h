// An integer-engine kernel's optional bias as int64 per output channel: int32 [out], or int64 [out] too for int16
// (16x8) input; read in place (a dtype conversion would go through PyTorch's dispatcher on every call).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace mixprec {

inline std::vector<int64_t> bias_as_int64(const c10::optional<at::Tensor>& bias, int64_t out_channels, bool wide) {
  std::vector<int64_t> bias64;
  if (!bias.has_value()) return bias64;
  TORCH_CHECK((bias->scalar_type() == at::kInt || (wide && bias->scalar_type() == at::kLong)) &&
                  bias->numel() == out_channels && bias->is_contiguous(),
              "bias must be int32 [out] (int64 too for int16 input), contiguous");
  if (bias->scalar_type() == at::kInt) {
    bias64.assign(bias->data_ptr<int32_t>(), bias->data_ptr<int32_t>() + out_channels);
  } else {
    bias64.assign(bias->data_ptr<int64_t>(), bias->data_ptr<int64_t>() + out_channels);
  }
  return bias64;
}

}  // namespace mixprec
