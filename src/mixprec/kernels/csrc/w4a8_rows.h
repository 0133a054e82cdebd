// The few-row path of the int4 x int8 linear (w4a8_gemm.cpp): lanes along k instead of along
// output channels, so the packed int4 codes are read straight from memory, 64 bytes (128 codes)
// per load, with no unpacked copy of the weight. Decoding (one row of x) streams the weight once
// at close to the memory's bandwidth.
//
// Same arithmetic as the many-row path, bit for bit: each group's integer dot product D is exact
// (any order of integer additions gives it), and the float32 steps are the same operations in the
// same order: sum = fma(float(D_g + offset_g), s_g, sum) for increasing g, then fma(sum, sx, bias).
//
// Layout of one step: a 64-byte load of a weight row holds codes k0 .. k0 + 127 (element 2i in the
// low nibble of byte i). XOR 0x88 makes each nibble u = q + 8; the low nibbles are the even
// elements, the high nibbles the odd ones. The x row is re-laid out per 128 codes as its 64 even
// then 64 odd codes, so vpdpbusd(lo, x_even) + vpdpbusd(hi, x_odd) leaves in 32-bit lane L the sum
// over elements k0 + 8L .. k0 + 8L + 7; lanes 4j .. 4j + 3 are the 32 elements of quad j. Sixteen
// weight rows are done at once and their quad sums moved by a permute network into four vectors
// whose lane r is row r's quad j, so the per-group float steps run with lanes along output rows.
// The weight is streamed in order (each block of 16 rows front to back) into per-chunk partial
// sums, which the permute network then reads back from cache.
#pragma once

#include <ATen/ATen.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace mixprec::w4a8_rows {

// Weight rows per block (the lanes of the float sums).
constexpr int64_t kRows = 16;
// Codes per 64-byte load of a weight row.
constexpr int64_t kChunk = 128;

// Whether the few-row path takes a layer: groups of whole 32-code quads (a last chunk of fewer than
// 128 codes is read with a masked load; its missing codes meet zero activations).
inline bool supports(int64_t cols, int64_t group) { return cols % 32 == 0 && group % 32 == 0; }

// Chunks of 128 codes covering a row of cols codes (the last one possibly partial).
inline int64_t chunks_of(int64_t cols) { return (cols + kChunk - 1) / kChunk; }

inline __m512i lane_indices(const int32_t (&values)[16]) {
  return _mm512_loadu_si512(values);
}

// Sums of adjacent lane pairs of a (lanes 0-7) and of b (lanes 8-15).
inline __m512i pair_sums(__m512i a, __m512i b) {
  static const int32_t even[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  static const int32_t odd[16] = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  return _mm512_add_epi32(_mm512_permutex2var_epi32(a, lane_indices(even), b),
                          _mm512_permutex2var_epi32(a, lane_indices(odd), b));
}

// acc[r] lanes 4j .. 4j + 3 (r < 16, j < 4) summed into quads[j] lane r.
inline void quad_sums(const __m512i (&acc)[kRows], __m512i (&quads)[4]) {
  __m512i pairs[8], fours[4];
  for (int i = 0; i < 8; ++i) pairs[i] = pair_sums(acc[2 * i], acc[2 * i + 1]);
  // fours[i] lane 4 * rr + j: quad j of row 4i + rr.
  for (int i = 0; i < 4; ++i) fours[i] = pair_sums(pairs[2 * i], pairs[2 * i + 1]);
  // half[p][h] lane 8 * j' + 4 * i' + rr: quad 2h + j' of row 4 * (2p + i') + rr.
  static const int32_t gather_half[2][16] = {
      {0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29},
      {2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31}};
  static const int32_t gather_quad[2][16] = {
      {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
      {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}};
  for (int h = 0; h < 2; ++h) {
    const __m512i first = _mm512_permutex2var_epi32(fours[0], lane_indices(gather_half[h]), fours[1]);
    const __m512i second = _mm512_permutex2var_epi32(fours[2], lane_indices(gather_half[h]), fours[3]);
    for (int j = 0; j < 2; ++j)
      quads[2 * h + j] = _mm512_permutex2var_epi32(first, lane_indices(gather_quad[j]), second);
  }
}

// Transposes a 16 x 16 float32 tile held as 16 row vectors: swaps the off-diagonal blocks of
// sizes 8, 4, 2 and 1 in turn (keep: the lanes of row i, take: those of row i + b).
inline void transpose16(__m512 (&v)[16]) {
  static const int32_t keep[4][16] = {
      {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
      {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
      {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
      {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}};
  static const int32_t take[4][16] = {
      {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
      {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
      {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
      {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}};
  for (int level = 0, b = 8; level < 4; ++level, b /= 2) {
    const __m512i keep_idx = lane_indices(keep[level]), take_idx = lane_indices(take[level]);
    for (int i = 0; i < 16; ++i) {
      if (i & b) continue;
      const __m512 upper = _mm512_permutex2var_ps(v[i], keep_idx, v[i + b]);
      const __m512 lower = _mm512_permutex2var_ps(v[i], take_idx, v[i + b]);
      v[i] = upper;
      v[i + b] = lower;
    }
  }
}

// Scales of weight rows [n0, n0 + count) (count <= 16) as float32 [groups][16]; lanes of missing
// rows are 0.
inline void block_scales(const at::Half* scale, int64_t groups, int64_t n0, int64_t count, float* out) {
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int64_t width = std::min<int64_t>(16, groups - g0);
    const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1u);
    __m512 tile[16];
    for (int64_t r = 0; r < 16; ++r)
      tile[r] = r < count ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, scale + (n0 + r) * groups + g0))
                          : _mm512_setzero_ps();
    transpose16(tile);
    for (int64_t g = 0; g < width; ++g) _mm512_storeu_ps(out + (g0 + g) * kRows, tile[g]);
  }
}

// Phase 1 of a block: the 16-lane partial sums of weight rows n0 .. n0 + count - 1 against every
// row of x, partial[(m * chunks + c) * 16 + r] for x row m, 128-code chunk c and weight row r. Each
// weight row is read once, front to back (the block of 16 rows is one contiguous stream). x_split:
// the int8 rows of x from mixprec::split_even_odd with chunk kChunk.
inline void block_partials(const int8_t* x_split, int64_t rows, int64_t cols, const uint8_t* packed, int64_t n0,
                           int64_t count, __m512i* partial) {
  const int64_t row_bytes = cols / 2, chunks = chunks_of(cols), stride = chunks * kChunk;
  const int64_t tail_bytes = row_bytes - (chunks - 1) * kChunk / 2;  // 16 to 64
  const __mmask64 tail = tail_bytes == 64 ? ~__mmask64{0} : (__mmask64{1} << tail_bytes) - 1;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x88)), nibble = _mm512_set1_epi8(0x0F);
  for (int64_t r = 0; r < count; ++r) {
    const uint8_t* row = packed + (n0 + r) * row_bytes;
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512i bytes = c + 1 < chunks ? _mm512_loadu_si512(row + c * kChunk / 2)
                                           : _mm512_maskz_loadu_epi8(tail, row + c * kChunk / 2);
      const __m512i codes = _mm512_xor_si512(bytes, flip);
      const __m512i low = _mm512_and_si512(codes, nibble);
      const __m512i high = _mm512_and_si512(_mm512_srli_epi16(codes, 4), nibble);
      for (int64_t m = 0; m < rows; ++m) {
        const int8_t* x = x_split + m * stride + c * kChunk;
        partial[(m * chunks + c) * kRows + r] = _mm512_dpbusd_epi32(
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, _mm512_loadu_si512(x)), high,
            _mm512_loadu_si512(x + kChunk / 2));
      }
    }
  }
  for (int64_t r = count; r < kRows; ++r)
    for (int64_t mc = 0; mc < rows * chunks; ++mc) partial[mc * kRows + r] = _mm512_setzero_si512();
}

// Phase 2 for one x row: y[n0 + r] (r < count) from its partial sums (block_partials, chunks in
// order). offsets: the row's -8 * (sum of its codes) per group; block_scale from block_scales.
inline void block_outputs(const __m512i* partial, const int32_t* offsets, float x_scale, int64_t cols,
                          int64_t group, const float* block_scale, const float* bias, int64_t n0, int64_t count,
                          float* y_row) {
  const int64_t quads_per_group = group / 32;
  __m512 sum = _mm512_setzero_ps();
  __m512i group_dot = _mm512_setzero_si512();
  int64_t quad = 0;
  const int64_t quads_total = cols / 32;
  for (int64_t c = 0; c < chunks_of(cols); ++c) {
    __m512i acc[kRows], quads[4];
    for (int64_t r = 0; r < kRows; ++r) acc[r] = partial[c * kRows + r];
    quad_sums(acc, quads);
    for (int j = 0; j < 4 && quad < quads_total; ++j, ++quad) {
      group_dot = _mm512_add_epi32(group_dot, quads[j]);
      if ((quad + 1) % quads_per_group != 0) continue;
      const int64_t g = quad / quads_per_group;
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(group_dot, _mm512_set1_epi32(offsets[g])));
      sum = _mm512_fmadd_ps(dot, _mm512_loadu_ps(block_scale + g * kRows), sum);
      group_dot = _mm512_setzero_si512();
    }
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1u);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
  _mm512_mask_storeu_ps(y_row + n0, mask, _mm512_fmadd_ps(sum, _mm512_set1_ps(x_scale), b));
}

}  // namespace mixprec::w4a8_rows
