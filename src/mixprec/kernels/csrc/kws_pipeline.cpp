// The keyword-spotting pipeline of mixprec.integer (mixprec/integer/kws.py) fused into one
// pass: int8 FULLY_CONNECTED + ReLU per step, int8 -> half table, linear attention with the
// ReLU feature map, residual, mean over steps, half -> int8, int8 FULLY_CONNECTED.
//
// Every operation repeats the numpy reference (mixprec/integer/half_ops.py, bridges.py,
// fully_connected.py) exactly: float32 sums in the same index order, one IEEE rounding per
// addition (built with -ffp-contract=off, no fast-math), half rounding to nearest-even after
// each operator, single-rounding requantization in 64-bit integers. Samples run in blocks of
// kLanes, the lane index innermost, so the compiler vectorizes across samples without
// changing any per-sample order.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kLanes = 16;

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

inline float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// float32 -> nearest float16 value (ties to even, subnormals, overflow to inf, NaN kept), as float32.
inline float round_fp16(float x) {
  const float magnitude = std::fabs(x);
  uint32_t u = bits_of(x);
  u = (u + 0xFFFu + ((u >> 13) & 1u)) & ~0x1FFFu;  // 10 mantissa bits, for normal halves
  float normal = float_of(u);
  const float subnormal = std::nearbyint(x * 16777216.0f) * (1.0f / 16777216.0f);  // steps of 2^-24
  float r = magnitude < 6.103515625e-05f ? subnormal : normal;  // below 2^-14
  r = std::fabs(r) > 65504.0f ? std::copysign(INFINITY, x) : r;
  return x != x ? x : r;
}

// float32 -> nearest bfloat16 value (ties to even; float32 subnormals are bfloat16's), as float32.
inline float round_bf16(float x) {
  uint32_t u = bits_of(x);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  return x != x ? x : float_of(u);
}

template <bool BF16>
inline float round_half(float x) {
  if constexpr (BF16) return round_bf16(x); else return round_fp16(x);
}

struct Dense {  // an int8 FULLY_CONNECTED record
  const int8_t* weight;  // [out, in]
  const int32_t* bias;   // [out]
  const int32_t* multiplier;
  const int32_t* shift;
  int64_t per_channel, in_features, out_features;
  int32_t input_offset, output_offset, act_min, act_max;
};

Dense dense_from(const at::Tensor& w, const at::Tensor& b, const at::Tensor& m, const at::Tensor& s, int64_t in_off,
                 int64_t out_off, int64_t lo, int64_t hi) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), "weights must be int8 [out, in]");
  const int64_t out = w.size(0);
  TORCH_CHECK(b.scalar_type() == at::kInt && b.numel() == out && b.is_contiguous(), "bias must be int32 [out]");
  TORCH_CHECK(m.scalar_type() == at::kInt && s.scalar_type() == at::kInt && m.numel() == s.numel() &&
                  (m.numel() == 1 || m.numel() == out) && m.is_contiguous() && s.is_contiguous(),
              "multiplier and shift must be int32 [1] or [out]");
  return {w.data_ptr<int8_t>(), b.data_ptr<int32_t>(), m.data_ptr<int32_t>(), s.data_ptr<int32_t>(),
          m.numel() == 1 ? 0 : 1, w.size(1), out, static_cast<int32_t>(in_off), static_cast<int32_t>(out_off),
          static_cast<int32_t>(lo), static_cast<int32_t>(hi)};
}

// out[o][lane] = clamp(requant(bias[o] + sum_k (x[k][lane] + in_off) * w[o][k]) + out_off)
inline void dense_block(const Dense& d, const int32_t* x, int32_t* out) {
  for (int64_t o = 0; o < d.out_features; ++o) {
    int32_t acc[kLanes];
    for (int l = 0; l < kLanes; ++l) acc[l] = d.bias[o];
    for (int64_t k = 0; k < d.in_features; ++k) {
      const int32_t w = d.weight[o * d.in_features + k];
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) acc[l] += (x[k * kLanes + l] + d.input_offset) * w;
    }
    const int64_t m = d.multiplier[o * d.per_channel];
    const int total = 31 - d.shift[o * d.per_channel];
    const int64_t nudge = int64_t{1} << (total - 1);
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      int64_t v = ((static_cast<int64_t>(acc[l]) * m + nudge) >> total) + d.output_offset;
      v = v < d.act_min ? d.act_min : (v > d.act_max ? d.act_max : v);
      out[o * kLanes + l] = static_cast<int32_t>(v);
    }
  }
}

// Half linear: y[o][lane] = round(sum_k x[k][lane] * w[o][k] (k = 0, 1, ...) + b[o]).
template <bool BF16>
inline void half_linear_block(const float* x, const float* w, const float* b, int64_t width, float* y) {
  for (int64_t o = 0; o < width; ++o) {
    float acc[kLanes] = {};
    for (int64_t k = 0; k < width; ++k) {
      const float wk = w[o * width + k];
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) acc[l] = acc[l] + x[k * kLanes + l] * wk;
    }
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) y[o * kLanes + l] = round_half<BF16>(acc[l] + b[o]);
  }
}

template <bool BF16>
int64_t run(const int8_t* x, int64_t batch, int64_t steps, const Dense& front, const float* table, const float* qkv_w,
            const float* qkv_b, float epsilon, double pooled_scale, int32_t pooled_zero, const Dense& head,
            int8_t* out) {
  const int64_t features = front.in_features, width = front.out_features, classes = head.out_features;
  const int64_t per_sample = steps * features;
  std::vector<int32_t> codes_in(features * kLanes), codes_h(width * kLanes), pooled_codes(width * kLanes),
      logits(classes * kLanes);
  std::vector<float> h(steps * width * kLanes), q(steps * width * kLanes), k(steps * width * kLanes),
      v(steps * width * kLanes), kv(width * width * kLanes), z(width * kLanes), den(kLanes),
      mixed_sum(width * kLanes);
  int64_t nan_count = 0;
  for (int64_t start = 0; start < batch; start += kLanes) {
    const int64_t live = std::min<int64_t>(kLanes, batch - start);
    // Frontend per step, then the table into half values h[s][e][lane].
    for (int64_t s = 0; s < steps; ++s) {
      for (int64_t f = 0; f < features; ++f)
        for (int l = 0; l < kLanes; ++l)
          codes_in[f * kLanes + l] = l < live ? x[(start + l) * per_sample + s * features + f] : 0;
      dense_block(front, codes_in.data(), codes_h.data());
      for (int64_t e = 0; e < width; ++e)
        for (int l = 0; l < kLanes; ++l) h[(s * width + e) * kLanes + l] = table[codes_h[e * kLanes + l] + 128];
    }
    for (int64_t s = 0; s < steps; ++s) {
      const float* hs = h.data() + s * width * kLanes;
      half_linear_block<BF16>(hs, qkv_w, qkv_b, width, q.data() + s * width * kLanes);
      half_linear_block<BF16>(hs, qkv_w + width * width, qkv_b + width, width, k.data() + s * width * kLanes);
      half_linear_block<BF16>(hs, qkv_w + 2 * width * width, qkv_b + 2 * width, width, v.data() + s * width * kLanes);
    }
    for (size_t i = 0; i < q.size(); ++i) {  // the ReLU feature map (NaN kept)
      q[i] = q[i] < 0.0f ? 0.0f : q[i];
      k[i] = k[i] < 0.0f ? 0.0f : k[i];
    }
    // kv[e][f] = sum_s k[s][e] v[s][f]; z[e] = sum_s k[s][e]; each rounded once.
    std::fill(kv.begin(), kv.end(), 0.0f);
    std::fill(z.begin(), z.end(), 0.0f);
    for (int64_t s = 0; s < steps; ++s)
      for (int64_t e = 0; e < width; ++e) {
        const float* ks = k.data() + (s * width + e) * kLanes;
        for (int64_t f = 0; f < width; ++f) {
          const float* vs = v.data() + (s * width + f) * kLanes;
          float* target = kv.data() + (e * width + f) * kLanes;
#pragma omp simd
          for (int l = 0; l < kLanes; ++l) target[l] = target[l] + ks[l] * vs[l];
        }
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) z[e * kLanes + l] = z[e * kLanes + l] + ks[l];
      }
    for (auto& value : kv) value = round_half<BF16>(value);
    for (auto& value : z) value = round_half<BF16>(value);
    std::fill(mixed_sum.begin(), mixed_sum.end(), 0.0f);
    for (int64_t s = 0; s < steps; ++s) {
      const float* qs = q.data() + s * width * kLanes;
      float d[kLanes] = {};
      for (int64_t e = 0; e < width; ++e)
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) d[l] = d[l] + qs[e * kLanes + l] * z[e * kLanes + l];
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) den[l] = round_half<BF16>(round_half<BF16>(d[l]) + epsilon);
      for (int64_t f = 0; f < width; ++f) {
        float n[kLanes] = {};
        for (int64_t e = 0; e < width; ++e) {
          const float* kve = kv.data() + (e * width + f) * kLanes;
#pragma omp simd
          for (int l = 0; l < kLanes; ++l) n[l] = n[l] + qs[e * kLanes + l] * kve[l];
        }
        const float* hsf = h.data() + (s * width + f) * kLanes;
        float* sum = mixed_sum.data() + f * kLanes;
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          const float attention = round_half<BF16>(round_half<BF16>(n[l]) / den[l]);
          sum[l] = sum[l] + round_half<BF16>(hsf[l] + attention);
        }
      }
    }
    // Mean over steps, then half -> int8 (nearest-even in double, saturating).
    const float count = static_cast<float>(steps);
    for (int64_t f = 0; f < width; ++f)
      for (int l = 0; l < kLanes; ++l) {
        const float pooled = round_half<BF16>(mixed_sum[f * kLanes + l] / count);
        if (pooled != pooled) {
          nan_count += l < live;
          pooled_codes[f * kLanes + l] = 0;
          continue;
        }
        double code = std::nearbyint(static_cast<double>(pooled) / pooled_scale) + pooled_zero;
        code = code < -128.0 ? -128.0 : (code > 127.0 ? 127.0 : code);
        pooled_codes[f * kLanes + l] = static_cast<int32_t>(code);
      }
    dense_block(head, pooled_codes.data(), logits.data());
    for (int l = 0; l < live; ++l)
      for (int64_t c = 0; c < classes; ++c) out[(start + l) * classes + c] = static_cast<int8_t>(logits[c * kLanes + l]);
  }
  return nan_count;
}

std::tuple<at::Tensor, int64_t> kws_pipeline(const at::Tensor& x, const at::Tensor& fw, const at::Tensor& fb,
                                             const at::Tensor& fm, const at::Tensor& fs, int64_t f_in, int64_t f_out,
                                             int64_t f_lo, int64_t f_hi, const at::Tensor& table,
                                             const at::Tensor& qkv_w, const at::Tensor& qkv_b, double epsilon,
                                             int64_t bf16, double pooled_scale, int64_t pooled_zero,
                                             const at::Tensor& cw, const at::Tensor& cb, const at::Tensor& cm,
                                             const at::Tensor& cs, int64_t c_in, int64_t c_out, int64_t c_lo,
                                             int64_t c_hi) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kChar && x.is_contiguous(), "x must be int8 [B, S, F]");
  const Dense front = dense_from(fw, fb, fm, fs, f_in, f_out, f_lo, f_hi);
  const Dense head = dense_from(cw, cb, cm, cs, c_in, c_out, c_lo, c_hi);
  const int64_t width = front.out_features;
  TORCH_CHECK(x.size(2) == front.in_features && head.in_features == width, "feature counts do not chain");
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.numel() == 256 && table.is_contiguous(), "table: float32[256]");
  TORCH_CHECK(qkv_w.scalar_type() == at::kFloat && qkv_w.is_contiguous() && qkv_w.numel() == 3 * width * width &&
                  qkv_b.scalar_type() == at::kFloat && qkv_b.is_contiguous() && qkv_b.numel() == 3 * width,
              "qkv weights float32 [3, E, E] and biases [3, E]");
  at::Tensor out = at::empty({x.size(0), head.out_features}, x.options());
  int64_t nan_count = bf16 ? run<true>(x.data_ptr<int8_t>(), x.size(0), x.size(1), front, table.data_ptr<float>(),
                                       qkv_w.data_ptr<float>(), qkv_b.data_ptr<float>(), static_cast<float>(epsilon),
                                       pooled_scale, static_cast<int32_t>(pooled_zero), head, out.data_ptr<int8_t>())
                           : run<false>(x.data_ptr<int8_t>(), x.size(0), x.size(1), front, table.data_ptr<float>(),
                                        qkv_w.data_ptr<float>(), qkv_b.data_ptr<float>(), static_cast<float>(epsilon),
                                        pooled_scale, static_cast<int32_t>(pooled_zero), head, out.data_ptr<int8_t>());
  return {out, nan_count};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("kws_pipeline(Tensor x, Tensor fw, Tensor fb, Tensor fm, Tensor fs, int f_in, int f_out, int f_lo, "
        "int f_hi, Tensor table, Tensor qkv_w, Tensor qkv_b, float epsilon, int bf16, float pooled_scale, "
        "int pooled_zero, Tensor cw, Tensor cb, Tensor cm, Tensor cs, int c_in, int c_out, int c_lo, int c_hi) "
        "-> (Tensor, int)");
}

// CPU kernels under the CPU dispatch key (not a catch-all), so torch.compile can pair each with
// its shape-only implementation (mixprec/kernels/fake_ops.py).
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("kws_pipeline", &kws_pipeline);
}
