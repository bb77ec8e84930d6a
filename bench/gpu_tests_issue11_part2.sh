#!/usr/bin/env bash
# The GPU tests and the FP8 benchmark of issue 11's second part (LoftQ, Llama 4 linearised experts under QLoRA,
# FP8 with tiled MLP, N-D parallelism where the machine has the GPUs), on the lent GPU machine, each under its
# own time limit. Run there with `carry: [".whl/final"]` (wheels: bitsandbytes, liger-kernel, cut-cross-entropy,
# torchao, datasets, pydantic); writes one pytest summary per file and bench/results-style JSON to $OUT.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/final/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/tf . || exit 1
export PYTHONPATH=/tmp/tf:/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import scipy; print('scipy', scipy.__version__)" || echo "no scipy: LoftQ's GPU test will say so"
for file in test_runtime_model_axolotl test_runtime_fp8_tiled_mlp_e2e test_parallelism_runtime; do
    timeout "${LIMIT:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider "tests/$file.py" \
        > "$OUT/$file.txt" 2>&1
    echo "$file: exit $? :: $(tail -1 "$OUT/$file.txt")"
done
timeout "${FP8_LIMIT:-300}" python3 bench/gpu_fp8.py --work /tmp/fp8 --results "$OUT/gpu_fp8.json" > "$OUT/gpu_fp8.txt" 2>&1
echo "gpu_fp8: exit $?"; tail -25 "$OUT/gpu_fp8.txt"
