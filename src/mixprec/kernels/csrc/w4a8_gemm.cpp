// Int4 weights times dynamically quantized int8 activations: the many-row path of w4gN.
//
// y[m, n] = sx[m] * sum_g s[n, g] * D[m, n, g] + bias[n], where D[m, n, g] is the exact
// integer dot product of the int8 activation codes xq[m, k] and the int4 weight codes
// q[n, k] over group g (k in [g * G, (g + 1) * G)). Rounding, in this order: each D is
// exact (int32, |D| <= 8 * 127 * G); float(D) is exact for G < 16384; the group terms are
// summed in float32 in increasing g with one rounding per term (fused multiply-add); then
// y = fma(sum, sx[m], bias[n]), one rounding.
//
// VNNI's vpdpbusd multiplies unsigned by signed bytes, so the weights enter as the unsigned
// codes u = q + 8 in [0, 15] (the two's complement nibble XOR 8) and the activations as
// signed codes; sum u * xq = D + 8 * sum xq, so each group's accumulator starts at
// -8 * sum_{k in g} xq[m, k]. Lanes run along output channels: a block of 32 channels is
// unpacked once into [K/4][32][4] bytes (4 consecutive k of one channel per 32-bit lane)
// and reused by every row of x; each 4-byte quad of an x row is broadcast.
//
// The blocked layout (w4a8_linear_blocked; what W4A8Linear holds when G % 8 == 0): codes of 32
// channels x 8 consecutive k per 128 bytes, [N'/32][K/8][32][4] bytes with N' = N rounded up to 32
// (missing channels: code 0, scale 0); byte j of the lane of channel n and octet o holds code
// k = 8o + j in its low nibble and k = 8o + 4 + j in its high nibble (two's complement nibbles), and
// the scales are [N'/32][K/G][32] float16. Each 32-channel block is one contiguous stream that the
// kernel splits into low and high nibbles in registers (no unpacked copy), the block's scales widened to
// float32 in one burst before its codes (widen_block_scales), so one row of x (decoding) reads the weight
// once at the memory's speed; the integer group sums and the float32 steps are the ones above, so both
// layouts give the same bits.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "half_floats.h"
#include "split_rows.h"
#include "w4_layout.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

#define MIXPREC_W4A8 1
#else
#define MIXPREC_W4A8 0
#endif
// Without VNNI, AVX2 (with FMA and F16C) runs the blocked layout's kernel (blocked_rows_avx2).
#if !MIXPREC_W4A8 && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#define MIXPREC_W4A8_BLOCKED_AVX2 1
#else
#define MIXPREC_W4A8_BLOCKED_AVX2 0
#endif

namespace {

// Output channels per unpacked block: two vectors of 16 int32 lanes.
constexpr int64_t kBlock = 32;

#if MIXPREC_W4A8
// How far ahead of its loads blocked_rows asks for the codes (prefetcht0, bytes of the block stream: four octet
// lines). Decoding from DRAM the hardware prefetchers bring the stream towards the core but not into L1 soon
// enough: one 324 MB weight read 1.065x faster so while a 1 GiB sum read 52-60 GB/s (256 bytes 1.054x; 640 and
// more slower), the 1.17B decode step 1.031x in the median paired round; from the L3 and for many rows no change
// (BENCHMARKS.md, "The w4a8 codes prefetched into L1").
constexpr int64_t kCodePrefetchBytes = 512;
#endif

// The activation operands of both layouts: int8 codes xq [M, K] and one float32 scale per row.
void check_activations(const at::Tensor& xq, const at::Tensor& x_scale) {
  TORCH_CHECK(xq.dim() == 2 && xq.scalar_type() == at::kChar && xq.is_contiguous() && xq.device().is_cpu(),
              "xq must be a contiguous int8 CPU matrix [M, K]");
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.is_contiguous() && x_scale.numel() == xq.size(0) &&
                  x_scale.device().is_cpu(),
              "x_scale must hold one float32 per row of xq");
}

void check_inputs(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& packed, const at::Tensor& scale,
                  const c10::optional<at::Tensor>& bias) {
  check_activations(xq, x_scale);
  const int64_t cols = xq.size(1);
  mixprec::check_w4_layout(packed, scale, cols, 4);
  TORCH_CHECK(cols / scale.size(1) < 16384, "group size must be below 16384");
  TORCH_CHECK(!bias.has_value() || !bias->defined() ||
                  (bias->numel() == packed.size(0) && bias->scalar_type() == at::kFloat && bias->is_contiguous()),
              "bias must be contiguous float32 [N]");
}

#if MIXPREC_W4A8 || MIXPREC_W4A8_BLOCKED_AVX2
// -8 * sum of each group of G codes of each row: the accumulators' starting values.
std::vector<int32_t> group_offsets(const int8_t* xq, int64_t rows, int64_t cols, int64_t group) {
  const int64_t groups = cols / group;
  std::vector<int32_t> offsets(rows * groups);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* codes = xq + m * cols + g * group;
      int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < group; ++k) sum += codes[k];
      offsets[m * groups + g] = -8 * sum;
    }
  return offsets;
}

// Block b's float16 scales ([groups][32]) widened exactly to float32 into widened, before the block's codes are
// read: the scales arrive in one burst of loads instead of a line every few hundred bytes of codes. A second
// stream trickling beside the codes was measured here to cost about a fifth of the DRAM read rate whenever the
// rate is high (sum of a 1 GiB array 60-67 GB/s: 50-54 GB/s with the trickle, 62-63 with the burst).
void widen_block_scales(const at::Half* scale, int64_t groups, int64_t b, float* widened) {
  mixprec::halves_to_floats(scale + b * groups * kBlock, widened, groups * kBlock);
}
#endif

#if MIXPREC_W4A8
// The four unsigned codes u = q + 8 of elements k..k+3 from the two packed bytes holding
// them (element 2i in the low nibble of byte i), as the bytes of one 32-bit lane: each
// 16-bit word [b, b] becomes [b & 15, b >> 4], after XOR 0x88 turned nibbles into q + 8.
inline __m512i spread_nibbles(__m512i words_doubled) {
  const __m512i low = _mm512_and_si512(words_doubled, _mm512_set1_epi16(0x000F));
  const __m512i high = _mm512_and_si512(_mm512_srli_epi16(words_doubled, 4), _mm512_set1_epi16(0x0F00));
  return _mm512_or_si512(low, high);
}

// Unpacks channels [n0, n0 + count) (count <= 32) into block ([K/4][32][4] bytes, lanes of
// missing channels zero) and their scales into block_scale ([groups][32] float32).
void unpack_block(const uint8_t* packed, const at::Half* scale, int64_t cols, int64_t groups, int64_t n0,
                  int64_t count, uint8_t* block, float* block_scale) {
  const int64_t row_bytes = cols / 2;
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i offsets = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(row_bytes)));
  // Within each 128-bit lane, dword i takes bytes [4i, 4i, 4i+1, 4i+1] (first quad) or
  // [4i+2, 4i+2, 4i+3, 4i+3] (second quad) of the gathered dword.
  const __m512i first = _mm512_set4_epi32(0x0D0D0C0C, 0x09090808, 0x05050404, 0x01010000);
  const __m512i second = _mm512_set4_epi32(0x0F0F0E0E, 0x0B0B0A0A, 0x07070606, 0x03030202);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x88));
  for (int64_t half = 0; half < 2; ++half) {
    const int64_t lane0 = half * 16;
    const int64_t present = std::clamp<int64_t>(count - lane0, 0, 16);
    const __mmask16 mask = static_cast<__mmask16>((1u << present) - 1u);
    const uint8_t* base = packed + (n0 + lane0) * row_bytes;
    int64_t k = 0;
    for (; k + 8 <= cols; k += 8) {
      const __m512i bytes = _mm512_xor_si512(
          flip, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, offsets, base + k / 2, 1));
      _mm512_storeu_si512(block + ((k / 4) * kBlock + lane0) * 4, spread_nibbles(_mm512_shuffle_epi8(bytes, first)));
      _mm512_storeu_si512(block + ((k / 4 + 1) * kBlock + lane0) * 4,
                          spread_nibbles(_mm512_shuffle_epi8(bytes, second)));
    }
    for (; k < cols; k += 4) {  // a last quad when K % 8 == 4
      uint8_t* lane_bytes = block + ((k / 4) * kBlock + lane0) * 4;
      std::memset(lane_bytes, 0, 16 * 4);
      for (int64_t j = 0; j < present; ++j)
        for (int64_t e = 0; e < 4; ++e) {
          const uint8_t byte = base[j * row_bytes + (k + e) / 2] ^ 0x88;
          lane_bytes[j * 4 + e] = (e % 2 == 0) ? (byte & 0x0F) : (byte >> 4);
        }
    }
  }
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t j = 0; j < kBlock; ++j)
      block_scale[g * kBlock + j] = j < count ? static_cast<float>(scale[(n0 + j) * groups + g]) : 0.0f;
}

inline __m512i broadcast_quad(const int8_t* codes) {
  int32_t quad;
  std::memcpy(&quad, codes, sizeof(quad));
  return _mm512_set1_epi32(quad);
}

// y[m, n0 + j] = fma(sum, sx[m], bias[n0 + j]) for the count (<= 32) present channels of a block.
template <int Rows>
void store_outputs(const __m512 (&sum)[Rows][2], const float* x_scale, const float* bias, int64_t n0, int64_t count,
                   int64_t outs, float* y) {
  const int64_t present0 = std::min<int64_t>(count, 16), present1 = std::max<int64_t>(count - 16, 0);
  const __mmask16 mask0 = static_cast<__mmask16>((1u << present0) - 1u);
  const __mmask16 mask1 = static_cast<__mmask16>((1u << present1) - 1u);
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(mask0, bias + n0) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(mask1, bias + n0 + 16) : _mm512_setzero_ps();
  for (int m = 0; m < Rows; ++m) {
    const __m512 sx = _mm512_set1_ps(x_scale[m]);
    _mm512_mask_storeu_ps(y + m * outs + n0, mask0, _mm512_fmadd_ps(sum[m][0], sx, b0));
    _mm512_mask_storeu_ps(y + m * outs + n0 + 16, mask1, _mm512_fmadd_ps(sum[m][1], sx, b1));
  }
}

// Calls run(std::integral_constant<int, R>{}, m) over the rows of x in groups of R = 6 (the last 1 to 5).
template <typename Run>
void for_row_groups(int64_t rows, const Run& run) {
  int64_t m = 0;
  for (; m + 6 <= rows; m += 6) run(std::integral_constant<int, 6>{}, m);
  switch (rows - m) {
    case 5: run(std::integral_constant<int, 5>{}, m); break;
    case 4: run(std::integral_constant<int, 4>{}, m); break;
    case 3: run(std::integral_constant<int, 3>{}, m); break;
    case 2: run(std::integral_constant<int, 2>{}, m); break;
    case 1: run(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

// Rows rows of x against one unpacked block of 32 channels; writes y[m, n0 + j], j < count.
template <int Rows>
void block_rows(const int8_t* xq, const int32_t* offsets, const float* x_scale, int64_t cols, int64_t group,
                const uint8_t* block, const float* block_scale, const float* bias, int64_t n0, int64_t count,
                int64_t outs, float* y) {
  const int64_t groups = cols / group, quads_per_group = group / 4;
  __m512 sum[Rows][2];
  for (auto& row : sum) row[0] = row[1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[Rows][2];
    for (int m = 0; m < Rows; ++m) acc[m][0] = acc[m][1] = _mm512_set1_epi32(offsets[m * groups + g]);
    const uint8_t* wq = block + g * quads_per_group * kBlock * 4;
    const int8_t* xg = xq + g * group;
    for (int64_t q = 0; q < quads_per_group; ++q) {
      const __m512i w0 = _mm512_loadu_si512(wq + q * kBlock * 4);
      const __m512i w1 = _mm512_loadu_si512(wq + q * kBlock * 4 + 64);
      for (int m = 0; m < Rows; ++m) {
        const __m512i xb = broadcast_quad(xg + m * cols + q * 4);
        acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], w0, xb);
        acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], w1, xb);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(block_scale + g * kBlock);
    const __m512 s1 = _mm512_loadu_ps(block_scale + g * kBlock + 16);
    for (int m = 0; m < Rows; ++m) {
      sum[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][0]), s0, sum[m][0]);
      sum[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][1]), s1, sum[m][1]);
    }
  }
  store_outputs<Rows>(sum, x_scale, bias, n0, count, outs, y);
}

// All rows of x against output blocks [block_begin, block_end).
void linear_blocks(const int8_t* xq, const int32_t* offsets, const float* x_scale, int64_t rows, int64_t cols,
                   const uint8_t* packed, const at::Half* scale, int64_t groups, const float* bias, int64_t outs,
                   int64_t block_begin, int64_t block_end, float* y) {
  const int64_t group = cols / groups;
  std::vector<uint8_t> block(cols * kBlock);
  std::vector<float> block_scale(groups * kBlock);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t n0 = b * kBlock, count = std::min(kBlock, outs - n0);
    unpack_block(packed, scale, cols, groups, n0, count, block.data(), block_scale.data());
    const auto run = [&](auto rows_tag, int64_t m) {
      constexpr int Rows = decltype(rows_tag)::value;
      block_rows<Rows>(xq + m * cols, offsets + m * groups, x_scale + m, cols, group, block.data(),
                       block_scale.data(), bias, n0, count, outs, y + m * outs);
    };
    for_row_groups(rows, run);
  }
}

// Rows rows of x against block b of the blocked layout (see the top of this file); writes
// y[m, 32b + j] for the present channels. The float32 steps are block_rows's.
template <int Rows>
void blocked_rows(const int8_t* xq, const int32_t* offsets, const float* x_scale, int64_t cols, int64_t group,
                  const uint8_t* codes, const float* block_scale, const float* bias, int64_t b, int64_t outs,
                  float* y) {
  const int64_t groups = cols / group, octets_per_group = group / 8;
  const uint8_t* block = codes + b * (cols / 8) * kBlock * 4;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x88)), nibble = _mm512_set1_epi8(0x0F);
  __m512 sum[Rows][2];
  for (auto& row : sum) row[0] = row[1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[Rows][2];
    for (int m = 0; m < Rows; ++m) acc[m][0] = acc[m][1] = _mm512_set1_epi32(offsets[m * groups + g]);
    const uint8_t* wg = block + g * octets_per_group * kBlock * 4;
    const int8_t* xg = xq + g * group;
    for (int64_t o = 0; o < octets_per_group; ++o) {
      const char* ahead = reinterpret_cast<const char*>(wg + o * kBlock * 4 + kCodePrefetchBytes);
      _mm_prefetch(ahead, _MM_HINT_T0);  // never faults, past the end of the codes too
      _mm_prefetch(ahead + 64, _MM_HINT_T0);
      const __m512i v0 = _mm512_xor_si512(_mm512_loadu_si512(wg + o * kBlock * 4), flip);
      const __m512i v1 = _mm512_xor_si512(_mm512_loadu_si512(wg + o * kBlock * 4 + 64), flip);
      const __m512i low0 = _mm512_and_si512(v0, nibble), high0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), nibble);
      const __m512i low1 = _mm512_and_si512(v1, nibble), high1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), nibble);
      for (int m = 0; m < Rows; ++m) {
        const __m512i xa = broadcast_quad(xg + m * cols + o * 8), xb = broadcast_quad(xg + m * cols + o * 8 + 4);
        acc[m][0] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[m][0], low0, xa), high0, xb);
        acc[m][1] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[m][1], low1, xa), high1, xb);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(block_scale + g * kBlock);
    const __m512 s1 = _mm512_loadu_ps(block_scale + g * kBlock + 16);
    for (int m = 0; m < Rows; ++m) {
      sum[m][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][0]), s0, sum[m][0]);
      sum[m][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][1]), s1, sum[m][1]);
    }
  }
  const int64_t n0 = b * kBlock, count = std::min(kBlock, outs - n0);
  store_outputs<Rows>(sum, x_scale, bias, n0, count, outs, y);
}

// Every row of x against blocked-layout blocks [block_begin, block_end), six rows at a time (each
// block's 16K bytes stay in cache across the row groups).
void blocked_blocks(const int8_t* xq, const int32_t* offsets, const float* x_scale, int64_t rows, int64_t cols,
                    int64_t group, const uint8_t* codes, const at::Half* scale, const float* bias, int64_t outs,
                    int64_t block_begin, int64_t block_end, float* y) {
  const int64_t groups = cols / group;
  std::vector<float> block_scale(groups * kBlock);
  for (int64_t b = block_begin; b < block_end; ++b) {
    widen_block_scales(scale, groups, b, block_scale.data());
    const auto run = [&](auto rows_tag, int64_t m) {
      constexpr int Rows = decltype(rows_tag)::value;
      blocked_rows<Rows>(xq + m * cols, offsets + m * groups, x_scale + m, cols, group, codes, block_scale.data(),
                         bias, b, outs, y + m * outs);
    };
    for_row_groups(rows, run);
  }
}
#endif

#if MIXPREC_W4A8_BLOCKED_AVX2
// blocked_rows without VNNI, for Rows (1 or 2) rows of x: each 32-channel octet line (128 bytes) is
// four vectors of 8 lanes; vpdpbusd's four products per lane become vpmaddubsw of the unsigned low
// nibbles with the first quad of x and of the high ones with the second (u8 x s8 pairs into int16:
// at most 2 * 15 * 128 = 3840, no saturation), their int16 sum (at most 7680), then vpmaddwd with
// ones into the int32 lanes. The same exact group sums and the same float32 steps as blocked_rows
// (fma per group in increasing g, then fma(sum, sx, bias)): the same bits.
template <int Rows>
void blocked_rows_avx2(const int8_t* xq, const int32_t* offsets, const float* x_scale, int64_t cols, int64_t group,
                       const uint8_t* codes, const float* block_scale, const float* bias, int64_t b, int64_t outs,
                       float* y) {
  const int64_t groups = cols / group, octets_per_group = group / 8;
  const uint8_t* block = codes + b * (cols / 8) * kBlock * 4;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x88)), nibble = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 sum[Rows][4];
  for (auto& row : sum)
    for (auto& v : row) v = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[Rows][4];
    for (int m = 0; m < Rows; ++m)
      for (auto& v : acc[m]) v = _mm256_set1_epi32(offsets[m * groups + g]);
    const uint8_t* wg = block + g * octets_per_group * kBlock * 4;
    const int8_t* xg = xq + g * group;
    for (int64_t o = 0; o < octets_per_group; ++o) {
      __m256i xa[Rows], xb[Rows];
      for (int m = 0; m < Rows; ++m) {
        int32_t quads[2];
        std::memcpy(quads, xg + m * cols + o * 8, sizeof(quads));
        xa[m] = _mm256_set1_epi32(quads[0]);
        xb[m] = _mm256_set1_epi32(quads[1]);
      }
      for (int v = 0; v < 4; ++v) {
        const __m256i w = _mm256_xor_si256(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + o * kBlock * 4 + 32 * v)), flip);
        const __m256i low = _mm256_and_si256(w, nibble), high = _mm256_and_si256(_mm256_srli_epi16(w, 4), nibble);
        for (int m = 0; m < Rows; ++m) {
          const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, xa[m]), _mm256_maddubs_epi16(high, xb[m]));
          acc[m][v] = _mm256_add_epi32(acc[m][v], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int v = 0; v < 4; ++v) {
      const __m256 s = _mm256_loadu_ps(block_scale + g * kBlock + 8 * v);
      for (int m = 0; m < Rows; ++m) sum[m][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][v]), s, sum[m][v]);
    }
  }
  const int64_t n0 = b * kBlock, count = std::min(kBlock, outs - n0);
  float lanes[kBlock] = {}, out[kBlock];
  if (bias != nullptr) std::copy(bias + n0, bias + n0 + count, lanes);
  for (int m = 0; m < Rows; ++m) {
    const __m256 sx = _mm256_set1_ps(x_scale[m]);
    for (int v = 0; v < 4; ++v)
      _mm256_storeu_ps(out + 8 * v, _mm256_fmadd_ps(sum[m][v], sx, _mm256_loadu_ps(lanes + 8 * v)));
    std::copy(out, out + count, y + m * outs + n0);
  }
}

// Every row of x against blocked-layout blocks [block_begin, block_end), two rows at a time.
void blocked_blocks_avx2(const int8_t* xq, const int32_t* offsets, const float* x_scale, int64_t rows, int64_t cols,
                         int64_t group, const uint8_t* codes, const at::Half* scale, const float* bias, int64_t outs,
                         int64_t block_begin, int64_t block_end, float* y) {
  const int64_t groups = cols / group;
  std::vector<float> block_scale(groups * kBlock);
  for (int64_t b = block_begin; b < block_end; ++b) {
    widen_block_scales(scale, groups, b, block_scale.data());
    int64_t m = 0;
    for (; m + 2 <= rows; m += 2)
      blocked_rows_avx2<2>(xq + m * cols, offsets + m * groups, x_scale + m, cols, group, codes, block_scale.data(),
                           bias, b, outs, y + m * outs);
    if (m < rows)
      blocked_rows_avx2<1>(xq + m * cols, offsets + m * groups, x_scale + m, cols, group, codes, block_scale.data(),
                           bias, b, outs, y + m * outs);
  }
}
#endif

// Whether this build has the VNNI kernel (AVX512-VNNI and AVX512-BW at compile time).
bool w4a8_available() { return MIXPREC_W4A8 == 1; }

// Whether this build runs the blocked layout natively: the VNNI kernel, or AVX2's.
bool w4a8_blocked_available() { return MIXPREC_W4A8 == 1 || MIXPREC_W4A8_BLOCKED_AVX2 == 1; }

at::Tensor w4a8_linear(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& packed,
                       const at::Tensor& scale, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w4a8_available(), "this build of the mixprec kernels has no AVX512-VNNI int4 x int8 kernel");
  check_inputs(xq, x_scale, packed, scale, bias);
  const int64_t rows = xq.size(0), cols = xq.size(1), outs = packed.size(0), groups = scale.size(1);
  auto y = at::empty({rows, outs}, x_scale.options());
#if MIXPREC_W4A8
  const int8_t* xp = xq.data_ptr<int8_t>();
  const std::vector<int32_t> offsets = group_offsets(xp, rows, cols, cols / groups);
  const float* bp = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  const int64_t blocks = (outs + kBlock - 1) / kBlock;
  // Work: unpacking every weight once per call, plus the multiply (16 multiply-adds cost
  // about one unpacked weight).
  mixprec::split_rows(blocks, outs * cols + rows * outs * cols / 16, [&](int64_t b, int64_t e) {
    linear_blocks(xp, offsets.data(), x_scale.data_ptr<float>(), rows, cols, packed.data_ptr<uint8_t>(),
                  scale.data_ptr<at::Half>(), groups, bp, outs, b, e, y.data_ptr<float>());
  });
#endif
  return y;
}

// Checks one blocked-layout weight (codes [N'/32][K/8][32][4] uint8, scale [N'/32][K/G][32] float16, G a multiple
// of 8 below 16384, bias float32 [N] or none) against K = cols; returns its bias pointer (nullptr: none).
const float* check_blocked_weight(const at::Tensor& codes, const at::Tensor& scale, int64_t out_features,
                                  const c10::optional<at::Tensor>& bias, int64_t cols) {
  const int64_t blocks = (out_features + kBlock - 1) / kBlock;
  TORCH_CHECK(out_features >= 1 && codes.dim() == 4 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.device().is_cpu() && codes.size(0) == blocks && codes.size(1) * 8 == cols &&
                  codes.size(2) == kBlock && codes.size(3) == 4,
              "codes must be a contiguous uint8 CPU tensor [ceil(N/32), K/8, 32, 4] for N = ", out_features,
              " and K = ", cols, ", got ", codes.sizes());
  TORCH_CHECK(scale.dim() == 3 && scale.scalar_type() == at::kHalf && scale.is_contiguous() &&
                  scale.device().is_cpu() && scale.size(0) == blocks && scale.size(2) == kBlock &&
                  scale.size(1) > 0 && cols % (8 * scale.size(1)) == 0 && cols / scale.size(1) < 16384,
              "scale must be a contiguous float16 CPU tensor [ceil(N/32), K/G, 32] with a group size G divisible by "
              "8 and below 16384, got ", scale.sizes());
  TORCH_CHECK(!bias.has_value() || !bias->defined() ||
                  (bias->numel() == out_features && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                   bias->device().is_cpu()),
              "bias must be contiguous float32 [N], a CPU tensor");
  return bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
}

// The same rows of x against several blocked-layout weights of one K and one group size G, in one parallel region:
// their 32-channel blocks taken as one sequence (the first weight's, then the next one's) and split over the threads
// in contiguous ranges, so that, decoding, each thread streams one run of bytes across the weights and the threads
// meet once. Each output gets exactly the bits w4a8_linear_blocked gives (the same per-block arithmetic).
std::vector<at::Tensor> w4a8_linear_blocked_many(const at::Tensor& xq, const at::Tensor& x_scale,
                                                 at::TensorList codes, at::TensorList scales,
                                                 at::IntArrayRef out_features,
                                                 const c10::List<c10::optional<at::Tensor>>& biases) {
  TORCH_CHECK(w4a8_blocked_available(),
              "this build of the mixprec kernels has no AVX512-VNNI or AVX2 int4 x int8 kernel");
  check_activations(xq, x_scale);
  const size_t count = codes.size();
  TORCH_CHECK(count >= 1 && scales.size() == count && out_features.size() == count && biases.size() == count,
              "codes, scales, out_features and biases must hold one entry per weight (at least one), got ",
              codes.size(), ", ", scales.size(), ", ", out_features.size(), " and ", biases.size());
  const int64_t rows = xq.size(0), cols = xq.size(1);
  std::vector<const float*> bias(count);
  std::vector<int64_t> first_block(count + 1, 0);  // weight i holds blocks [first_block[i], first_block[i + 1])
  int64_t weight_bytes = 0, work = 0;
  for (size_t i = 0; i < count; ++i) {
    bias[i] = check_blocked_weight(codes[i], scales[i], out_features[i], biases.get(i), cols);
    TORCH_CHECK(scales[i].size(1) == scales[0].size(1), "every weight must have the same group size: weight ", i,
                " has ", cols / scales[i].size(1), ", weight 0 ", cols / scales[0].size(1));
    first_block[i + 1] = first_block[i] + codes[i].size(0);
    weight_bytes += codes[i].numel() + 2 * scales[i].numel();
    work += out_features[i] * cols + rows * out_features[i] * cols / 16;
  }
  std::vector<at::Tensor> outputs;
  for (size_t i = 0; i < count; ++i) outputs.push_back(at::empty({rows, out_features[i]}, x_scale.options()));
#if MIXPREC_W4A8 || MIXPREC_W4A8_BLOCKED_AVX2
#if MIXPREC_W4A8
  const auto run_blocks = blocked_blocks;
#else
  const auto run_blocks = blocked_blocks_avx2;
#endif
  const int64_t group = cols / scales[0].size(1);
  const int8_t* xp = xq.data_ptr<int8_t>();
  const std::vector<int32_t> offsets = group_offsets(xp, rows, cols, group);
  // Work: each weight read once, plus the multiply (16 multiply-adds cost about one weight read); weights of
  // kStreamingParallelBytes or more in all are split over the threads however few the rows, their read being the
  // cost (the 1.17B shape's k and v, 288 KiB each: its decode step 1.02x in the median paired round).
  work = std::max(work, weight_bytes * (mixprec::kMinParallelWork / mixprec::kStreamingParallelBytes));
  mixprec::split_rows(first_block[count], work, [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < count; ++i) {
      const int64_t b = std::max(begin, first_block[i]) - first_block[i];
      const int64_t e = std::min(end, first_block[i + 1]) - first_block[i];
      if (b < e)
        run_blocks(xp, offsets.data(), x_scale.data_ptr<float>(), rows, cols, group, codes[i].data_ptr<uint8_t>(),
                   scales[i].data_ptr<at::Half>(), bias[i], out_features[i], b, e, outputs[i].data_ptr<float>());
    }
  });
#endif
  return outputs;
}

// The same linear on the blocked layout: codes [N'/32][K/8][32][4] uint8, scale [N'/32][K/G][32]
// float16, out_features = N (N' = N rounded up to 32), G a multiple of 8.
at::Tensor w4a8_linear_blocked(const at::Tensor& xq, const at::Tensor& x_scale, const at::Tensor& codes,
                               const at::Tensor& scale, int64_t out_features, const c10::optional<at::Tensor>& bias) {
  return w4a8_linear_blocked_many(xq, x_scale, codes, scale, {out_features},
                                  c10::List<c10::optional<at::Tensor>>({bias}))[0];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mixprec, m) {
  m.def("w4a8_available() -> bool", &w4a8_available);
  m.def("w4a8_blocked_available() -> bool", &w4a8_blocked_available);
  m.def("w4a8_linear(Tensor xq, Tensor x_scale, Tensor packed, Tensor scale, Tensor? bias) -> Tensor");
  m.def("w4a8_linear_blocked(Tensor xq, Tensor x_scale, Tensor codes, Tensor scale, int out_features, "
        "Tensor? bias) -> Tensor");
  m.def("w4a8_linear_blocked_many(Tensor xq, Tensor x_scale, Tensor[] codes, Tensor[] scales, int[] out_features, "
        "Tensor?[] biases) -> Tensor[]");
}

// CPU kernels under the CPU dispatch key (not a catch-all), so torch.compile can pair each with
// its shape-only implementation (mixprec/kernels/fake_ops.py).
TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("w4a8_linear", &w4a8_linear);
  m.impl("w4a8_linear_blocked", &w4a8_linear_blocked);
  m.impl("w4a8_linear_blocked_many", &w4a8_linear_blocked_many);
}
