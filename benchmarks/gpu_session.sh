#!/usr/bin/env bash
# The checks a session with a lent GPU runs at once, in one command: the CUDA tests, then the
# benchmarks whose GPU rows README.md and issue #23 ask for. No GPU has been lent since the
# compiled path landed, so its GPU rows are still to be measured.
#
#   bash benchmarks/gpu_session.sh download   # here, with network: the wheels the GPU machine lacks
#   bash benchmarks/gpu_session.sh run        # there (the device tool's `run`, carry [".whl"])
#
# The GPU machine has CUDA torch, numpy, scikit-learn, matplotlib, pytest, tqdm and opt-einsum but
# no pyro-ppl, pyro-api, mlxtend, filelock or hypothesis (../shared/GPU.md); they come as wheels
# in .whl (git-ignored through .git/info/exclude). Logs go to $OUT (the device tool's folder that
# comes back) or ./gpu-logs; each step has its own time limit so that the whole run stays under
# ten minutes and a slow step cannot take the others' results with it.
set -u
case "${1:-}" in
  download)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
      pyro-ppl==1.9.2 pyro-api==0.1.2 mlxtend==0.25.0 filelock==4.3.2 hypothesis==6.155.2 \
      attrs==26.1.0 sortedcontainers==2.4.0
    ;;
  run)
    OUT=${OUT:-gpu-logs}
    mkdir -p "$OUT"
    SITE=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
      .whl/*.whl || exit 1
    export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
    python3 -c "import torch; print(torch.__version__, torch.version.cuda)" >> "$OUT/gpu.txt"
    timeout 180 python3 -m pytest -m cuda -q -p no:cacheprovider -rs > "$OUT/cuda_tests.txt" 2>&1
    timeout 120 python3 benchmarks/bench_fit.py --device cuda --objectives elbo --epochs 3 \
      --rounds 1 --no-check > "$OUT/bench_fit.txt" 2>&1
    timeout 180 python3 benchmarks/bench_estimators.py --device cuda --num-images 10000 \
      > "$OUT/bench_estimators.txt" 2>&1
    for log in "$OUT"/*.txt; do echo "== $log"; tail -n 12 "$log"; done
    ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh download|run" >&2
    exit 2
    ;;
esac
