#!/usr/bin/env bash
# Second device run of 2026-12-04: the C++-exception crash diagnosis, the host-cost stage, the fixed GPU tests, PCOS
# bf16 triton with and without launch tuning. Everything into $OUT (flat).
set -u
export PYTHONUNBUFFERED=1 MAX_JOBS=16 TORCH_EXTENSIONS_DIR=/tmp/ext
T0=$(date +%s)
t() { echo "== $1 at $(( $(date +%s) - T0 )) s"; }
git rev-parse HEAD > $OUT/env.txt 2>&1; git status --short >> $OUT/env.txt; which gdb >> $OUT/env.txt 2>&1
(t diag; timeout 150 python3 gpu_diag/cpp_exc.py) > $OUT/cpp_exc.log 2>&1 &
DIAG=$!
t build; timeout 120 python3 -c "
import time, torch, csl_kernels as ck; t = time.perf_counter()
print(ck.unavailable_reason('pcos_weights', 'cuda', torch.device('cuda')), f'{time.perf_counter() - t:.1f} s')" > $OUT/build.log 2>&1
wait $DIAG
t host; timeout 80 python3 -m csl_bench.bench_host_overhead --calls 1000 --repeats 5 --workers gpu baseline \
  --worker-timeout 40 --out $OUT/host.json > $OUT/host.log 2>&1
t tests; CSL_REQUIRE_BACKENDS=triton,cuda OMP_NUM_THREADS=1 CSL_AUTO_CACHE=/tmp/tests-auto.json timeout 140 \
  python3 -m pytest -q -rfE -p no:cacheprovider -p no:randomly -n 14 --timeout 120 --timeout-method thread \
  tests/test_triton_tuning.py tests/test_bench.py tests/test_gpu.py tests/test_backends.py tests/test_train.py \
  --deselect tests/test_train.py::test_ddp_two_processes_gloo > $OUT/pytest.log 2>&1
t bench; for mode in 1 0; do
  CSL_TRITON_AUTOTUNE=$mode timeout 45 python3 -m csl_bench --device cuda --shapes voc321 --dtypes bf16 fp32 \
    --skip-train --rep-s 0.3 --ops pcos_weights --providers triton cuda --out $OUT/bench-pcos-tune$mode.json
done > $OUT/bench.log 2>&1
t done
