// The few-row (decoding) path of the `int8` linear whose weight lives only in oneDNN's prepacked
// tensor (kernels/onednn_int8.py): reads that tensor's bytes in place, so no second copy of the
// weight exists, and streams them once per call.
//
// oneDNN 3.x (PyTorch 2.13's build) packs an int8 [N, K] weight for its AVX512-VNNI u8 x s8 matmul as
// [N' / 64][K' / 4][64][4] bytes, N and K zero-padded to N', K', multiples of 64 (byte (n, k) at
// (n / 64) * 64K' + (k / 4) * 256 + (n % 64) * 4 + k % 4), followed by one int32 per padded output
// channel holding -sum_k w[n, k] (the compensation for a zero point of the activations). That layout
// is not a documented interface, so int8_packed_layout_matches checks it byte for byte against the
// dense weight once per packed tensor, and mixprec takes this path only where it matched.
//
// Each 64-channel block is one contiguous stream of 64K bytes: per 4 values of k one 4-byte quad of
// each activation row is broadcast and vpdpbusd multiplies it (u8, the codes + 128) with 4 x 16
// channels (s8), accumulating sum_k (q + 128) * w exactly in int32; adding 128 * compensation gives
// the exact acc = sum_k q * w that oneDNN's GEMM returns (|acc| <= K * 2**14). The epilogue is
// rescale_rows_cols's: y = (float(acc) * row_scale[m]) * col_scale[n] + bias[n], each step rounded
// to float32 (no fused multiply-add), so the output equals the GEMM path's bit for bit.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "int8_rows_common.h"
#include "split_rows.h"

namespace {

constexpr int64_t kBlock = 64;    // output channels per packed block; N and K are padded to multiples of it

int64_t padded(int64_t size) { return (size + kBlock - 1) / kBlock * kBlock; }

// Bytes of the packed weight and its compensation.
int64_t packed_size(int64_t outs, int64_t cols) { return padded(outs) * padded(cols) + 4 * padded(outs); }

int64_t mkldnn_int_op(const char* name, const at::Tensor& packed) {
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<int64_t(const at::Tensor&)>();
  return op.call(packed);
}

// Address and byte count of an opaque oneDNN tensor (PyTorch's mkldnn::data_ptr / mkldnn::_nbytes).
const int8_t* packed_bytes(const at::Tensor& packed, int64_t expected_bytes) {
  TORCH_CHECK(packed.is_mkldnn() && packed.scalar_type() == at::kChar,
              "int8 packed rows: the weight must be oneDNN's packed int8 tensor, got ", packed.toString());
  const int64_t nbytes = mkldnn_int_op("mkldnn::_nbytes", packed);
  TORCH_CHECK(nbytes == expected_bytes, "int8 packed rows: the packed weight holds ", nbytes,
              " bytes, the [N'/64][K'/4][64][4] layout and its compensation need ", expected_bytes);
  return reinterpret_cast<const int8_t*>(mkldnn_int_op("mkldnn::data_ptr", packed));
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kNative = true;

// y rows [0, rows) for the channels of blocks [begin, end); stride: the padded K.
template <int Rows>
void blocks(const uint8_t* q, int64_t cols, int64_t stride, const int8_t* w, const int32_t* comp,
            const float* row_scale, const float* col_scale, const float* bias, int64_t outs, int64_t begin,
            int64_t end, float* y) {
  const int64_t quads = (cols + 3) / 4, tail = cols % 4;
  for (int64_t b = begin; b < end; ++b) {
    const int8_t* block = w + b * kBlock * stride;
    __m512i acc[Rows][4];
    for (int m = 0; m < Rows; ++m)
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_si512();
    // One step: 4 values of k for 64 channels; the padded k of a last partial quad meet zero weights.
    const auto step = [&](int64_t k4, const int32_t (&quad)[Rows]) {
      const int8_t* at = block + k4 * 4 * kBlock;
      const __m512i w0 = _mm512_loadu_si512(at), w1 = _mm512_loadu_si512(at + 64);
      const __m512i w2 = _mm512_loadu_si512(at + 128), w3 = _mm512_loadu_si512(at + 192);
      for (int m = 0; m < Rows; ++m) {
        const __m512i x = _mm512_set1_epi32(quad[m]);
        acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], x, w0);
        acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], x, w1);
        acc[m][2] = _mm512_dpbusd_epi32(acc[m][2], x, w2);
        acc[m][3] = _mm512_dpbusd_epi32(acc[m][3], x, w3);
      }
    };
    const int64_t whole = tail == 0 ? quads : quads - 1;
    for (int64_t k4 = 0; k4 < whole; ++k4) {
      int32_t quad[Rows];
      for (int m = 0; m < Rows; ++m) std::memcpy(&quad[m], q + m * cols + 4 * k4, 4);
      step(k4, quad);
    }
    if (tail != 0) {
      int32_t quad[Rows] = {};
      for (int m = 0; m < Rows; ++m) std::memcpy(&quad[m], q + m * cols + 4 * whole, tail);
      step(whole, quad);
    }
    for (int j = 0; j < 4; ++j) {
      const int64_t n = b * kBlock + 16 * j;
      if (n >= outs) break;
      const __mmask16 lanes = outs - n >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << (outs - n)) - 1u);
      const __m512i shift = _mm512_slli_epi32(_mm512_loadu_si512(comp + n), 7);  // 128 * compensation
      const __m512 cs = _mm512_maskz_loadu_ps(lanes, col_scale + n);
      const __m512 bs = bias ? _mm512_maskz_loadu_ps(lanes, bias + n) : _mm512_setzero_ps();
      for (int m = 0; m < Rows; ++m)
        mixprec::int8_rows::store_rescaled(_mm512_add_epi32(acc[m][j], shift), row_scale[m], cs, bias ? &bs : nullptr,
                                           lanes, y + m * outs + n);
    }
  }
}
#else
constexpr bool kNative = false;
#endif

bool int8_packed_rows_available() { return kNative; }

// Whether `packed` (oneDNN's pack of the int8 [N, K] `weight`) holds exactly the layout above.
bool int8_packed_layout_matches(const at::Tensor& weight, const at::Tensor& packed) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "int8_packed_layout_matches takes a contiguous int8 [N, K] weight, got ", weight.toString(), " ",
              weight.sizes());
  const int64_t outs = weight.size(0), cols = weight.size(1), stride = padded(cols);
  if (!packed.is_mkldnn() || packed.scalar_type() != at::kChar ||
      mkldnn_int_op("mkldnn::_nbytes", packed) != packed_size(outs, cols))
    return false;
  const int8_t* bytes = reinterpret_cast<const int8_t*>(mkldnn_int_op("mkldnn::data_ptr", packed));
  const int8_t* dense = weight.data_ptr<int8_t>();
  for (int64_t n = 0; n < padded(outs); ++n) {
    const int8_t* base = bytes + (n / kBlock) * kBlock * stride + (n % kBlock) * 4;
    int64_t sum = 0;
    for (int64_t k = 0; k < stride; ++k) {
      const int8_t expected = n < outs && k < cols ? dense[n * cols + k] : 0;
      if (base[(k / 4) * 4 * kBlock + k % 4] != expected) return false;
      sum += expected;
    }
    int32_t compensation;
    std::memcpy(&compensation, bytes + padded(outs) * stride + 4 * n, 4);
    if (compensation != -sum) return false;
  }
  return true;
}

// y [M, N] float32 of the int8 linear for uint8 codes q [M, K] (M <= 4; q = int8 code + 128), their
// per-row scales, and a packed weight whose layout int8_packed_layout_matches accepted.
at::Tensor int8_packed_rows(const at::Tensor& q, const at::Tensor& row_scale, const at::Tensor& packed,
                            const at::Tensor& col_scale, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(kNative, "int8_packed_rows: this build has no AVX512-VNNI kernel");
  const int64_t outs = col_scale.numel();
  const bool has_bias = mixprec::int8_rows::check_operands("int8_packed_rows", q, row_scale, col_scale, bias, outs);
  const int64_t rows = q.size(0), cols = q.size(1);
  const int8_t* w = packed_bytes(packed, packed_size(outs, cols));
  auto y = at::empty({rows, outs}, col_scale.options());
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const int64_t stride = padded(cols);
  const auto* comp = reinterpret_cast<const int32_t*>(w + padded(outs) * stride);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float *rs = row_scale.data_ptr<float>(), *cs = col_scale.data_ptr<float>();
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  mixprec::split_rows(padded(outs) / kBlock, rows * outs * cols, [&](int64_t begin, int64_t end) {
    switch (rows) {
      case 1: blocks<1>(qp, cols, stride, w, comp, rs, cs, bp, outs, begin, end, yp); break;
      case 2: blocks<2>(qp, cols, stride, w, comp, rs, cs, bp, outs, begin, end, yp); break;
      case 3: blocks<3>(qp, cols, stride, w, comp, rs, cs, bp, outs, begin, end, yp); break;
      default: blocks<4>(qp, cols, stride, w, comp, rs, cs, bp, outs, begin, end, yp); break;
    }
  });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("int8_packed_rows_available() -> bool", &int8_packed_rows_available);
  m.def("int8_packed_layout_matches(Tensor weight, Tensor packed) -> bool");
  m.def("int8_packed_rows(Tensor q, Tensor row_scale, Tensor packed, Tensor col_scale, Tensor? bias) -> Tensor");
}

// The packed weight is an MkldnnCPU tensor, so the dispatcher picks that key when it is an argument.
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("int8_packed_layout_matches", &int8_packed_layout_matches);
  m.impl("int8_packed_rows", &int8_packed_rows);
}

TORCH_LIBRARY_IMPL(mixprec, MkldnnCPU, m) {
  m.impl("int8_packed_layout_matches", &int8_packed_layout_matches);
  m.impl("int8_packed_rows", &int8_packed_rows);
}
