// Dequantization of the quantized KV cache (mixprec/nn/kv_cache.py) straight into the
// float32 tensor attention reads, one pass: x = (q - zero) * scale, each step rounded to
// float32 as the PyTorch reference does ((float(q) - float(zero)) * float(scale)).
#include "kv_dequant.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

void check(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& out,
           int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(codes.dim() == 4 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "codes must be contiguous uint8 [B, H, T, D * bits / 8]");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && zero.scalar_type() == at::kByte &&
                  zero.is_contiguous() && scale.sizes() == zero.sizes(),
              "scale (float16) and zero (uint8) must be contiguous with equal shapes");
  TORCH_CHECK(out.dim() == 4 && out.scalar_type() == at::kFloat && out.stride(3) == 1 &&
                  out.size(0) == codes.size(0) && out.size(1) == codes.size(1) && out.size(2) == codes.size(2) &&
                  out.size(3) * bits == codes.size(3) * 8,
              "out must be float32 [B, H, T, D] with unit stride along D");
}

// Keys: scale/zero [B, H, T / group, D] (per channel, per chunk of `group` tokens).
void kv_dequantize_keys(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t group,
                        int64_t bits, at::Tensor& out) {
  check(codes, scale, zero, out, bits);
  const int64_t batch = out.size(0), heads = out.size(1), tokens = out.size(2), dim = out.size(3);
  TORCH_CHECK(group > 0 && tokens % group == 0 && scale.dim() == 4 && scale.size(2) == tokens / group &&
                  scale.size(3) == dim,
              "key scale must be [B, H, T / group, D]");
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const uint8_t* zp = zero.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t row_bytes = codes.size(3);
  std::vector<float> zero_f(dim), scale_f(dim);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t param = ((b * heads + h) * (tokens / group) + t / group) * dim;
        if (t % group == 0)
          for (int64_t d = 0; d < dim; ++d) {
            zero_f[d] = static_cast<float>(zp[param + d]);
            scale_f[d] = static_cast<float>(sp[param + d]);
          }
        const uint8_t* row = cp + ((b * heads + h) * tokens + t) * row_bytes;
        float* dst = op + b * out.stride(0) + h * out.stride(1) + t * out.stride(2);
        mixprec::dequantize_span<1>(bits, row, 0, dim, zero_f.data(), scale_f.data(), dst);
      }
}

// Values: scale/zero [B, H, T, D / group] (per token, per group of channels).
void kv_dequantize_values(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                          at::Tensor& out) {
  check(codes, scale, zero, out, bits);
  const int64_t batch = out.size(0), heads = out.size(1), tokens = out.size(2), dim = out.size(3);
  TORCH_CHECK(scale.dim() == 4 && scale.size(2) == tokens && scale.size(3) > 0 && dim % scale.size(3) == 0,
              "value scale must be [B, H, T, D / group]");
  const int64_t groups = scale.size(3), group = dim / groups;
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const uint8_t* zp = zero.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t row_bytes = codes.size(3);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t index = (b * heads + h) * tokens + t;
        const uint8_t* row = cp + index * row_bytes;
        float* dst = op + b * out.stride(0) + h * out.stride(1) + t * out.stride(2);
        for (int64_t g = 0; g < groups; ++g) {
          const float s = static_cast<float>(sp[index * groups + g]);
          const float z = static_cast<float>(zp[index * groups + g]);
          mixprec::dequantize_span<0>(bits, row, g * group, group, &z, &s, dst + g * group);
        }
      }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("kv_dequantize_keys(Tensor codes, Tensor scale, Tensor zero, int group, int bits, Tensor(a!) out) -> ()");
  m.def("kv_dequantize_values(Tensor codes, Tensor scale, Tensor zero, int bits, Tensor(a!) out) -> ()");
}

// CPU kernels under the CPU dispatch key (not a catch-all), so torch.compile can pair each with
// its shape-only implementation (mixprec/kernels/fake_ops.py).
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("kv_dequantize_keys", &kv_dequantize_keys);
  m.impl("kv_dequantize_values", &kv_dequantize_values);
}
