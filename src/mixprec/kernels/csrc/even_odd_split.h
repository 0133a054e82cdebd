// Activations re-laid out to meet packed int4 codes without interleaving them: a byte of codes
// holds element 2i in its low nibble and 2i + 1 in its high nibble, so a kernel that splits a
// chunk of codes into low and high nibbles needs the chunk's even elements, then its odd ones.
#pragma once

#include <cstdint>
#include <vector>

namespace mixprec {

// Each row of x [rows, cols] re-laid out per `chunk` elements (even) as its chunk / 2 even then
// chunk / 2 odd elements; rows ceil(cols / chunk) * chunk elements apart, positions past a row's
// end 0 (cols even).
template <typename T>
std::vector<T> split_even_odd(const T* x, int64_t rows, int64_t cols, int64_t chunk) {
  const int64_t stride = (cols + chunk - 1) / chunk * chunk;
  std::vector<T> out(rows * stride, T{0});
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t k = 0; k < cols; k += 2) {
      const int64_t base = m * stride + k / chunk * chunk, i = (k % chunk) / 2;
      out[base + i] = x[m * cols + k];
      out[base + chunk / 2 + i] = x[m * cols + k + 1];
    }
  return out;
}

}  // namespace mixprec
