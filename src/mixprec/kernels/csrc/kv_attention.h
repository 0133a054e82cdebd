// The decode attention over quantized KV-cache codes (kv_attention.cpp), for callers in this extension that keep the
// cache in their own buffers: one KV head's tokens at a fixed stride, fewer tokens attended than the buffers hold.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace mixprec {

// One sequence's cache, KV heads [0, heads): token t of head h is key_codes[(h * code_stride + t) * dim * bits / 8],
// its key chunk's scales key_scale[(h * chunk_stride + t / group) * dim], its value scales
// value_scale[(h * code_stride + t) * dim / value_group]; tokens [quantized, ...) are float32 rows
// recent_keys[(h * recent_stride + t - quantized) * dim].
struct QuantizedKVView {
  const uint8_t* key_codes;
  const at::Half* key_scale;
  const uint8_t* key_zero;
  const uint8_t* value_codes;
  const at::Half* value_scale;
  const uint8_t* value_zero;
  const float* recent_keys;
  const float* recent_values;
  int64_t heads, dim, bits, group, value_group, quantized, code_stride, chunk_stride, recent_stride;
};

// Whether kv_attend runs here for these shapes: an AVX-512 build, dim and value_group multiples of 32, 1 to 8 query
// heads per KV head.
bool kv_attend_supported(int64_t dim, int64_t value_group, int64_t query_group);

// out[(h * query_group + r) * dim + c]: attention of the query heads query[(h * query_group + r) * dim ...] over
// tokens [0, length) of the view (length <= quantized + the float rows present), no mask.
void kv_attend(const QuantizedKVView& cache, const float* query, int64_t query_group, int64_t length, float scaling,
               float* out);

}  // namespace mixprec
