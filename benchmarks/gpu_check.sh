#!/usr/bin/env bash
# The GPU checks in one device call: the CuPy equality tests (table runner, persistent engine) and the
# persistent-mode throughput on the GPU (issue 14: >= 100,000 env steps/s at 3,000 genes).
#
#   bash benchmarks/gpu_check.sh prepare   # here (CPU machine, package registry reachable): the wheels the GPU
#                                          # image lacks (jsonschema and its needs, for config validation) -> .whl/
#   bash benchmarks/gpu_check.sh run       # there, from the repo root, with .whl and
#                                          # benchmarks/out/cache/demo3000_g3000/model.npz carried (the 3,000-gene
#                                          # model, built here by benchmarks/transitions.py --sets demo3000)
#
# The GPU image's python3 has numpy, scipy, numba, pandas, pyyaml, psutil, pytest and CuPy; nothing else of
# cellrl's is needed for these checks. Results: $OUT (default benchmarks/out): gpu_tests.log,
# gpu_throughput.log and persistent_throughput_gpu.json.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 || exit
  ls -l .whl ;;
run)
  OUT=${OUT:-benchmarks/out}
  mkdir -p "$OUT"
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  nvidia-smi -L
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_transitions.py tests/test_persistent_engine.py \
    2>&1 | tee "$OUT/gpu_tests.log"
  python3 benchmarks/persistent_throughput.py --backend cupy --threads 1 --seconds "${RUN_SECONDS:-8}" \
    --envs "${RUN_ENVS:-4096,16384,65536}" --problems 3000_genes,3000_genes_random 2>&1 | tee "$OUT/gpu_throughput.log"
  cp benchmarks/results/persistent_throughput_gpu.json "$OUT/" ;;
*)
  echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2
  exit 2 ;;
esac
