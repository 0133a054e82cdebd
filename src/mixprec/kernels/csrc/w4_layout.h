// The int4 weight layout every w4 kernel reads: packed [N, K/2] uint8 codes (two per byte)
// and fp16 group scales [N, K/G]; one check of it, shared by the kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace mixprec {

// Refuses a layout the kernels cannot read; the group size G = K / scale.size(1) must be a
// multiple of group_multiple (2 for a whole number of bytes, 4 for VNNI's 4-byte dots).
inline void check_w4_layout(const at::Tensor& packed, const at::Tensor& scale, int64_t cols,
                            int64_t group_multiple) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(1) * 2 == cols && packed.device().is_cpu(),
              "packed must be a contiguous uint8 CPU tensor [N, K/2]");
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == at::kHalf && scale.is_contiguous() &&
                  scale.size(0) == packed.size(0) && scale.size(1) > 0 &&
                  cols % (group_multiple * scale.size(1)) == 0,
              "scale must be a contiguous float16 tensor [N, K/G] with a group size G divisible by ",
              group_multiple);
}

}  // namespace mixprec
