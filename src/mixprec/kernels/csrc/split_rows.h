// Row-range parallelism for the fused compute kernels, on PyTorch's own OpenMP threads
// (the extension is compiled with -fopenmp and shares the libgomp that PyTorch loaded).
// A thread of our own would compete with those threads, which keep spinning on the other
// core for a while after every PyTorch op: measured here, a w4a8 GEMM (128 x 4096 x 4096)
// started right after an F.linear took 13.6 ms on a std::thread pair and 7.0 ms on
// PyTorch's pool. Work below kMinParallelWork elements runs on the calling thread.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace mixprec {

// Elements of work below which one thread does everything.
constexpr int64_t kMinParallelWork = int64_t{1} << 22;

// Weight bytes from which a kernel that streams its weight once (few rows of x, memory-bound) splits it over the
// threads, however little arithmetic there is.
constexpr int64_t kStreamingParallelBytes = int64_t{1} << 18;

template <typename Body>
void split_rows(int64_t rows, int64_t work, const Body& body) {
  if (work < kMinParallelWork || rows < 2) {
    body(0, rows);
    return;
  }
  at::parallel_for(0, rows, 1, body);
}

// split_rows with the rows cut into kChunksPerThread chunks per thread, handed out as threads come free
// (OpenMP's dynamic schedule on the same pool): a thread slowed by another process on its core (measured
// here: a busy loop beside the DS-CNN took the static halves from 0.85x to 0.59x LiteRT's XNNPACK, whose
// pool balances the same way) leaves its share to the others. Bodies see contiguous ranges, in no order.
constexpr int64_t kChunksPerThread = 8;

template <typename Body>
void split_rows_balanced(int64_t rows, int64_t work, const Body& body) {
  const int64_t threads = at::get_num_threads();
  if (work < kMinParallelWork || rows < 2 || threads < 2 || at::in_parallel_region()) {
    body(0, rows);
    return;
  }
#ifdef _OPENMP
  const int64_t chunks = std::min(rows, threads * kChunksPerThread);
#pragma omp parallel for num_threads(static_cast<int>(threads)) schedule(dynamic, 1)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) body(rows * chunk / chunks, rows * (chunk + 1) / chunks);
#else
  at::parallel_for(0, rows, 1, body);
#endif
}

}  // namespace mixprec
