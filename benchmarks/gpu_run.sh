#!/usr/bin/env bash
# benchmarks/gpu.py at full size on a lent GPU: the one command for the device tool
# (/work/.library/device/README.md), from the repository root:
#
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=570)
#
# Extra arguments go to gpu.py (e.g. `bash benchmarks/gpu_run.sh --sections decode` for a rerun of
# one section). The device machine reaches no registry, so nothing is installed from a network: the
# script runs under the image's own python3 and its JAX (CUDA), flax, optax and orbax, with r1jax
# taken from this working tree (PYTHONPATH; no `pip install -e .`, whose pins would ask for other
# versions) and the three packages the image lacks (grain, which r1jax.stages.grpo imports, and its
# array_record and portpicker) installed from wheels carried in .whl/. Make those here, once (.whl/
# is in .gitignore):
#
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl grain==0.2.18 array_record==0.8.6 portpicker==1.6.0
#
# gpu.py is stopped after GPU_BENCH_SECONDS (default 500), inside the call's 10 minutes; it rewrites
# its JSON after each section, so a run cut short keeps the sections it finished. Back under $OUT:
# gpu_full.json (every figure), gpu_full.log (the whole output, the markdown tables at its end) and
# env.txt (the GPU as nvidia-smi reads it, the Python packages). Reads the card's state, changes none.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_bench_out}
mkdir -p "$OUT"
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "no wheels in .whl/: make them as the head of benchmarks/gpu_run.sh says, and carry .whl" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "${wheels[@]}" || exit 2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.mem,temperature.gpu \
    --format=csv
  python3 -m pip list 2>/dev/null | grep -i -E '^(jax|jaxlib|jax-cuda[0-9]+-(plugin|pjrt)|flax|optax|orbax-checkpoint|numpy|ml.dtypes|grain) '
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout -k 15 "${GPU_BENCH_SECONDS:-500}" python3 benchmarks/gpu.py --size full --out "$OUT/gpu_full.json" "$@" \
  2>&1 | tee "$OUT/gpu_full.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 124 ] && echo "gpu.py stopped after ${GPU_BENCH_SECONDS:-500} s; $OUT/gpu_full.json holds the sections it finished, if any"
exit "$rc"
