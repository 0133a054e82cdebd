// What the two few-row int8 kernels share (int8_packed_rows.cpp: oneDNN's packed weight read in place;
// int8_dense_rows.cpp: the dense weight): the checks of the activation operands and the epilogue, which
// is rescale_rows_cols's, y = (float(acc) * row_scale[m]) * col_scale[n] + bias[n], each step rounded to
// float32 (no fused multiply-add), so both give the GEMM paths' bits.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>

namespace mixprec::int8_rows {

// Rows of x these kernels take.
constexpr int64_t kMaxRows = 4;

// Refuses codes q [M, K] (uint8, the int8 codes + 128; 1 <= M <= max_rows; K <= 2**17 so int32 sums
// cannot overflow), row scales, col_scale [N] and bias [N] the kernel `name` cannot read; returns whether
// a bias is given.
inline bool check_operands(const char* name, const at::Tensor& q, const at::Tensor& row_scale,
                           const at::Tensor& col_scale, const c10::optional<at::Tensor>& bias, int64_t outs,
                           int64_t max_rows = kMaxRows) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous() && q.device().is_cpu(), name,
              " takes contiguous uint8 CPU codes [M, K], got ", q.toString(), " ", q.sizes());
  const int64_t rows = q.size(0), cols = q.size(1);
  TORCH_CHECK(rows >= 1 && rows <= max_rows, name, " takes 1 to ", max_rows, " rows, got ", rows);
  TORCH_CHECK(cols >= 1 && cols <= (int64_t{1} << 17) && outs >= 1, name,
              " needs 1 <= K <= 2**17 (int32 sums cannot overflow) and N >= 1, got K = ", cols, ", N = ", outs);
  TORCH_CHECK(row_scale.scalar_type() == at::kFloat && row_scale.numel() == rows && row_scale.is_contiguous(), name,
              ": row_scale must be float32 with one value per row");
  TORCH_CHECK(col_scale.scalar_type() == at::kFloat && col_scale.numel() == outs && col_scale.is_contiguous(), name,
              ": col_scale must be float32 with one value per output channel");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == outs && bias->is_contiguous(), name,
                ": bias must be float32 with one value per output channel");
  return has_bias;
}

#if defined(__AVX512F__)
// Stores the rescaled exact sums acc of 16 (lanes) output channels of one row of x.
inline void store_rescaled(__m512i acc, float row_scale, __m512 col_scale, const __m512* bias, __mmask16 lanes,
                           float* out) {
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(row_scale)), col_scale);
  if (bias) y = _mm512_add_ps(y, *bias);
  _mm512_mask_storeu_ps(out, lanes, y);
}
#endif

}  // namespace mixprec::int8_rows
