// A Llama-family decoder stack in one native call: every layer's RMSNorm, the seven quantized projections, rotary
// positions, grouped-query attention over its KV cache, SiLU x up and the residual adds, for M new tokens at
// positions [position, position + M). The token embedding and the head stay with the caller. The KV cache is float32
// (llama_decode_layers) or quantized as mixprec/nn/kv_cache.py quantizes it (llama_decode_layers_quantized_kv, see
// kv_cache_store.h): each step's keys and values are appended first, then every row attends over the cache as it
// then is (a decode step on AVX-512: the codes read in place by kv_attention.cpp; otherwise dequantized first).
// Several rows attend through ATen's scaled_dot_product_attention with a causal mask, one row through the loops
// below.
//
// Each projection runs the operators its mixprec module runs, called through the dispatcher (no Python between
// them), so it gives the module's bits for the same input rows:
//   w4a8 (blocked layout): quantize_rows_s8 (per-row symmetric int8), w4a8_linear_blocked; q, k and v (and gate and
//     up) in one w4a8_linear_blocked_many call when all three (both) are w4a8 of one group size: one parallel
//     region, one run of bytes per thread across the weights, each output the single call's bits;
//   int8, dense weight: up to few_rows_max rows quantize_rows_u8 + int8_dense_rows, else int8_linear_dynamic;
//   int8, oneDNN-packed weight: quantize_rows_u8, then up to few_rows_max rows int8_packed_rows (reading the
//     packed bytes in place), else oneDNN's qlinear_pointwise (u8 x s8, zero point 128) + rescale_rows_cols_;
//   w4gN (float32 activations): up to few_rows_max rows w4_linear_rows, else the weight expanded a tile of output
//     rows at a time (w4_dequantize_rows) and multiplied by at::linear, as mixprec.kernels.weight_only.w4_linear.
// A layer's input rows are quantized once per code kind however many projections read them. The float32 steps
// around the projections follow transformers' LlamaDecoderLayer: RMSNorm y = w * (x * rsqrt(mean(x^2) + eps)) (the
// mean summed in double in vector lanes, then rounded to float32), RoPE q' = q * cos + rotate_half(q) * sin
// (rotate_half(q) = [-q2, q1]; two products, one add: the build contracts no FMA), attention
// softmax(q . k * scaling) v (float32, the q . k sums in vector lanes; ATen's softmax), causal over the cache, and
// ATen's SiLU. Rounding inside the norms' means and the attention sums differs from PyTorch's order, so logits
// agree with transformers' to float rounding, not bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "kv_cache_store.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace {

// Per layer: input norm, post-attention norm, then five tensors for each of q, k, v, o, gate, up, down: four as
// Kernel says, then the float32 bias [N] (empty: none).
constexpr int64_t kTensorsPerProjection = 5;
constexpr int64_t kProjections = 7;
constexpr int64_t kTensorsPerLayer = 2 + kProjections * kTensorsPerProjection;
enum Projection : int64_t { kQuery, kKey, kValue, kOutput, kGate, kUp, kDown };

// How a projection runs, and its first four tensors (unused ones are empty):
enum Kernel : int64_t {
  kW4A8Blocked = 0,  // codes_blocked, scale_blocked
  kInt8Dense = 1,    // weight int8 [N, K], weight_scale [N]
  kInt8Packed = 2,   // oneDNN-packed weight, weight_scale [N], unit_scale ones [N], zero_points int32 zeros [N]
  kW4Rows = 3,       // weight_packed uint8 [N, K/2], weight_scale float16 [N, K/G], tile_rows int64 [1]
};

struct Shape {
  int64_t rows, hidden, heads, kv_heads, head_dim, intermediate, max_length;
};

using Codes = std::tuple<at::Tensor, at::Tensor>;  // codes [M, K], per-row scales [M, 1]
using Bias = c10::optional<at::Tensor>;
using Quantize = Codes(const at::Tensor&);
// (q, row_scale, weight, col_scale, bias): int8_dense_rows' and int8_packed_rows' signature.
using FewRows = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const c10::optional<at::Tensor>&);

template <typename Signature>
c10::TypedOperatorHandle<Signature> operator_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// A projection's float32 input rows and their int8 codes, made once per kind on first use.
class ProjectionInput {
 public:
  explicit ProjectionInput(at::Tensor rows) : rows_(std::move(rows)) {}
  const at::Tensor& rows() const { return rows_; }
  const Codes& signed_codes() {  // per-row symmetric int8
    static const auto quantize = operator_handle<Quantize>("mixprec::quantize_rows_s8");
    if (!signed_) signed_ = quantize.call(rows_);
    return *signed_;
  }
  const Codes& offset_codes() {  // the same codes + 128, as uint8
    static const auto quantize = operator_handle<Quantize>("mixprec::quantize_rows_u8");
    if (!offset_) offset_ = quantize.call(rows_);
    return *offset_;
  }

 private:
  at::Tensor rows_;
  std::optional<Codes> signed_, offset_;
};

at::Tensor w4a8(const Codes& xq, const at::Tensor& codes, const at::Tensor& scale, int64_t out_features,
                const Bias& bias) {
  static const auto op = operator_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, int64_t, const c10::optional<at::Tensor>&)>(
      "mixprec::w4a8_linear_blocked");
  return op.call(std::get<0>(xq), std::get<1>(xq), codes, scale, out_features, bias);
}

// The few-row int8 kernels: the dense weight streamed once, or oneDNN's packed bytes read in place.
at::Tensor int8_few_rows(bool packed, const Codes& xq, const at::Tensor& weight, const at::Tensor& scale,
                         const Bias& bias) {
  static const auto dense = operator_handle<FewRows>("mixprec::int8_dense_rows");
  static const auto in_place = operator_handle<FewRows>("mixprec::int8_packed_rows");
  return (packed ? in_place : dense).call(std::get<0>(xq), std::get<1>(xq), weight, scale, bias);
}

at::Tensor int8_dynamic(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, const Bias& bias) {
  static const auto op = operator_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const c10::optional<at::Tensor>&)>("mixprec::int8_linear_dynamic");
  return op.call(x, weight, scale, bias);
}

// float(sum_k (q - 128) * w) from oneDNN, then acc * row_scale * col_scale + bias in place (the module's epilogue).
at::Tensor int8_onednn(const Codes& xq, const at::Tensor* t, const Bias& bias) {
  static const auto matmul =
      operator_handle<at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor,
                                 std::optional<at::Tensor>, double, int64_t, std::optional<at::ScalarType>,
                                 c10::string_view, torch::List<std::optional<at::Scalar>>, c10::string_view)>(
          "onednn::qlinear_pointwise");  // oneDNN registers its kernel taking every argument by value
  static const auto rescale =
      operator_handle<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&)>(
          "mixprec::rescale_rows_cols_");
  at::Tensor acc = matmul.call(std::get<0>(xq), 1.0, 128, t[0], t[2], t[3], std::nullopt, 1.0, 0, at::kFloat, "none",
                               torch::List<std::optional<at::Scalar>>(), "");
  rescale.call(acc, std::get<1>(xq), t[1], bias);
  return acc;
}

// w4gN with float32 rows: the fused kernel up to few_rows_max rows, else tiles of tile_rows output rows expanded
// exactly to float32 and multiplied (mixprec.kernels.weight_only.w4_linear and w4_linear_tiled: the same operators).
at::Tensor w4_rows(const at::Tensor& x, const at::Tensor* t, const Bias& bias, bool few_rows) {
  static const auto fused = operator_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       const c10::optional<at::Tensor>&)>("mixprec::w4_linear_rows");
  static const auto expand = operator_handle<void(const at::Tensor&, const at::Tensor&, int64_t, at::Tensor&)>(
      "mixprec::w4_dequantize_rows");
  if (few_rows) return fused.call(x, t[0], t[1], bias);
  const int64_t outs = t[0].size(0), tile_rows = t[2].item<int64_t>();
  TORCH_CHECK(tile_rows >= 1, "a w4 projection's tile_rows must be >= 1, got ", tile_rows);
  at::Tensor buffer = at::empty({std::min(tile_rows, outs), t[0].size(1) * 2}, x.options());
  at::Tensor y = at::empty({x.size(0), outs}, x.options());
  for (int64_t begin = 0; begin < outs; begin += tile_rows) {
    const int64_t count = std::min(tile_rows, outs - begin);
    at::Tensor tile = buffer.narrow(0, 0, count);
    expand.call(t[0], t[1], begin, tile);
    const Bias part = bias ? Bias(bias->narrow(0, begin, count)) : c10::nullopt;
    y.narrow(1, begin, count).copy_(at::linear(x, tile, part));
  }
  return y;
}

// Several blocked-layout w4a8 weights of one input and one group size in one call (w4a8_linear_blocked_many: one
// parallel region, the weights' blocks split over the threads as one sequence; each output the single call's bits).
std::vector<at::Tensor> w4a8_many(const Codes& xq, at::TensorList codes, at::TensorList scales,
                                  at::IntArrayRef out_features, const c10::List<c10::optional<at::Tensor>>& biases) {
  static const auto op = operator_handle<std::vector<at::Tensor>(
      const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef,
      const c10::List<c10::optional<at::Tensor>>&)>("mixprec::w4a8_linear_blocked_many");
  return op.call(std::get<0>(xq), std::get<1>(xq), codes, scales, out_features, biases);
}

// Runs projection p of layer l on its input rows as its plan says: plans holds (kernel, few_rows_max) per projection.
struct Projections {
  at::TensorList weights;
  const int64_t* plans;

  const at::Tensor* tensors(int64_t layer, Projection projection) const {
    return &weights[layer * kTensorsPerLayer + 2 + projection * kTensorsPerProjection];
  }
  static Bias bias_of(const at::Tensor* t) { return t[4].numel() > 0 ? Bias(t[4]) : c10::nullopt; }
  const int64_t* plan(int64_t layer, Projection projection) const {  // (kernel, few_rows_max)
    return plans + 2 * (layer * kProjections + projection);
  }

  // Projections of one input (q, k, v; gate, up) with their output widths: in one call when every one is a blocked
  // w4a8 weight of the same group size, else one after another.
  std::vector<at::Tensor> many(ProjectionInput& in, int64_t layer, std::vector<Projection> which,
                               std::vector<int64_t> out_features) const {
    const at::Tensor& first_scale = tensors(layer, which[0])[1];
    bool together = first_scale.dim() == 3;
    for (const Projection p : which)
      together = together && plan(layer, p)[0] == kW4A8Blocked && tensors(layer, p)[1].dim() == 3 &&
                 tensors(layer, p)[1].size(1) == first_scale.size(1);
    std::vector<at::Tensor> outputs;
    if (!together) {
      for (size_t i = 0; i < which.size(); ++i) outputs.push_back((*this)(in, layer, which[i], out_features[i]));
      return outputs;
    }
    std::vector<at::Tensor> codes, scales;
    c10::List<c10::optional<at::Tensor>> biases;
    for (const Projection p : which) {
      const at::Tensor* t = tensors(layer, p);
      codes.push_back(t[0]);
      scales.push_back(t[1]);
      biases.push_back(bias_of(t));
    }
    outputs = w4a8_many(in.signed_codes(), codes, scales, out_features, biases);
    for (size_t i = 0; i < which.size(); ++i) check_output(outputs[i], in.rows().size(0), layer, which[i],
                                                           out_features[i]);
    return outputs;
  }

  // The steps after a projection write through its output's pointer: its shape must be the model's.
  static void check_output(const at::Tensor& y, int64_t rows, int64_t layer, Projection projection,
                           int64_t out_features) {
    TORCH_CHECK(y.dim() == 2 && y.size(0) == rows && y.size(1) == out_features, "layer ", layer, ", projection ",
                static_cast<int64_t>(projection), " (q k v o gate up down) gives ", y.sizes(),
                ", the model's shapes need [", rows, ", ", out_features, "]");
  }

  at::Tensor operator()(ProjectionInput& in, int64_t layer, Projection projection, int64_t out_features) const {
    const at::Tensor* t = tensors(layer, projection);
    const int64_t* kernel_and_limit = plan(layer, projection);
    const int64_t rows = in.rows().size(0);
    const bool few_rows = rows <= kernel_and_limit[1];
    const Bias bias = bias_of(t);
    at::Tensor y;
    switch (kernel_and_limit[0]) {
      case kW4A8Blocked:
        y = w4a8(in.signed_codes(), t[0], t[1], out_features, bias);
        break;
      case kInt8Dense:
        y = few_rows ? int8_few_rows(false, in.offset_codes(), t[0], t[1], bias)
                     : int8_dynamic(in.rows(), t[0], t[1], bias);
        break;
      case kInt8Packed:
        y = few_rows ? int8_few_rows(true, in.offset_codes(), t[0], t[1], bias)
                     : int8_onednn(in.offset_codes(), t, bias);
        break;
      default:
        y = w4_rows(in.rows(), t, bias, few_rows);
    }
    check_output(y, rows, layer, projection, out_features);
    return y;
  }
};

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  auto y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * n;
    double squares = 0;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < n; ++i) squares += static_cast<double>(row[i]) * row[i];
    const float inverse = 1.0f / std::sqrt(static_cast<float>(squares / static_cast<double>(n)) +
                                           static_cast<float>(eps));
    for (int64_t i = 0; i < n; ++i) yp[r * n + i] = w[i] * (row[i] * inverse);
  }
  return y;
}

// v: [rows, heads * head_dim], row r at position + r; cos and sin: [max_length, head_dim].
void rotate(at::Tensor& v, int64_t heads, const Shape& s, const float* cos, const float* sin, int64_t position) {
  float* p = v.data_ptr<float>();
  const int64_t half = s.head_dim / 2;
  for (int64_t r = 0; r < s.rows; ++r) {
    const float* c = cos + (position + r) * s.head_dim;
    const float* n = sin + (position + r) * s.head_dim;
    for (int64_t h = 0; h < heads; ++h) {
      float* x = p + (r * heads + h) * s.head_dim;
      for (int64_t j = 0; j < half; ++j) {
        const float a = x[j], b = x[j + half];
        x[j] = a * c[j] - b * n[j];
        x[j + half] = b * c[j + half] + a * n[j + half];
      }
    }
  }
}

// Row r (position + r) attends to cache positions [0, position + r]; head h reads kv head h / (heads / kv_heads), its
// keys and values at key_cache / value_cache + kv_head * stride * head_dim.
// The scores q . k * scaling of every row and head (-inf past a row's causal end) go through one ATen softmax (its
// vectorized exp), then each output is the probabilities' weighted sum of the values.
at::Tensor attend(const at::Tensor& q, const float* key_cache, const float* value_cache, int64_t stride,
                  const Shape& s, int64_t position, float scaling) {
  const int64_t group = s.heads / s.kv_heads, d = s.head_dim, span = position + s.rows;
  auto scores = at::empty({s.rows * s.heads, span}, q.options());
  const float* qp = q.data_ptr<float>();
  float* sp = scores.data_ptr<float>();
  at::parallel_for(0, s.rows * s.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t r = index / s.heads, h = index % s.heads, length = position + r + 1;
      const float* query = qp + index * d;
      const float* keys = key_cache + (h / group) * stride * d;
      float* row = sp + index * span;
      for (int64_t t = 0; t < length; ++t) {
        float dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < d; ++j) dot += query[j] * keys[t * d + j];
        row[t] = dot * scaling;
      }
      std::fill(row + length, row + span, -std::numeric_limits<float>::infinity());
    }
  });
  const at::Tensor probabilities = at::_softmax(scores, -1, false);
  const float* pp = probabilities.data_ptr<float>();
  auto out = at::empty({s.rows, s.heads * d}, q.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, s.rows * s.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t r = index / s.heads, h = index % s.heads, length = position + r + 1;
      const float* values = value_cache + (h / group) * stride * d;
      const float* p = pp + index * span;
      float* o = op + index * d;
      std::fill_n(o, d, 0.0f);
      for (int64_t t = 0; t < length; ++t)
        for (int64_t j = 0; j < d; ++j) o[j] += p[t] * values[t * d + j];
    }
  });
  return out;
}

// Several rows (a prompt) through ATen's scaled_dot_product_attention (its vectorized flash kernel, grouped-query)
// over keys and values [kv_heads, >= position + rows, head_dim] (any stride between heads): row r attends to tokens
// [0, position + r]. transformers' own attention call.
at::Tensor attend_rows(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const Shape& s,
                       int64_t position, double scaling) {
  const int64_t span = position + s.rows;
  const auto options = q.options().dtype(at::kLong);
  const at::Tensor mask = at::arange(span, options).unsqueeze(0) <= at::arange(position, span, options).unsqueeze(1);
  const at::Tensor out = at::scaled_dot_product_attention(
      q.view({s.rows, s.heads, s.head_dim}).transpose(0, 1).unsqueeze(0), keys.narrow(1, 0, span).unsqueeze(0),
      values.narrow(1, 0, span).unsqueeze(0), mask, 0.0, false, scaling, true);
  return out[0].transpose(0, 1).reshape({s.rows, s.heads * s.head_dim});
}

void check_float_tensor(const at::Tensor& t, std::vector<int64_t> shape, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape, what,
              " must be a contiguous float32 CPU tensor of shape ", at::IntArrayRef(shape), ", got ",
              t.scalar_type(), " ", t.sizes());
}

// The float32 cache: keys and values [layers, kv_heads, max_length, head_dim].
class FloatCache {
 public:
  FloatCache(at::Tensor& keys, at::Tensor& values) : keys_(keys), values_(values) {
    TORCH_CHECK(keys.dim() == 4, "key_cache must be [layers, kv_heads, max_length, head_dim], got ", keys.sizes());
    check_float_tensor(values, keys.sizes().vec(), "value_cache");
    check_float_tensor(keys, keys.sizes().vec(), "key_cache");
  }
  int64_t layers() const { return keys_.size(0); }
  int64_t kv_heads() const { return keys_.size(1); }
  int64_t head_dim() const { return keys_.size(3); }
  int64_t max_length() const { return keys_.size(2); }

  // Copies k, v [rows, kv_heads * head_dim] into layer l's cache at position.
  void append(int64_t l, const at::Tensor& k, const at::Tensor& v, const Shape& s, int64_t position) {
    for (int64_t r = 0; r < s.rows; ++r)
      for (int64_t h = 0; h < s.kv_heads; ++h) {
        const int64_t from = (r * s.kv_heads + h) * s.head_dim, to = (h * s.max_length + position + r) * s.head_dim;
        std::copy_n(k.data_ptr<float>() + from, s.head_dim, layer(keys_, l) + to);
        std::copy_n(v.data_ptr<float>() + from, s.head_dim, layer(values_, l) + to);
      }
  }
  at::Tensor attend(int64_t l, const at::Tensor& q, const Shape& s, int64_t position, float scaling) {
    if (s.rows > 1) return attend_rows(q, keys_[l], values_[l], s, position, scaling);
    return ::attend(q, layer(keys_, l), layer(values_, l), s.max_length, s, position, scaling);
  }

 private:
  float* layer(at::Tensor& t, int64_t l) { return t.data_ptr<float>() + l * t.stride(0); }
  at::Tensor& keys_;
  at::Tensor& values_;
};

// The quantized cache (kv_cache_store.h). One row (a decode step) reads the codes in place (AVX-512, the shapes
// kv_attend takes); several rows (a prompt), or one without that kernel, attend in float32 over the layer's keys and
// values dequantized first, as mixprec.kv.QuantizedKVCache does for a prompt.
class QuantizedCache {
 public:
  QuantizedCache(at::TensorList tensors, int64_t bits, int64_t group, int64_t residual, int64_t value_group,
                 int64_t max_length)
      : store_(tensors, bits, group, residual, value_group), max_length_(max_length) {}
  int64_t layers() const { return store_.layers(); }
  int64_t kv_heads() const { return store_.heads(); }
  int64_t head_dim() const { return store_.dim(); }
  int64_t max_length() const { return max_length_; }

  void append(int64_t l, const at::Tensor& k, const at::Tensor& v, const Shape& s, int64_t position) {
    store_.append(l, k.data_ptr<float>(), v.data_ptr<float>(), s.rows, position);
  }
  at::Tensor attend(int64_t l, const at::Tensor& q, const Shape& s, int64_t position, float scaling) {
    const int64_t group = s.heads / s.kv_heads, span = position + s.rows;
    const mixprec::QuantizedKVView view = store_.view(l);
    if (s.rows == 1 && mixprec::kv_attend_supported(s.head_dim, view.value_group, group)) {
      auto out = at::empty({1, s.heads * s.head_dim}, q.options());
      mixprec::kv_attend(view, q.data_ptr<float>(), group, position + 1, scaling, out.data_ptr<float>());
      return out;
    }
    const at::Tensor keys = at::empty({s.kv_heads, span, s.head_dim}, q.options()), values = at::empty_like(keys);
    store_.dequantize(l, span, keys.data_ptr<float>(), values.data_ptr<float>(), span);
    if (s.rows > 1) return attend_rows(q, keys, values, s, position, scaling);
    return ::attend(q, keys.data_ptr<float>(), values.data_ptr<float>(), span, s, position, scaling);
  }

 private:
  mixprec::QuantizedKVStore store_;
  int64_t max_length_;
};

// hidden: [M, H] float32 (the embedded tokens); returns the last layer's output after final_norm, [M, H].
template <typename Cache>
at::Tensor decode_layers(const at::Tensor& hidden, at::TensorList weights, at::IntArrayRef plans,
                         const at::Tensor& final_norm, const at::Tensor& cos, const at::Tensor& sin, Cache& cache,
                         int64_t position, int64_t heads, int64_t kv_heads, int64_t intermediate, double eps,
                         double scaling) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) >= 1, "hidden must be [tokens, hidden_size], got ", hidden.sizes());
  const int64_t layers = cache.layers();
  const Shape s{hidden.size(0), hidden.size(1), heads, kv_heads, cache.head_dim(), intermediate, cache.max_length()};
  TORCH_CHECK(heads >= 1 && kv_heads >= 1 && heads % kv_heads == 0 && s.head_dim % 2 == 0 && intermediate >= 1,
              "heads (", heads, ") must be a multiple of kv_heads (", kv_heads, ") and head_dim (", s.head_dim,
              ") even");
  TORCH_CHECK(cache.kv_heads() == kv_heads, "the cache holds ", cache.kv_heads(), " KV heads, the model ", kv_heads);
  check_float_tensor(hidden, {s.rows, s.hidden}, "hidden");
  check_float_tensor(cos, {s.max_length, s.head_dim}, "cos");
  check_float_tensor(sin, {s.max_length, s.head_dim}, "sin");
  check_float_tensor(final_norm, {s.hidden}, "final_norm");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * kTensorsPerLayer, "weights must hold ",
              kTensorsPerLayer, " tensors per layer (", layers, " layers), got ", weights.size());
  TORCH_CHECK(position >= 0 && position + s.rows <= s.max_length, "tokens at positions [", position, ", ",
              position + s.rows, ") do not fit a cache of ", s.max_length);
  for (int64_t l = 0; l < layers; ++l) {
    check_float_tensor(weights[l * kTensorsPerLayer], {s.hidden}, "input_layernorm weight");
    check_float_tensor(weights[l * kTensorsPerLayer + 1], {s.hidden}, "post_attention_layernorm weight");
  }
  TORCH_CHECK(static_cast<int64_t>(plans.size()) == layers * kProjections * 2,
              "plans must hold (kernel, few_rows_max) for ", kProjections, " projections per layer (",
              layers * kProjections * 2, " ints), got ", plans.size());
  for (size_t i = 0; i < plans.size(); i += 2)
    TORCH_CHECK(plans[i] >= kW4A8Blocked && plans[i] <= kW4Rows, "plans[", i, "] = ", plans[i],
                " is not a kernel (0 w4a8 blocked, 1 int8 dense, 2 int8 oneDNN-packed, 3 w4gN)");
  const Projections project{weights, plans.data()};
  const int64_t q_out = heads * s.head_dim, kv_out = kv_heads * s.head_dim;
  at::Tensor x = hidden.clone();
  for (int64_t l = 0; l < layers; ++l) {
    ProjectionInput normed(rms_norm(x, weights[l * kTensorsPerLayer], eps));
    std::vector<at::Tensor> qkv = project.many(normed, l, {kQuery, kKey, kValue}, {q_out, kv_out, kv_out});
    at::Tensor& q = qkv[0];
    at::Tensor& k = qkv[1];
    const at::Tensor& v = qkv[2];
    rotate(q, heads, s, cos.data_ptr<float>(), sin.data_ptr<float>(), position);
    rotate(k, kv_heads, s, cos.data_ptr<float>(), sin.data_ptr<float>(), position);
    cache.append(l, k, v, s, position);
    ProjectionInput attention(cache.attend(l, q, s, position, static_cast<float>(scaling)));
    x.add_(project(attention, l, kOutput, s.hidden));
    ProjectionInput post(rms_norm(x, weights[l * kTensorsPerLayer + 1], eps));
    std::vector<at::Tensor> gate_up = project.many(post, l, {kGate, kUp}, {intermediate, intermediate});
    at::Tensor& gate = gate_up[0];
    at::silu_(gate).mul_(gate_up[1]);  // ATen's SiLU: transformers' own bits
    ProjectionInput activated(gate);
    x.add_(project(activated, l, kDown, s.hidden));
  }
  return rms_norm(x, final_norm, eps);
}

at::Tensor llama_decode_layers(const at::Tensor& hidden, at::TensorList weights, at::IntArrayRef plans,
                               const at::Tensor& final_norm, const at::Tensor& cos, const at::Tensor& sin,
                               at::Tensor& key_cache, at::Tensor& value_cache, int64_t position, int64_t heads,
                               int64_t kv_heads, int64_t intermediate, double eps, double scaling) {
  FloatCache cache(key_cache, value_cache);
  return decode_layers(hidden, weights, plans, final_norm, cos, sin, cache, position, heads, kv_heads, intermediate,
                       eps, scaling);
}

// kv_cache: the nine tensors of kv_cache_store.h, quantized_tokens [layers] included (advanced in place).
at::Tensor llama_decode_layers_quantized_kv(const at::Tensor& hidden, at::TensorList weights, at::IntArrayRef plans,
                                            const at::Tensor& final_norm, const at::Tensor& cos, const at::Tensor& sin,
                                            at::TensorList kv_cache, int64_t position, int64_t heads,
                                            int64_t kv_heads, int64_t intermediate, double eps, double scaling,
                                            int64_t bits, int64_t group, int64_t residual, int64_t value_group) {
  QuantizedCache cache(kv_cache, bits, group, residual, value_group, cos.size(0));
  return decode_layers(hidden, weights, plans, final_norm, cos, sin, cache, position, heads, kv_heads, intermediate,
                       eps, scaling);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("llama_decode_layers(Tensor hidden, Tensor[] weights, int[] plans, Tensor final_norm, Tensor cos, "
        "Tensor sin, Tensor(a!) key_cache, Tensor(b!) value_cache, int position, int heads, int kv_heads, "
        "int intermediate, float eps, float scaling) -> Tensor");
  m.def("llama_decode_layers_quantized_kv(Tensor hidden, Tensor[] weights, int[] plans, Tensor final_norm, "
        "Tensor cos, Tensor sin, Tensor(a!)[] kv_cache, int position, int heads, int kv_heads, int intermediate, "
        "float eps, float scaling, int bits, int group, int residual, int value_group) -> Tensor");
}

// An int8 projection's oneDNN-packed weight is an MkldnnCPU tensor, so the dispatcher picks that key when one is held.
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("llama_decode_layers", &llama_decode_layers);
  m.impl("llama_decode_layers_quantized_kv", &llama_decode_layers_quantized_kv);
}
TORCH_LIBRARY_IMPL(mixprec, MkldnnCPU, m) {
  m.impl("llama_decode_layers", &llama_decode_layers);
  m.impl("llama_decode_layers_quantized_kv", &llama_decode_layers_quantized_kv);
}
