#!/usr/bin/env bash
# The GPU tests of issue 11's runtime features on the lent GPU machine (Liger and cut-cross-entropy kernels,
# torchao optimizers, activation offloading, QAT, MoE expert quantisation), each file under its own time limit.
# Run there with `carry: [".whl/final"]` (wheels: bitsandbytes, liger-kernel, cut-cross-entropy, torchao,
# datasets, pydantic); writes one pytest summary per file to $OUT and prints them.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/final/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/tf . || exit 1
export PYTHONPATH=/tmp/tf:/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for file in test_runtime_optim_options test_runtime_model_options test_runtime_model_loading test_runtime_qat \
            test_runtime_kernels; do
    timeout "${LIMIT:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider "tests/$file.py" \
        > "$OUT/$file.txt" 2>&1
    echo "$file: exit $? :: $(tail -1 "$OUT/$file.txt")"
done
