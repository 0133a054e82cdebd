// One row of quantized KV-cache codes (mixprec/nn/kv_cache.py) dequantized to float32: x = (q - zero) * scale, each
// step rounded to float32 as the PyTorch reference does ((float(q) - float(zero)) * float(scale)). Shared by
// kv_dequant.cpp (the cache's tensors) and kv_cache_store.cpp (the native decoder's cache).
#pragma once

#include <cstdint>

namespace mixprec {

// dst[d] = (code[d] - zero[d]) * scale[d] for d in [0, count), codes from `row` starting at
// element `first` (even); ZeroStep/ScaleStep 0 broadcast one zero point/scale, 1 index them.
template <int Bits, int Step>
inline void dequantize_span(const uint8_t* row, int64_t first, int64_t count, const float* zero, const float* scale,
                            float* dst) {
  if constexpr (Bits == 8) {
#pragma omp simd
    for (int64_t d = 0; d < count; ++d)
      dst[d] = (static_cast<float>(row[first + d]) - zero[d * Step]) * scale[d * Step];
  } else {
    const uint8_t* bytes = row + first / 2;
#pragma omp simd
    for (int64_t i = 0; i < count / 2; ++i) {
      dst[2 * i] = (static_cast<float>(bytes[i] & 0xF) - zero[2 * i * Step]) * scale[2 * i * Step];
      dst[2 * i + 1] = (static_cast<float>(bytes[i] >> 4) - zero[(2 * i + 1) * Step]) * scale[(2 * i + 1) * Step];
    }
  }
}

// dequantize_span for `bits` known at run time (4 or 8).
template <int Step>
inline void dequantize_span(int64_t bits, const uint8_t* row, int64_t first, int64_t count, const float* zero,
                            const float* scale, float* dst) {
  if (bits == 8)
    dequantize_span<8, Step>(row, first, count, zero, scale, dst);
  else
    dequantize_span<4, Step>(row, first, count, zero, scale, dst);
}

}  // namespace mixprec
