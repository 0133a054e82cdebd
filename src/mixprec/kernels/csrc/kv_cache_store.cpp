// The native decoder's quantized KV cache (see kv_cache_store.h), and the op that quantizes one chunk as it does.
//
// Rounding (mixprec/nn/kv_cache.py, bit for bit): over a slot's values x (a channel over a chunk of tokens for keys,
// a group of channels of one token for values), lo = min(min x, 0), hi = max(max x, 0), scale = fp16(max((hi - lo) /
// (2^bits - 1), 2^-14)) (float32 division, round to nearest even into float16), zero = clamp(rne(-lo / scale), 0,
// 2^bits - 1), code = clamp(rne(x / scale) + zero, 0, 2^bits - 1). 4-bit codes two per byte, the even channel in the
// low nibble. Non-finite keys or values and scales beyond float16's range are refused.
#include "kv_cache_store.h"

#include "kv_dequant.h"

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

namespace mixprec {
namespace {

constexpr float kScaleMin = 1.0f / 16384.0f;  // 2^-14, float16's smallest normal

// (scale as stored, zero point) of a slot with extremes lo0, hi0.
std::pair<at::Half, float> affine(float lo0, float hi0, float top) {
  TORCH_CHECK(std::isfinite(lo0) && std::isfinite(hi0), "keys or values hold NaN or Inf; a quantized KV cache cannot "
              "store them");
  const float lo = std::min(lo0, 0.0f), hi = std::max(hi0, 0.0f);
  const at::Half stored(std::max((hi - lo) / top, kScaleMin));
  const float scale = static_cast<float>(stored);
  TORCH_CHECK(std::isfinite(scale), "a KV cache scale of ", (hi - lo) / top, " exceeds 65504, the largest float16");
  return {stored, std::min(std::max(std::nearbyint(-lo / scale), 0.0f), top)};
}

inline uint8_t code(float x, float scale, float zero, float top) {
  return static_cast<uint8_t>(std::min(std::max(std::nearbyint(x / scale) + zero, 0.0f), top));
}

inline void put(uint8_t* row, int64_t c, uint8_t q, int64_t bits) {
  if (bits == 8)
    row[c] = q;
  else if (c % 2 == 0)
    row[c / 2] = q;
  else
    row[c / 2] |= static_cast<uint8_t>(q << 4);
}


}  // namespace

void quantize_kv_chunk(const float* keys, const float* values, int64_t stride, int64_t group, int64_t dim,
                       int64_t bits, int64_t value_group, uint8_t* key_codes, at::Half* key_scale, uint8_t* key_zero,
                       uint8_t* value_codes, at::Half* value_scale, uint8_t* value_zero) {
  const float top = static_cast<float>((1 << bits) - 1);
  const int64_t row_bytes = dim * bits / 8;
  for (int64_t c = 0; c < dim; ++c) {
    float lo = keys[c], hi = keys[c];
    for (int64_t t = 1; t < group; ++t) {
      lo = std::min(lo, keys[t * stride + c]);
      hi = std::max(hi, keys[t * stride + c]);
      if (std::isnan(keys[t * stride + c])) lo = hi = keys[t * stride + c];
    }
    const auto [stored, zero] = affine(lo, hi, top);
    key_scale[c] = stored;
    key_zero[c] = static_cast<uint8_t>(zero);
    const float scale = static_cast<float>(stored);
    for (int64_t t = 0; t < group; ++t) put(key_codes + t * row_bytes, c, code(keys[t * stride + c], scale, zero, top),
                                            bits);
  }
  const int64_t groups = dim / value_group;
  for (int64_t t = 0; t < group; ++t) {
    const float* row = values + t * stride;
    for (int64_t g = 0; g < groups; ++g) {
      const float* x = row + g * value_group;
      float lo = x[0], hi = x[0];
      for (int64_t c = 1; c < value_group; ++c) {
        lo = std::min(lo, x[c]);
        hi = std::max(hi, x[c]);
        if (std::isnan(x[c])) lo = hi = x[c];
      }
      const auto [stored, zero] = affine(lo, hi, top);
      value_scale[t * groups + g] = stored;
      value_zero[t * groups + g] = static_cast<uint8_t>(zero);
      const float scale = static_cast<float>(stored);
      for (int64_t c = 0; c < value_group; ++c)
        put(value_codes + t * row_bytes, g * value_group + c, code(x[c], scale, zero, top), bits);
    }
  }
}

QuantizedKVStore::QuantizedKVStore(at::TensorList tensors, int64_t bits, int64_t group, int64_t residual,
                                   int64_t value_group)
    : t_(tensors.begin(), tensors.end()), bits_(bits), group_(group), residual_(residual), value_group_(value_group) {
  TORCH_CHECK(static_cast<int64_t>(t_.size()) == kQuantizedCacheTensors, "a quantized KV cache is ",
              kQuantizedCacheTensors, " tensors, got ", t_.size());
  TORCH_CHECK(bits == 4 || bits == 8, "KV cache bits must be 4 or 8, got ", bits);
  const at::Tensor& recent = t_[6];
  TORCH_CHECK(recent.dim() == 4, "recent_keys must be [layers, kv_heads, residual + group, head_dim]");
  layers_ = recent.size(0), heads_ = recent.size(1), window_ = recent.size(2), dim_ = recent.size(3);
  capacity_ = t_[0].dim() == 4 ? t_[0].size(2) : -1;
  row_bytes_ = dim_ * bits / 8;
  TORCH_CHECK(group >= 2 && group % 2 == 0 && residual >= 0 && window_ == residual + group && dim_ % 2 == 0 &&
                  value_group > 0 && dim_ % value_group == 0 && capacity_ >= 0 && capacity_ % group == 0,
              "a quantized KV cache needs an even group >= 2, a window of residual + group tokens, an even head_dim "
              "that value_group divides and a code capacity that is a multiple of group");
  const std::vector<std::vector<int64_t>> shapes = {
      {layers_, heads_, capacity_, row_bytes_},       {layers_, heads_, capacity_ / group, dim_},
      {layers_, heads_, capacity_ / group, dim_},     {layers_, heads_, capacity_, row_bytes_},
      {layers_, heads_, capacity_, dim_ / value_group}, {layers_, heads_, capacity_, dim_ / value_group},
      {layers_, heads_, window_, dim_},               {layers_, heads_, window_, dim_},
      {layers_}};
  const std::vector<at::ScalarType> types = {at::kByte, at::kHalf, at::kByte, at::kByte, at::kHalf,
                                             at::kByte, at::kFloat, at::kFloat, at::kLong};
  for (int64_t i = 0; i < kQuantizedCacheTensors; ++i)
    TORCH_CHECK(t_[i].device().is_cpu() && t_[i].is_contiguous() && t_[i].scalar_type() == types[i] &&
                    t_[i].sizes() == at::IntArrayRef(shapes[i]),
                "quantized KV cache tensor ", i, " must be a contiguous CPU ", types[i], " tensor of shape ",
                at::IntArrayRef(shapes[i]), ", got ", t_[i].scalar_type(), " ", t_[i].sizes());
  quantized_ = t_[8].data_ptr<int64_t>();
  for (int64_t l = 0; l < layers_; ++l)
    TORCH_CHECK(quantized_[l] >= 0 && quantized_[l] % group == 0 && quantized_[l] <= capacity_,
                "layer ", l, " holds ", quantized_[l], " quantized tokens: not a multiple of ", group, " within ",
                capacity_);
}

void QuantizedKVStore::append(int64_t l, const float* keys, const float* values, int64_t rows, int64_t position) {
  int64_t& quantized = quantized_[l];
  TORCH_CHECK(position >= quantized && position - quantized < window_, "layer ", l, ": position ", position,
              " is not within its float window [", quantized, ", ", quantized + window_, ")");
  for (const float* x : {keys, values})
    TORCH_CHECK(std::all_of(x, x + rows * heads_ * dim_, [](float e) { return std::isfinite(e); }),
                "keys or values hold NaN or Inf; a quantized KV cache cannot store them");
  float* recent_keys = t_[6].data_ptr<float>() + l * heads_ * window_ * dim_;
  float* recent_values = t_[7].data_ptr<float>() + l * heads_ * window_ * dim_;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t slot = position + r - quantized;
    for (int64_t h = 0; h < heads_; ++h) {
      std::memcpy(recent_keys + (h * window_ + slot) * dim_, keys + (r * heads_ + h) * dim_, dim_ * sizeof(float));
      std::memcpy(recent_values + (h * window_ + slot) * dim_, values + (r * heads_ + h) * dim_,
                  dim_ * sizeof(float));
    }
    if (slot + 1 < window_) continue;
    TORCH_CHECK(quantized + group_ <= capacity_, "the quantized KV cache is full (", capacity_, " tokens as codes)");
    const int64_t chunk = quantized / group_, value_groups = dim_ / value_group_;
    for (int64_t h = 0; h < heads_; ++h) {
      const int64_t head = l * heads_ + h, token = head * capacity_ + quantized;
      float* head_keys = recent_keys + h * window_ * dim_;
      float* head_values = recent_values + h * window_ * dim_;
      quantize_kv_chunk(head_keys, head_values, dim_, group_, dim_, bits_, value_group_,
                        t_[0].data_ptr<uint8_t>() + token * row_bytes_,
                        t_[1].data_ptr<at::Half>() + (head * (capacity_ / group_) + chunk) * dim_,
                        t_[2].data_ptr<uint8_t>() + (head * (capacity_ / group_) + chunk) * dim_,
                        t_[3].data_ptr<uint8_t>() + token * row_bytes_,
                        t_[4].data_ptr<at::Half>() + token * value_groups,
                        t_[5].data_ptr<uint8_t>() + token * value_groups);
      std::memmove(head_keys, head_keys + group_ * dim_, residual_ * dim_ * sizeof(float));
      std::memmove(head_values, head_values + group_ * dim_, residual_ * dim_ * sizeof(float));
    }
    quantized += group_;
  }
}

QuantizedKVView QuantizedKVStore::view(int64_t l) const {
  const int64_t head = l * heads_, chunks = capacity_ / group_, value_groups = dim_ / value_group_;
  return {t_[0].data_ptr<uint8_t>() + head * capacity_ * row_bytes_,
          t_[1].data_ptr<at::Half>() + head * chunks * dim_,
          t_[2].data_ptr<uint8_t>() + head * chunks * dim_,
          t_[3].data_ptr<uint8_t>() + head * capacity_ * row_bytes_,
          t_[4].data_ptr<at::Half>() + head * capacity_ * value_groups,
          t_[5].data_ptr<uint8_t>() + head * capacity_ * value_groups,
          t_[6].data_ptr<float>() + head * window_ * dim_,
          t_[7].data_ptr<float>() + head * window_ * dim_,
          heads_, dim_, bits_, group_, value_group_, quantized_[l], capacity_, chunks, window_};
}

void QuantizedKVStore::dequantize(int64_t l, int64_t length, float* keys, float* values, int64_t stride) const {
  const QuantizedKVView v = view(l);
  const int64_t value_groups = dim_ / value_group_;
  std::vector<float> key_zero(dim_), key_scale(dim_);  // the current key chunk's, as float32
  for (int64_t h = 0; h < heads_; ++h)
    for (int64_t t = 0; t < length; ++t) {
      float* k = keys + (h * stride + t) * dim_;
      float* x = values + (h * stride + t) * dim_;
      if (t >= v.quantized) {
        std::memcpy(k, v.recent_keys + (h * window_ + t - v.quantized) * dim_, dim_ * sizeof(float));
        std::memcpy(x, v.recent_values + (h * window_ + t - v.quantized) * dim_, dim_ * sizeof(float));
        continue;
      }
      const int64_t chunk = (h * v.chunk_stride + t / group_) * dim_, token = (h * capacity_ + t) * value_groups;
      if (t % group_ == 0)
        for (int64_t c = 0; c < dim_; ++c) {
          key_zero[c] = static_cast<float>(v.key_zero[chunk + c]);
          key_scale[c] = static_cast<float>(v.key_scale[chunk + c]);
        }
      dequantize_span<1>(bits_, v.key_codes + (h * capacity_ + t) * row_bytes_, 0, dim_, key_zero.data(),
                         key_scale.data(), k);
      for (int64_t g = 0; g < value_groups; ++g) {
        const float zero = static_cast<float>(v.value_zero[token + g]);
        const float scale = static_cast<float>(v.value_scale[token + g]);
        dequantize_span<0>(bits_, v.value_codes + (h * capacity_ + t) * row_bytes_, g * value_group_, value_group_,
                           &zero, &scale, x + g * value_group_);
      }
    }
}

}  // namespace mixprec

namespace {

// keys, values: float32 [H, group, D] (one chunk of `group` tokens per KV head). Returns the six tensors
// mixprec/nn/kv_cache.py stores for them (batch dimension left out): key_codes [H, group, D * bits / 8], key_scale
// and key_zero [H, 1, D], value_codes [H, group, D * bits / 8], value_scale and value_zero [H, group, D / value_group].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kv_quantize_chunk(
    const at::Tensor& keys, const at::Tensor& values, int64_t bits, int64_t value_group) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(keys.dim() == 3 && keys.scalar_type() == at::kFloat && keys.is_contiguous() && keys.device().is_cpu() &&
                  values.sizes() == keys.sizes() && values.scalar_type() == at::kFloat && values.is_contiguous(),
              "keys and values must be contiguous float32 CPU tensors [kv_heads, group, head_dim] of one shape");
  const int64_t heads = keys.size(0), group = keys.size(1), dim = keys.size(2);
  TORCH_CHECK(group >= 1 && dim % 2 == 0 && value_group > 0 && dim % value_group == 0,
              "head_dim must be even and value_group must divide it, got ", dim, " and ", value_group);
  const auto bytes = keys.options().dtype(at::kByte);
  auto key_codes = at::zeros({heads, group, dim * bits / 8}, bytes), value_codes = at::zeros_like(key_codes);
  auto key_scale = at::empty({heads, 1, dim}, keys.options().dtype(at::kHalf)), key_zero = at::empty({heads, 1, dim},
                                                                                                     bytes);
  auto value_scale = at::empty({heads, group, dim / value_group}, keys.options().dtype(at::kHalf));
  auto value_zero = at::empty({heads, group, dim / value_group}, bytes);
  for (int64_t h = 0; h < heads; ++h)
    mixprec::quantize_kv_chunk(keys.data_ptr<float>() + h * group * dim, values.data_ptr<float>() + h * group * dim,
                               dim, group, dim, bits, value_group, key_codes.data_ptr<uint8_t>() + h * group * dim *
                               bits / 8, key_scale.data_ptr<at::Half>() + h * dim, key_zero.data_ptr<uint8_t>() +
                               h * dim, value_codes.data_ptr<uint8_t>() + h * group * dim * bits / 8,
                               value_scale.data_ptr<at::Half>() + h * group * (dim / value_group),
                               value_zero.data_ptr<uint8_t>() + h * group * (dim / value_group));
  return {key_codes, key_scale, key_zero, value_codes, value_scale, value_zero};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("kv_quantize_chunk(Tensor keys, Tensor values, int bits, int value_group) -> (Tensor, Tensor, Tensor, "
        "Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mixprec, CPU, m) { m.impl("kv_quantize_chunk", &kv_quantize_chunk); }
