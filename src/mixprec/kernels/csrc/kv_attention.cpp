// One decode step of attention read straight from the quantized KV cache
// (mixprec/nn/kv_cache.py), without dequantizing it into float tensors first.
//
// For query head r of KV head h (grouped-query attention: query heads h * R .. h * R + R - 1
// share KV head h) and cached token t:
//   score = sum_c a[c] * (key_code[t, c] - key_zero[g, c])      a[c] = q[c] * scaling * key_scale[g, c]
// where g = t / group is the token's key chunk: the chunk's per-channel scale is folded into
// the query once per chunk (one float32 rounding) and the code minus zero point is an exact
// integer. Tokens of the float window use q . k * scaling. Softmax in float32 with the row
// maximum subtracted and a vectorized exp (degree-6 polynomial after a ln 2 range reduction,
// within 2 ulp of expf). Values, per token and value group v:
//   out += (p[t] * value_scale[t, v]) * (value_code[t, c] - value_zero[t, v])
// so each value row costs one conversion shared by the R query heads. The tokens are split
// over PyTorch's OpenMP threads and the partial results merged exactly as in
// flash-decoding: m = max_s m_s, l = sum_s l_s e^(m_s - m), out = sum_s out_s e^(m_s - m) / l.
// Needs AVX-512 (F, BW); head_dim a multiple of 32 and value groups a multiple of 32.
#include "kv_attention.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MIXPREC_KV_ATTENTION 1
#else
#define MIXPREC_KV_ATTENTION 0
#endif

namespace {

// Maximum query heads per KV head handled (accumulators live on the stack).
constexpr int kMaxGroup = 8;
// Tokens per thread below which one thread takes a whole head.
constexpr int64_t kMinTokensPerSplit = 256;

#if MIXPREC_KV_ATTENTION
// e^x for x <= 0 (inputs below -87.3 give 0 or a subnormal).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-103.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Integer codes of one 32-channel block (32 bytes for int8, 16 for int4) as float32 minus
// their zero points, in the block's lane order: int8 channels 0-15 then 16-31; int4 the
// even channels (low nibbles) then the odd ones (high nibbles).
template <int Bits>
inline void block_codes(const uint8_t* codes, const __m512i zero[2], __m512 out[2]) {
  if constexpr (Bits == 8) {
    for (int i = 0; i < 2; ++i) {
      const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * i)));
      out[i] = _mm512_cvtepi32_ps(_mm512_sub_epi32(wide, zero[i]));
    }
  } else {
    const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
    out[0] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(wide, _mm512_set1_epi32(0xF)), zero[0]));
    out[1] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(wide, 4), zero[1]));
  }
}

// Index of the channel that lane `lane` (0-31) of a block's lane order holds.
template <int Bits>
inline int64_t lane_channel(int64_t lane) {
  return Bits == 8 ? lane : (lane < 16 ? 2 * lane : 2 * (lane - 16) + 1);
}

using mixprec::QuantizedKVView;

// Partial attention of the R query heads of (b, h) over tokens [t0, t1): per head the
// running max, the sum of exponentials and the unnormalized output (channel order).
template <int Bits, int R>
void attend_range(const QuantizedKVView& s, const float* query, float scaling, int64_t h, int64_t t0, int64_t t1,
                  float* max_out, float* sum_out, float* out) {
  const int64_t dim = s.dim, blocks = dim / 32, row_bytes = dim * Bits / 8, len = t1 - t0, bh = h;
  const float* q = query + h * R * dim;
  std::vector<float> scores(R * std::max<int64_t>(len, 1));
  std::vector<float> folded(R * dim);  // a[r][lane] in block lane order
  std::vector<int32_t> zeros(dim);
  // ---- scores
  int64_t chunk = -1;
  const int64_t quantized_end = std::min(t1, s.quantized);
  for (int64_t t = t0; t < quantized_end; ++t) {
    if (t / s.group != chunk) {
      chunk = t / s.group;
      const at::Half* scale = s.key_scale + (bh * s.chunk_stride + chunk) * dim;
      const uint8_t* zero = s.key_zero + (bh * s.chunk_stride + chunk) * dim;
      for (int64_t k = 0; k < blocks; ++k)
        for (int64_t lane = 0; lane < 32; ++lane) {
          const int64_t c = 32 * k + lane_channel<Bits>(lane);
          zeros[32 * k + lane] = zero[c];
          for (int r = 0; r < R; ++r)
            folded[r * dim + 32 * k + lane] = q[r * dim + c] * scaling * static_cast<float>(scale[c]);
        }
    }
    const uint8_t* codes = s.key_codes + (bh * s.code_stride + t) * row_bytes;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < blocks; ++k) {
      const __m512i zero[2] = {_mm512_loadu_si512(zeros.data() + 32 * k),
                               _mm512_loadu_si512(zeros.data() + 32 * k + 16)};
      __m512 d[2];
      block_codes<Bits>(codes + k * 32 * Bits / 8, zero, d);
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm512_fmadd_ps(d[0], _mm512_loadu_ps(folded.data() + r * dim + 32 * k), acc[r]);
        acc[r] = _mm512_fmadd_ps(d[1], _mm512_loadu_ps(folded.data() + r * dim + 32 * k + 16), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) scores[r * len + (t - t0)] = _mm512_reduce_add_ps(acc[r]);
  }
  for (int64_t t = std::max(t0, s.quantized); t < t1; ++t) {
    const float* key = s.recent_keys + (bh * s.recent_stride + (t - s.quantized)) * dim;
    for (int r = 0; r < R; ++r) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < dim; c += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * dim + c), _mm512_loadu_ps(key + c), acc);
      scores[r * len + (t - t0)] = _mm512_reduce_add_ps(acc) * scaling;
    }
  }
  // ---- softmax numerators
  for (int r = 0; r < R; ++r) {
    float* row = scores.data() + r * len;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < len; ++i) top = std::max(top, row[i]);
    __m512 total = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      const __m512 p = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + i), _mm512_set1_ps(top)));
      _mm512_storeu_ps(row + i, p);
      total = _mm512_add_ps(total, p);
    }
    if (i < len) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (len - i)) - 1u);
      const __m512 p = _mm512_maskz_mov_ps(
          tail, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, row + i), _mm512_set1_ps(top))));
      _mm512_mask_storeu_ps(row + i, tail, p);
      total = _mm512_add_ps(total, p);
    }
    max_out[r] = len > 0 ? top : -std::numeric_limits<float>::infinity();
    sum_out[r] = _mm512_reduce_add_ps(total);
  }
  // ---- values, one 32-channel block at a time (its 2R accumulators stay in registers; each lane still sums the
  // tokens in order)
  const int64_t value_groups = dim / s.value_group;
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t v = 32 * k / s.value_group;
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t t = t0; t < quantized_end; ++t) {
      const int64_t token = bh * s.code_stride + t;
      const __m512i z = _mm512_set1_epi32(s.value_zero[token * value_groups + v]);
      const __m512i zero_pair[2] = {z, z};
      __m512 d[2];
      block_codes<Bits>(s.value_codes + token * row_bytes + k * 32 * Bits / 8, zero_pair, d);
      const float value_scale = static_cast<float>(s.value_scale[token * value_groups + v]);
      for (int r = 0; r < R; ++r) {
        const __m512 w = _mm512_set1_ps(scores[r * len + (t - t0)] * value_scale);
        acc[r][0] = _mm512_fmadd_ps(w, d[0], acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(w, d[1], acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      alignas(64) float lanes[32];
      _mm512_store_ps(lanes, acc[r][0]);
      _mm512_store_ps(lanes + 16, acc[r][1]);
      for (int64_t lane = 0; lane < 32; ++lane) out[r * dim + 32 * k + lane_channel<Bits>(lane)] = lanes[lane];
    }
  }
  for (int64_t t = std::max(t0, s.quantized); t < t1; ++t) {
    const float* value = s.recent_values + (bh * s.recent_stride + (t - s.quantized)) * dim;
    for (int r = 0; r < R; ++r) {
      const __m512 w = _mm512_set1_ps(scores[r * len + (t - t0)]);
      for (int64_t c = 0; c < dim; c += 16)
        _mm512_storeu_ps(out + r * dim + c,
                         _mm512_fmadd_ps(w, _mm512_loadu_ps(value + c), _mm512_loadu_ps(out + r * dim + c)));
    }
  }
}

template <int Bits, int R>
void attend_all(const QuantizedKVView& s, const float* query, int64_t tokens, float scaling, float* y) {
  const int64_t dim = s.dim;
  const int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), tokens / kMinTokensPerSplit));
  const int64_t units = s.heads * splits, per_split = (tokens + splits - 1) / splits;
  std::vector<float> maxes(units * R), sums(units * R), partial(units * R * dim);
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t split = u % splits, h = u / splits;
      const int64_t t0 = std::min(tokens, split * per_split), t1 = std::min(tokens, t0 + per_split);
      attend_range<Bits, R>(s, query, scaling, h, t0, t1, maxes.data() + u * R, sums.data() + u * R,
                            partial.data() + u * R * dim);
    }
  });
  for (int64_t h = 0; h < s.heads; ++h)
    for (int r = 0; r < R; ++r) {
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t sp = 0; sp < splits; ++sp) top = std::max(top, maxes[(h * splits + sp) * R + r]);
      float total = 0.0f;
      std::vector<float> weights(splits);
      for (int64_t sp = 0; sp < splits; ++sp) {
        const int64_t u = h * splits + sp;
        weights[sp] = sums[u * R + r] > 0.0f ? std::exp(maxes[u * R + r] - top) : 0.0f;
        total += sums[u * R + r] * weights[sp];
      }
      float* row = y + (h * R + r) * dim;
      for (int64_t c = 0; c < dim; ++c) {
        float value = 0.0f;
        for (int64_t sp = 0; sp < splits; ++sp) value += partial[((h * splits + sp) * R + r) * dim + c] * weights[sp];
        row[c] = value / total;
      }
    }
}

template <int Bits, int R>
void dispatch_group(int64_t group_heads, const QuantizedKVView& s, const float* query, int64_t tokens, float scaling,
                    float* y) {
  if constexpr (R <= kMaxGroup) {
    if (group_heads == R) return attend_all<Bits, R>(s, query, tokens, scaling, y);
    return dispatch_group<Bits, R + 1>(group_heads, s, query, tokens, scaling, y);
  }
  TORCH_CHECK(false, "query heads per KV head must be 1 to ", kMaxGroup);
}
#endif

bool kv_attention_available() { return MIXPREC_KV_ATTENTION == 1; }

// query [B, H * R, D] float32; codes/scales/zeros as the cache stores them (keys
// [B, H, Tq / group, D] scales, values [B, H, Tq, D / value_group]); recent [B, H, Tr, D]
// float32. Returns [B, H * R, D] float32.
at::Tensor kv_decode_attention(const at::Tensor& query, const at::Tensor& key_codes, const at::Tensor& key_scale,
                               const at::Tensor& key_zero, const at::Tensor& value_codes,
                               const at::Tensor& value_scale, const at::Tensor& value_zero,
                               const at::Tensor& recent_keys, const at::Tensor& recent_values, int64_t group,
                               int64_t bits, double scaling) {
  TORCH_CHECK(kv_attention_available(), "this build of the mixprec kernels has no AVX-512 decode attention");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  for (const at::Tensor* t : {&query, &key_codes, &key_scale, &key_zero, &value_codes, &value_scale, &value_zero,
                              &recent_keys, &recent_values})
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu(), "every operand must be a contiguous CPU tensor");
  TORCH_CHECK(query.dim() == 3 && query.scalar_type() == at::kFloat, "query must be float32 [B, query heads, D]");
  TORCH_CHECK(recent_keys.dim() == 4 && recent_keys.scalar_type() == at::kFloat &&
                  recent_values.sizes() == recent_keys.sizes() && recent_values.scalar_type() == at::kFloat,
              "recent keys and values must be float32 [B, H, Tr, D]");
  const int64_t batch = recent_keys.size(0), heads = recent_keys.size(1), dim = recent_keys.size(3);
  TORCH_CHECK(query.size(0) == batch && query.size(2) == dim && query.size(1) % heads == 0,
              "query must be [B, H * R, D] for the cache's B, H and D");
  TORCH_CHECK(dim % 32 == 0, "head_dim must be a multiple of 32");
  TORCH_CHECK(key_codes.dim() == 4 && key_codes.scalar_type() == at::kByte && key_codes.size(0) == batch &&
                  key_codes.size(1) == heads && key_codes.size(3) * 8 == dim * bits &&
                  value_codes.sizes() == key_codes.sizes() &&
                  value_codes.scalar_type() == at::kByte,
              "key and value codes must be uint8 [B, H, Tq, D * bits / 8]");
  const int64_t quantized = key_codes.size(2);
  TORCH_CHECK(group > 0 && quantized % group == 0 && key_scale.scalar_type() == at::kHalf &&
                  key_zero.scalar_type() == at::kByte && key_scale.sizes() == key_zero.sizes() &&
                  key_scale.dim() == 4 && key_scale.size(2) == quantized / group && key_scale.size(3) == dim,
              "key scales and zero points must be [B, H, Tq / group, D] float16 / uint8");
  TORCH_CHECK(value_scale.scalar_type() == at::kHalf && value_zero.scalar_type() == at::kByte &&
                  value_scale.sizes() == value_zero.sizes() && value_scale.dim() == 4 &&
                  value_scale.size(2) == quantized && value_scale.size(3) > 0 && dim % value_scale.size(3) == 0 &&
                  (dim / value_scale.size(3)) % 32 == 0,
              "value scales and zero points must be [B, H, Tq, D / Gv] float16 / uint8 with Gv a multiple of 32");
  auto y = at::empty({batch, query.size(1), dim}, query.options());
  const int64_t recent = recent_keys.size(2), group_heads = query.size(1) / heads;
  TORCH_CHECK(group_heads >= 1 && group_heads <= kMaxGroup, "query heads per KV head must be 1 to ", kMaxGroup,
              ", got ", group_heads);
  for (int64_t b = 0; b < batch; ++b) {
    const mixprec::QuantizedKVView view{key_codes.data_ptr<uint8_t>() + b * key_codes.stride(0),
                                        key_scale.data_ptr<at::Half>() + b * key_scale.stride(0),
                                        key_zero.data_ptr<uint8_t>() + b * key_zero.stride(0),
                                        value_codes.data_ptr<uint8_t>() + b * value_codes.stride(0),
                                        value_scale.data_ptr<at::Half>() + b * value_scale.stride(0),
                                        value_zero.data_ptr<uint8_t>() + b * value_zero.stride(0),
                                        recent_keys.data_ptr<float>() + b * recent_keys.stride(0),
                                        recent_values.data_ptr<float>() + b * recent_values.stride(0),
                                        heads, dim, bits, group, dim / value_scale.size(3), quantized, quantized,
                                        quantized / group, recent};
    mixprec::kv_attend(view, query.data_ptr<float>() + b * query.stride(0), group_heads, quantized + recent,
                       static_cast<float>(scaling), y.data_ptr<float>() + b * y.stride(0));
  }
  return y;
}

}  // namespace

namespace mixprec {

bool kv_attend_supported(int64_t dim, int64_t value_group, int64_t query_group) {
  return MIXPREC_KV_ATTENTION == 1 && dim % 32 == 0 && value_group % 32 == 0 && query_group >= 1 &&
         query_group <= kMaxGroup;
}

void kv_attend(const QuantizedKVView& cache, const float* query, int64_t query_group, int64_t length, float scaling,
               float* out) {
  TORCH_CHECK(kv_attend_supported(cache.dim, cache.value_group, query_group), "kv_attend: no AVX-512 decode attention "
              "for head_dim ", cache.dim, ", value group ", cache.value_group, ", ", query_group,
              " query heads per KV head in this build");
#if MIXPREC_KV_ATTENTION
  if (cache.bits == 8)
    dispatch_group<8, 1>(query_group, cache, query, length, scaling, out);
  else
    dispatch_group<4, 1>(query_group, cache, query, length, scaling, out);
#endif
}

}  // namespace mixprec

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("kv_attention_available() -> bool", &kv_attention_available);
  m.def("kv_decode_attention(Tensor query, Tensor key_codes, Tensor key_scale, Tensor key_zero, Tensor value_codes, "
      "Tensor value_scale, Tensor value_zero, Tensor recent_keys, Tensor recent_values, int group, int bits, "
      "float scaling) -> Tensor");
}

// CPU kernels under the CPU dispatch key (not a catch-all), so torch.compile can pair each with
// its shape-only implementation (mixprec/kernels/fake_ops.py).
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("kv_decode_attention", &kv_decode_attention);
}
