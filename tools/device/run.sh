#!/usr/bin/env bash
# mixprec's checks for a lent device machine (an H200 host: Intel Xeon with AMX and AVX512-FP16, CUDA,
# its own torch; see /work/.library/device). One call, about 4 minutes:
#   run(command="bash tools/device/run.sh", carry=[".whl"], timeout_s=420)
# .whl holds compressed-tensors and its pure-Python needs (pydantic, pydantic_core, annotated-types,
# typing-inspection, loguru), downloaded here for Python 3.12 as the device README says.
# Writes $OUT/gpu.log (CUDA refusals, compressed-tensors folders run by transformers on the GPU) and
# $OUT/pytest.log (the kernel, module, conv and compile tests on that CPU, one line per failure).
set -uo pipefail
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
export CXX=g++  # the image's default CXX links libstdc++ statically: mixprec refuses such a build
lscpu | grep -E "Model name|^CPU\(s\)"; nvidia-smi -L
timeout 200 python3 tools/device/gpu_checks.py 2>&1 | grep -v "it/s" | tee "$OUT/gpu.log"
timeout 300 python3 -m pytest -q -p no:cacheprovider -rf --tb=line tests/test_kernels.py tests/test_modules.py \
  tests/test_fallbacks.py tests/test_w4a8.py tests/test_packed_int8.py tests/test_conv.py tests/test_compile.py \
  2>&1 | grep -v "Warning\|warnings.warn" > "$OUT/pytest.log"
tail -40 "$OUT/pytest.log"
