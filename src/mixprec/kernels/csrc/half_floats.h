// fp16 values (group scales) converted to float32, exactly (every fp16 value is a float32 value).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace mixprec {

// out[i] = float(in[i]) for `count` values: 16 (AVX-512) or 8 (F16C) at a time by vcvtph2ps, the rest one by one.
inline void halves_to_floats(const at::Half* in, float* out, int64_t count) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= count; i += 16)
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i))));
#elif defined(__F16C__)
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
#endif
  for (; i < count; ++i) out[i] = static_cast<float>(in[i]);
}

}  // namespace mixprec
