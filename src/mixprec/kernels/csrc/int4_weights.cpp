// Int4 weight-only kernels (w4gN). Weight layout: packed [N, K/2] uint8, element 2i in
// the low nibble of byte i and 2i+1 in the high nibble, two's complement codes; fp16
// scales [N, K/G]. The dequantized weight w = float(q) * s is exact in float32 (a 4-bit
// code times an 11-bit fp16 significand needs at most 15 bits).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "avx2_lanes.h"
#include "even_odd_split.h"
#include "half_floats.h"
#include "split_rows.h"
#include "w4_layout.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) || defined(MIXPREC_AVX2_LANES)
#include <immintrin.h>
#endif

namespace {

inline float code_value(int64_t nibble) { return static_cast<float>(nibble >= 8 ? nibble - 16 : nibble); }

// Scalar expansion of elements [begin, end) of one row (begin even).
void dequantize_scalar(const uint8_t* prow, const float* srow, int64_t group, int64_t begin, int64_t end,
                       float* wrow) {
  for (int64_t k = begin; k < end; k += 2) {
    const uint8_t byte = prow[k / 2];
    wrow[k] = code_value(byte & 0xF) * srow[k / group];
    wrow[k + 1] = code_value(byte >> 4) * srow[(k + 1) / group];
  }
}

#if defined(__AVX512F__)
// The 16 signed code values as float32 lanes, indexed by nibble.
inline __m512 code_table() {
  return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
}

// Codes of 32 elements (16 bytes) as two vectors: lane i of `low` is element 2i, of
// `high` element 2i+1, each already multiplied by its scale (exact, see top of file).
// The lookup uses the low 4 bits of each 32-bit lane as the table index.
inline void unpack32(const uint8_t* bytes, __m512 table_low, __m512 table_high, __m512& low, __m512& high) {
  const __m512i lanes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  low = _mm512_permutexvar_ps(lanes, table_low);
  high = _mm512_permutexvar_ps(_mm512_srli_epi32(lanes, 4), table_high);
}
#endif

// Float32 weight rows [begin, end) into out (row stride K).
void dequantize_rows_into(const uint8_t* packed, const at::Half* scale, int64_t cols, int64_t group, int64_t begin,
                          int64_t end, float* out) {
  const int64_t groups = cols / group;
  std::vector<float> srow(groups);
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* prow = packed + n * (cols / 2);
    mixprec::halves_to_floats(scale + n * groups, srow.data(), groups);
    float* wrow = out + (n - begin) * cols;
    int64_t done = 0;
#if defined(__AVX512F__)
    if (group % 32 == 0) {
      const __m512i even = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const __m512i odd = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
      for (int64_t k = 0; k < cols; k += 32) {
        const __m512 table = _mm512_mul_ps(code_table(), _mm512_set1_ps(srow[k / group]));
        __m512 low, high;
        unpack32(prow + k / 2, table, table, low, high);
        _mm512_storeu_ps(wrow + k, _mm512_permutex2var_ps(low, even, high));
        _mm512_storeu_ps(wrow + k + 16, _mm512_permutex2var_ps(low, odd, high));
      }
      done = cols;
    }
#elif defined(MIXPREC_AVX2_LANES)
    if (group % 32 == 0) {
      const __m128i table = mixprec::avx2::int4_code_bytes(), nibble = _mm_set1_epi8(0x0F);
      for (int64_t k = 0; k < cols; k += 32) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(prow + k / 2));
        const __m128i low = _mm_shuffle_epi8(table, _mm_and_si128(bytes, nibble));
        const __m128i high = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
        const __m128i first = _mm_unpacklo_epi8(low, high), second = _mm_unpackhi_epi8(low, high);  // element order
        const __m256 scale = _mm256_set1_ps(srow[k / group]);
        _mm256_storeu_ps(wrow + k, _mm256_mul_ps(mixprec::avx2::low8_to_floats(first), scale));
        _mm256_storeu_ps(wrow + k + 8, _mm256_mul_ps(mixprec::avx2::high8_to_floats(first), scale));
        _mm256_storeu_ps(wrow + k + 16, _mm256_mul_ps(mixprec::avx2::low8_to_floats(second), scale));
        _mm256_storeu_ps(wrow + k + 24, _mm256_mul_ps(mixprec::avx2::high8_to_floats(second), scale));
      }
      done = cols;
    }
#endif
    dequantize_scalar(prow, srow.data(), group, done, cols, wrow);
  }
}

// Writes float32 weight rows [begin, begin + out.size(0)) of a w4 linear into out, for
// callers that multiply tile by tile and reuse one tile buffer.
void w4_dequantize_rows(const at::Tensor& packed, const at::Tensor& scale, int64_t begin, at::Tensor& out) {
  const int64_t cols = packed.size(1) * 2;
  mixprec::check_w4_layout(packed, scale, cols, 2);
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kFloat && out.is_contiguous() && out.size(1) == cols,
              "out must be a contiguous float32 tensor [rows, K]");
  const int64_t rows = out.size(0);
  TORCH_CHECK(0 <= begin && begin + rows <= packed.size(0), "row range out of bounds");
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  float* op = out.data_ptr<float>();
  const int64_t group = cols / scale.size(1);
  mixprec::split_rows(rows, rows * cols, [&](int64_t b, int64_t e) {
    dequantize_rows_into(pp, sp, cols, group, begin + b, begin + e, op + b * cols);
  });
}

#if defined(__AVX512F__)
// The pre-scaled code tables of a row's chunks of 32 elements in order: one table per group,
// reused by its group / 32 chunks (group a multiple of 32).
class ChunkTables {
 public:
  ChunkTables(const float* scales, int64_t group) : scale_(scales), chunks_per_group_(group / 32) {}
  __m512 next() {
    const __m512 table = _mm512_mul_ps(code_table(), _mm512_set1_ps(*scale_));
    if (++chunk_ == chunks_per_group_) {
      chunk_ = 0;
      ++scale_;
    }
    return table;
  }

 private:
  const float* scale_;
  int64_t chunks_per_group_, chunk_ = 0;
};

// Output rows [begin, end) for the Rows rows of x starting at xd (de-interleaved). Independent
// accumulators per row of x (low and high nibbles; with Unroll = 2 also even and odd chunks, for
// one row of x) hide the fused multiply-add latency; they are summed at the end.
template <int Rows, int Unroll>
void linear_block(const float* xd, int64_t cols, const uint8_t* packed, const at::Half* scale, int64_t group,
                  const float* bias, int64_t outs, int64_t begin, int64_t end, float* yp) {
  static_assert(Unroll == 1 || Unroll == 2, "one or two chunks per step");
  const int64_t groups = cols / group;
  std::vector<float> srow(groups);
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* prow = packed + n * (cols / 2);
    mixprec::halves_to_floats(scale + n * groups, srow.data(), groups);
    ChunkTables tables(srow.data(), group);
    __m512 acc[2 * Unroll][Rows];
    for (auto& chain : acc)
      for (auto& a : chain) a = _mm512_setzero_ps();
    const auto chunk = [&](int64_t k, __m512(&low_acc)[Rows], __m512(&high_acc)[Rows]) {
      const __m512 table = tables.next();
      __m512 low, high;
      unpack32(prow + k / 2, table, table, low, high);
      for (int m = 0; m < Rows; ++m) {
        const float* xc = xd + m * cols + k;
        low_acc[m] = _mm512_fmadd_ps(low, _mm512_loadu_ps(xc), low_acc[m]);
        high_acc[m] = _mm512_fmadd_ps(high, _mm512_loadu_ps(xc + 16), high_acc[m]);
      }
    };
    int64_t k = 0;
    for (; k + 32 * Unroll <= cols; k += 32 * Unroll) {
      chunk(k, acc[0], acc[1]);
      if constexpr (Unroll == 2) chunk(k + 32, acc[2], acc[3]);
    }
    if (k < cols) chunk(k, acc[0], acc[1]);
    for (int m = 0; m < Rows; ++m) {
      __m512 sum = _mm512_add_ps(acc[0][m], acc[1][m]);
      if constexpr (Unroll == 2) sum = _mm512_add_ps(sum, _mm512_add_ps(acc[2][m], acc[3][m]));
      yp[m * outs + n] = _mm512_reduce_add_ps(sum) + (bias != nullptr ? bias[n] : 0.0f);
    }
  }
}

// One row of x (decoding) with K a multiple of 128 and a group size of 32, 64 or a multiple of 128: each 64 bytes
// of a weight row (128 codes) are read as 16 lanes of 8 nibbles, lane j holding codes 8j..8j+7 of the chunk;
// shifting the lanes right by 4i puts code 8j+i in the low nibble of lane j (no shuffles: the weight's own layout),
// and float(2^23 + (q XOR 8)) - (2^23 + 8) is the code q exactly. Per chunk and lane: t = sum_i q[8j+i] * x[8j+i]
// (fused multiply-adds, two chains of four), then acc += t * s, s the lane's group scale (8 consecutive codes never
// cross a multiple of 32). x arrives re-laid out as xl[c][i][j] = x[128c + 8j + i] (lane_layout). Sums in float32
// in another order than linear_block's: the same result up to rounding. Measured here against linear_block<1, 2>:
// 12.4 against 11.4 GB/s of a weight in the L3 on one core, a 1.17B decode step 1.07x.
constexpr int64_t kLaneChunk = 128;

std::vector<float> lane_layout(const float* x, int64_t cols) {
  std::vector<float> out(cols);
  for (int64_t c = 0; c < cols; c += kLaneChunk)
    for (int64_t i = 0; i < 8; ++i)
      for (int64_t j = 0; j < 16; ++j) out[c + 16 * i + j] = x[c + 8 * j + i];
  return out;
}

void linear_one_row(const float* xl, int64_t cols, const uint8_t* packed, const at::Half* scale, int64_t group,
                    const float* bias, int64_t begin, int64_t end, float* y) {
  const int64_t groups = cols / group;
  // The row's scales in float32 (a burst over 32 rows at a time was measured slower here: the core waits for it),
  // 16 bytes readable from any group's.
  std::vector<float> srow(groups + 4);
  // Lane j of a chunk at c holds codes of group (c + 8j) / G: group c / G + (8j) / G for G = 32 or 64, c / G for G
  // a multiple of 128.
  const __m512i lane_group = _mm512_srli_epi32(
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(8)),
      group == 32 ? 5u : group == 64 ? 6u : 31u);
  const __m512i nibble = _mm512_set1_epi32(0x0F), magic = _mm512_set1_epi32(0x4B000008);  // 2^23 as float bits, | 8
  const __m512 offset = _mm512_set1_ps(8388616.0f);                                         // 2^23 + 8
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* prow = packed + n * (cols / 2);
    mixprec::halves_to_floats(scale + n * groups, srow.data(), groups);
    // (lanes >> 4i & 0x0F) ^ 0x4B000008: the float 2^23 + (q + 8) of code 8j + i, q its two's complement value
    const auto code = [&](__m512i lanes, int i) {
      const __m512i shifted = _mm512_srl_epi32(lanes, _mm_cvtsi32_si128(4 * i));
      return _mm512_sub_ps(_mm512_castsi512_ps(_mm512_ternarylogic_epi32(shifted, nibble, magic, 0x6A)), offset);
    };
    // Codes i, i + 2, i + 4, i + 6 of a chunk times their x, summed by fused multiply-adds.
    const auto chain = [&](__m512i lanes, const float* xc, int i) {
      __m512 t = _mm512_mul_ps(code(lanes, i), _mm512_loadu_ps(xc + 16 * i));
      for (int step = i + 2; step < 8; step += 2)
        t = _mm512_fmadd_ps(code(lanes, step), _mm512_loadu_ps(xc + 16 * step), t);
      return t;
    };
    __m512 even_chunks = _mm512_setzero_ps(), odd_chunks = _mm512_setzero_ps();
    const auto chunk = [&](int64_t c, __m512& acc) {
      const __m512i lanes = _mm512_loadu_si512(prow + c / 2);
      const __m512 t = _mm512_add_ps(chain(lanes, xl + c, 0), chain(lanes, xl + c, 1));
      const __m512 s = _mm512_permutexvar_ps(lane_group, _mm512_castps128_ps512(_mm_loadu_ps(srow.data() + c / group)));
      acc = _mm512_fmadd_ps(t, s, acc);
    };
    int64_t c = 0;
    for (; c + 2 * kLaneChunk <= cols; c += 2 * kLaneChunk) {
      chunk(c, even_chunks);
      chunk(c + kLaneChunk, odd_chunks);
    }
    if (c < cols) chunk(c, even_chunks);
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(even_chunks, odd_chunks)) + (bias != nullptr ? bias[n] : 0.0f);
  }
}
#endif

#if defined(MIXPREC_AVX2_LANES)
// linear_block with 8 lanes (AVX2 + FMA) for Rows (1 or 2) rows of x: each chunk of 32 codes (16
// bytes) becomes four vectors of 8 scaled weights (low nibbles of bytes 0-7 and 8-15, then the high
// ones), each with its own accumulator per row of x, summed at the end in a fixed order; a row's
// order depends on K only. 2 x 4 accumulators, 4 weights, x and two constants fit 16 registers.
template <int Rows>
void linear_block_avx2(const float* xd, int64_t cols, const uint8_t* packed, const at::Half* scale, int64_t group,
                       const float* bias, int64_t outs, int64_t begin, int64_t end, float* yp) {
  const int64_t groups = cols / group;
  std::vector<float> srow(groups);
  const __m128i table = mixprec::avx2::int4_code_bytes(), nibble = _mm_set1_epi8(0x0F);
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* prow = packed + n * (cols / 2);
    mixprec::halves_to_floats(scale + n * groups, srow.data(), groups);
    __m256 acc[Rows][4];
    for (auto& row : acc)
      for (auto& a : row) a = _mm256_setzero_ps();
    for (int64_t k = 0; k < cols; k += 32) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(prow + k / 2));
      const __m128i low = _mm_shuffle_epi8(table, _mm_and_si128(bytes, nibble));
      const __m128i high = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
      const __m256 s = _mm256_set1_ps(srow[k / group]);
      const __m256 w[4] = {_mm256_mul_ps(mixprec::avx2::low8_to_floats(low), s),
                           _mm256_mul_ps(mixprec::avx2::high8_to_floats(low), s),
                           _mm256_mul_ps(mixprec::avx2::low8_to_floats(high), s),
                           _mm256_mul_ps(mixprec::avx2::high8_to_floats(high), s)};
      for (int m = 0; m < Rows; ++m)
        for (int v = 0; v < 4; ++v)
          acc[m][v] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(xd + m * cols + k + 8 * v), acc[m][v]);
    }
    for (int m = 0; m < Rows; ++m) {
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]));
      yp[m * outs + n] = mixprec::avx2::sum_lanes(sum) + (bias != nullptr ? bias[n] : 0.0f);
    }
  }
}
#endif

// y[m, n] for output rows [begin, end): sum_k x[m, k] * w[n, k] + bias[n] in float32.
void linear_rows(const float* xp, int64_t rows, int64_t cols, const uint8_t* packed, const at::Half* scale,
                 int64_t group, const float* bias, int64_t outs, int64_t begin, int64_t end, float* yp) {
#if defined(__AVX512F__)
  if (rows == 1 && (group == 32 || group == 64 || group % kLaneChunk == 0) && cols % kLaneChunk == 0) {
    const std::vector<float> xl = lane_layout(xp, cols);
    linear_one_row(xl.data(), cols, packed, scale, group, bias, begin, end, yp);
    return;
  }
  if (group % 32 == 0) {
    const std::vector<float> xd = mixprec::split_even_odd(xp, rows, cols, 32);  // cols % 32 == 0: no padding
    // Weight rows a tile at a time, every row of x against a tile while it is in cache.
    constexpr int64_t kTileRows = 32;
    for (int64_t tile = begin; tile < end; tile += kTileRows) {
      const int64_t tile_end = std::min(end, tile + kTileRows);
      int64_t m = 0;
      for (; m + 8 <= rows; m += 8)
        linear_block<8, 1>(xd.data() + m * cols, cols, packed, scale, group, bias, outs, tile, tile_end, yp + m * outs);
      for (; m + 4 <= rows; m += 4)
        linear_block<4, 1>(xd.data() + m * cols, cols, packed, scale, group, bias, outs, tile, tile_end, yp + m * outs);
      for (; m < rows; ++m)
        linear_block<1, 2>(xd.data() + m * cols, cols, packed, scale, group, bias, outs, tile, tile_end, yp + m * outs);
    }
    return;
  }
#elif defined(MIXPREC_AVX2_LANES)
  if (group % 32 == 0) {
    const std::vector<float> xd = mixprec::split_even_odd(xp, rows, cols, 32);  // cols % 32 == 0: no padding
    constexpr int64_t kTileRows = 32;  // as above: every row of x against a tile of weight rows in cache
    for (int64_t tile = begin; tile < end; tile += kTileRows) {
      const int64_t tile_end = std::min(end, tile + kTileRows);
      int64_t m = 0;
      for (; m + 2 <= rows; m += 2)
        linear_block_avx2<2>(xd.data() + m * cols, cols, packed, scale, group, bias, outs, tile, tile_end,
                             yp + m * outs);
      if (m < rows)
        linear_block_avx2<1>(xd.data() + m * cols, cols, packed, scale, group, bias, outs, tile, tile_end,
                             yp + m * outs);
    }
    return;
  }
#endif
  const int64_t groups = cols / group;
  std::vector<float> srow(groups), wrow(cols);
  for (int64_t n = begin; n < end; ++n) {
    mixprec::halves_to_floats(scale + n * groups, srow.data(), groups);
    dequantize_scalar(packed + n * (cols / 2), srow.data(), group, 0, cols, wrow.data());
    for (int64_t m = 0; m < rows; ++m) {
      const float* xrow = xp + m * cols;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < cols; ++k) sum += xrow[k] * wrow[k];
      yp[m * outs + n] = sum + (bias != nullptr ? bias[n] : 0.0f);
    }
  }
}

// Int4 weight-only linear for few rows: the codes of each weight row are unpacked in
// registers (a 16-entry table lookup, pre-scaled per group; one row of x: linear_one_row) and
// multiplied into all M rows of x, so the weight is read at 0.5 byte per element. Float32 sums with fused
// multiply-adds in a vectorized order: results differ from a float32 matmul of the
// dequantized weight by rounding only.
at::Tensor w4_linear_rows(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous float32 CPU matrix [M, K]");
  const int64_t rows = x.size(0), cols = x.size(1), outs = packed.size(0);
  mixprec::check_w4_layout(packed, scale, cols, 2);
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->numel() == outs && bias->scalar_type() == at::kFloat && bias->is_contiguous()),
              "bias must be contiguous float32 [N]");
  auto y = at::empty({rows, outs}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t group = cols / scale.size(1);
  mixprec::split_rows(outs, outs * cols,
                      [&](int64_t b, int64_t e) { linear_rows(xp, rows, cols, pp, sp, group, bp, outs, b, e, yp); });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("w4_dequantize_rows(Tensor packed, Tensor scale, int begin, Tensor(a!) out) -> ()");
  m.def("w4_linear_rows(Tensor x, Tensor packed, Tensor scale, Tensor? bias) -> Tensor");
}

// CPU kernels under the CPU dispatch key (not a catch-all), so torch.compile can pair each with
// its shape-only implementation (mixprec/kernels/fake_ops.py).
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("w4_dequantize_rows", &w4_dequantize_rows);
  m.impl("w4_linear_rows", &w4_linear_rows);
}
