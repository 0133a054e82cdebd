// fp16 values (group scales) converted to float32, exactly (every fp16 value is a float32 value).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mixprec {

// out[i] = float(in[i]) for `count` values: 16 at a time by vcvtph2ps with AVX-512, the rest one by one.
inline void halves_to_floats(const at::Half* in, float* out, int64_t count) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= count; i += 16)
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i))));
#endif
  for (; i < count; ++i) out[i] = static_cast<float>(in[i]);
}

}  // namespace mixprec
