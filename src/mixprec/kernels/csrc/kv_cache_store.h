// The native decoder's quantized KV cache (kv_cache_store.cpp): the layout of mixprec/nn/kv_cache.py (KIVI: keys
// per channel over chunks of `group` tokens, values per token over groups of channels, the newest tokens in float)
// in buffers allocated once for a whole sequence.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "kv_attention.h"

namespace mixprec {

// Tensors, in this order (H KV heads, D head_dim, C code capacity in tokens, a multiple of group, W = residual +
// group): key_codes uint8 [L, H, C, D * bits / 8], key_scale float16 [L, H, C / group, D], key_zero uint8 (same),
// value_codes uint8 [L, H, C, D * bits / 8], value_scale float16 [L, H, C, D / value_group], value_zero uint8
// (same), recent_keys float32 [L, H, W, D], recent_values float32 (same), quantized int64 [L] (tokens held as codes
// per layer).
constexpr int64_t kQuantizedCacheTensors = 9;

class QuantizedKVStore {
 public:
  QuantizedKVStore(at::TensorList tensors, int64_t bits, int64_t group, int64_t residual, int64_t value_group);

  int64_t layers() const { return layers_; }
  int64_t heads() const { return heads_; }
  int64_t dim() const { return dim_; }

  // Appends rows [rows, H * D] of keys and values for tokens [position, position + rows) to layer l (position = the
  // tokens the layer holds), quantizing the window's oldest `group` tokens whenever it holds residual + group.
  void append(int64_t l, const float* keys, const float* values, int64_t rows, int64_t position);
  // Layer l's cache as the attention kernel reads it.
  QuantizedKVView view(int64_t l) const;
  // Keys and values of tokens [0, length) of layer l as float32 [H, stride, D] (dequantized: (code - zero) * scale,
  // each step rounded to float32).
  void dequantize(int64_t l, int64_t length, float* keys, float* values, int64_t stride) const;

 private:
  std::vector<at::Tensor> t_;
  int64_t bits_, group_, residual_, value_group_, layers_, heads_, dim_, capacity_, window_, row_bytes_;
  int64_t* quantized_;
};

// Quantizes `group` tokens of one KV head: keys [group, D] (rows `stride` floats apart) per channel into codes
// [group, D * bits / 8], scale [D], zero [D]; values likewise per token and group of value_group channels into
// codes [group, D * bits / 8], scale and zero [group, D / value_group]. The rounding of mixprec/nn/kv_cache.py.
void quantize_kv_chunk(const float* keys, const float* values, int64_t stride, int64_t group, int64_t dim,
                       int64_t bits, int64_t value_group, uint8_t* key_codes, at::Half* key_scale, uint8_t* key_zero,
                       uint8_t* value_codes, at::Half* value_scale, uint8_t* value_zero);

}  // namespace mixprec
