"""What the native build has, for tests whose expectations differ by instruction set.

The build is compiled with -march=native, so it has what this CPU has; a build forced to another target (a compiler
wrapper trading -march=native for -march=haswell, to try the AVX2 paths on an AVX-512 machine) has less. The build
says what it was compiled for; without native kernels the CPU's own flags stand in.
"""

from __future__ import annotations

from mixprec.kernels import cpu, native

#: AVX-512 (F and BW): the integer engine's vector kernels, the int8 ADD's float estimate, the example goldens' CPU.
AVX512_BUILD = (native.kv_attention_available() if native.available()
                else {"avx512f", "avx512bw"} <= cpu.cpu_flags())
#: AVX512-VNNI (and BW): the convolution kernels that take prepacked weights.
AVX512_VNNI_BUILD = (native.w4a8_available() if native.available()
                     else {"avx512_vnni", "avx512bw"} <= cpu.cpu_flags())
