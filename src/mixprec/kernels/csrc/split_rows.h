// Row-range parallelism for the fused kernels without an OpenMP runtime (linking one
// into the extension made these loops 3x slower here): the calling thread takes the
// first half of the rows and one std::thread the second, when the work is large enough
// to pay for starting a thread and PyTorch is allowed more than one thread. Measured
// here, a second thread for the int8 quantize/rescale loops (0.1-1 ms) made them 2-5x
// slower (PyTorch's OpenMP workers keep spinning on the other core after each op), so
// only the int4 kernels on weights of 2**22 elements or more use it.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <thread>

namespace mixprec {

// Elements of work below which one thread does everything.
constexpr int64_t kMinParallelWork = int64_t{1} << 22;

template <typename Body>
void split_rows(int64_t rows, int64_t work, const Body& body) {
  if (work < kMinParallelWork || at::get_num_threads() < 2 || rows < 2) {
    body(0, rows);
    return;
  }
  const int64_t middle = rows / 2;
  std::thread helper([&] { body(middle, rows); });
  body(0, middle);
  helper.join();
}

}  // namespace mixprec
