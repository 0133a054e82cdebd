"""What the native build (-march=native) has on this CPU, for tests whose expectations differ by CPU."""

from __future__ import annotations

from mixprec.kernels import cpu

#: AVX-512 (F and BW): the integer engine's vector kernels, the int8 ADD's float estimate, the example goldens' CPU.
AVX512_BUILD = {"avx512f", "avx512bw"} <= cpu.cpu_flags()
#: AVX512-VNNI: the convolution kernels that take prepacked weights.
AVX512_VNNI_BUILD = {"avx512_vnni", "avx512bw"} <= cpu.cpu_flags()
