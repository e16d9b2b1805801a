#!/usr/bin/env bash
# One call on the GPU machine (see bench/NOTES.md, "Reproduce"): bash bench/device_session.sh PHASE...
#   tests    the whole test suite on the GPU machine (its CUDA tests, and the rest under its torch; xdist -n JOBS;
#            TESTS_K: a pytest -k expression)
#   quick    bench_lce.py: floor, compile and our two settings on the three shapes (+ plan variants in EXTRA)
#   sweep    bench_lce.py --sweep: the three-GEMM loop's pieces alone
#   bench    bench_lce.py: every method, with the peers (carry .whl)
#   profile  bench_lce.py --profile (kernel breakdown of the default and the lean setting)
#   e2e      bench/e2e_llama.py at batch 1 and 4 x 4096 (plain, default, lean)
# Logs and tables go to $OUT (bench/out here).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
# the package's metadata (its torch_dynamo_backends entry point; the code itself runs from this tree, first on the path)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site_pkg . \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site_pkg
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
rc=0
for phase in "$@"; do
    echo "=== $phase $(date +%T)"
    case $phase in
        tests)
            python3 -m pytest -q -p no:cacheprovider -n ${JOBS:-8} ${TESTS_K:+-k "$TESTS_K"} tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 || rc=1 ;;
        quick)
            METHODS=${METHODS:-floor,compile,inductor_lce,inductor_lce_lean${EXTRA:+,$EXTRA}} \
                python3 bench/bench_lce.py 2>&1 | tee "$OUT/quick.log" | grep -v '^{' || rc=1 ;;
        sweep)
            python3 bench/bench_lce.py --sweep 2>&1 | tee "$OUT/sweep.log" | grep -v '^{' || rc=1 ;;
        bench)
            python3 bench/bench_lce.py 2>&1 | tee "$OUT/bench.log" | grep -v '^{' || rc=1 ;;
        profile)
            python3 bench/bench_lce.py --profile 2>&1 | tee "$OUT/profile.log" || rc=1 ;;
        e2e)
            for b in 1 4; do
                python3 bench/e2e_llama.py --batch "$b" 2>&1 | tee "$OUT/e2e_b$b.log" | tail -12 || rc=1
            done ;;
        *) echo "unknown phase $phase"; rc=2 ;;
    esac
done
exit $rc
