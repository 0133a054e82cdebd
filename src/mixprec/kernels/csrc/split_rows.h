// Row-range parallelism for the fused compute kernels, on PyTorch's own OpenMP threads
// (the extension is compiled with -fopenmp and shares the libgomp that PyTorch loaded).
// A thread of our own would compete with those threads, which keep spinning on the other
// core for a while after every PyTorch op: measured here, a w4a8 GEMM (128 x 4096 x 4096)
// started right after an F.linear took 13.6 ms on a std::thread pair and 7.0 ms on
// PyTorch's pool. Work below kMinParallelWork elements runs on the calling thread.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace mixprec {

// Elements of work below which one thread does everything.
constexpr int64_t kMinParallelWork = int64_t{1} << 22;

template <typename Body>
void split_rows(int64_t rows, int64_t work, const Body& body) {
  if (work < kMinParallelWork || rows < 2) {
    body(0, rows);
    return;
  }
  at::parallel_for(0, rows, 1, body);
}

}  // namespace mixprec
