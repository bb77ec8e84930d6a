#!/usr/bin/env bash
# Wheels the lent GPU machine lacks, for bench/gpu_runs.py and `make test-gpu` there (it has torch,
# transformers, peft and accelerate, and no network). Run here, from the repository root:
#
#   bash bench/gpu_wheels.sh            # → .whl/ (git-ignored; pass it to the device call as carried)
#
# and start the device command with the lines printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

python=${PYTHON:-python3}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# The machine's Python is 3.12. bitsandbytes: QLoRA, 8-bit loading and optimizers; pydantic and its
# helpers: the compiler (bundles are compiled there with --target detect); hjson: DeepSpeed's one
# missing dependency; datasets and its two helpers the machine lacks: a bundle's stack check asks for datasets.
for requirement in bitsandbytes==0.50.2 pydantic==2.14.3 pydantic_core==2.50.4 annotated-types typing-inspection hjson \
                   datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19; do
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "$requirement"
done
# DeepSpeed as a pure-Python wheel: its ops compile just in time on the GPU machine (the first step
# of a run that needs one pays for it).
DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl

du -sh .whl
cat <<'HOW'
Device command prologue (carry: [".whl"]):
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/tf . || exit 1
  export PYTHONPATH=/tmp/tf:/tmp/site
then e.g.  python3 bench/gpu_runs.py --work /tmp/w --results $OUT/gpu_runs.json --tails $OUT/tails.txt RUN ...
HOW
