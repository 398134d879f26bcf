#!/usr/bin/env bash
# The GPU check of recipes/unified_grpo.yaml, as run on a lent device machine (bench/RESULTS.md,
# "GPU step"). One call, in the repository root, with the missing packages carried as wheels in
# .whl/ (README of the device tool; the machine has torch 2.11, accelerate, timm, tokenizers and
# huggingface_hub 1.x). Carried, at pyproject.toml's pins: transformers, diffusers, peft, deepspeed
# (a wheel built here with DS_BUILD_OPS=0: PyPI has only its sdist), open_clip_torch, timm, trl,
# datasets, pydantic; and their missing needs: pydantic-core, annotated-types, typing-inspection,
# typing-extensions, dill, multiprocess, hjson, ftfy, wcwidth, regex (32 MB in all):
#
#     bash bench/gpu_check.sh depth2 full      # ~6 min with the machine's start; then, in a 2nd call:
#     bash bench/gpu_check.sh full_b4          # ~5 min (one call may run 10 min at most)
#
# Each writes env.txt and <step>.{json,log} to $OUT:
#   depth2   real widths at depth 2, 1024 px, ZeRO-2, bf16, 2 images x 2 captions: every stage's code
#            path on CUDA, quickly (~1 min);
#   full     the published depth (Qwen2.5-VL-3B, SD3.5-large, CLIP ViT-L/14), 2 images x 2 captions,
#            ZeRO-2: seconds and peak GPU memory per stage, against the memory plan (~4 min);
#   full_b4  the same with 4 images x 2 captions: 8 rows, the recipe's rollout micro-batch, and two
#            cold-start micro-batches of 2 (the peak must not grow with the images) (~4.5 min).
# Ray is not carried (too large): bench/gpu_step.py runs learner and rollout worker in one process.
set -o pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 3; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers, diffusers, deepspeed, peft, open_clip, pydantic, trl; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, \
'| diffusers', diffusers.__version__, '| deepspeed', deepspeed.__version__, '| peft', peft.__version__, \
'| open_clip', open_clip.__version__, '| trl', trl.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
grep -q "^torch" "$OUT/env.txt" || exit 4

step() {  # name, seconds, gpu_step arguments...
    local name=$1 limit=$2; shift 2
    echo "== $name: python bench/gpu_step.py $*"
    timeout "$limit" python3 bench/gpu_step.py "$@" --json "$OUT/$name.json" 2>&1 \
        | grep -v -e "warnings.warn" -e "FutureWarning" | tee "$OUT/$name.log"
}
for name in "${@:-depth2}"; do
    case $name in
        depth2) step depth2 150 --depth 2 --zero-stage 2 --batch-size 2 --group-size 2 --max-new-tokens 32 || exit 5 ;;
        full) step full 300 --zero-stage 2 --batch-size 2 --group-size 2 --max-new-tokens 64 || exit 5 ;;
        full_b4) step full_b4 300 --zero-stage 2 --batch-size 4 --group-size 2 --max-new-tokens 64 || exit 5 ;;
        *) echo "unknown step $name (depth2, full, full_b4)"; exit 2 ;;
    esac
done
nvidia-smi --query-gpu=memory.used --format=csv >> "$OUT/env.txt" 2>&1
