#!/bin/bash
# Every GPU check, for a session that has a GPU, in two commands of under 10 minutes each:
#   mkdir -p .device_data && cp /path/to/cifar10-jpeg.tar.gz .device_data/    # .device_data/ is git-ignored
#   bash scripts/gpu_checks.sh OUT_DIR bench      # steps 1-2
#   bash scripts/gpu_checks.sh OUT_DIR train      # steps 3-4 (or `all` for both)
# 1. CUDA smoke of the test suite's fast parts, 2. bench.py eager and compiled (issue targets: b/c >= 0.8,
# b/a >= 4, d >= 25k img/s), 3. one real-architecture epoch (random teacher) + evaluation with both baselines,
# 4. supervised -> kd with the supervised arm as teacher, 5 epochs, and the report.
set -uo pipefail
OUT="${1:-gpu_out}"
STAGE="${2:-all}"
DATA=.device_data/cifar10-jpeg
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
[ -d "$DATA/train" ] || { mkdir -p "$DATA" && tar xzf .device_data/cifar10-jpeg.tar.gz -C "$DATA"; }
IMAGEFOLDER=(data.dataset_name=imagefolder "data.dataset_root=$DATA" "data.cache_dir=$OUT/tensor_cache")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

if [ "$STAGE" != train ]; then
timeout 90 python -m pytest -q -x tests/test_transforms.py tests/test_distill_loss.py 2>&1 | tail -2
timeout 200 python bench.py --override "${IMAGEFOLDER[@]}" --output "$OUT/bench.json"
timeout 280 python bench.py --compile --override "${IMAGEFOLDER[@]}" --output "$OUT/bench_compile.json"
fi
[ "$STAGE" = bench ] && exit 0
timeout 150 python distill_trainer.py --no_resume --override "${IMAGEFOLDER[@]}" model.teacher_pretrained=false \
    train.num_epochs=1 'train.save_epochs=[1]' train.warmup_epochs=0 "train.checkpoint_dir=$OUT/run1" 2>&1 | tail -3
timeout 120 python evaluate_checkpoints.py --checkpoint_dir "$OUT/run1" --epochs 1 --eval_teacher --eval_untrained \
    --output_file "$OUT/run1_eval.json" 2>&1 | tail -12
timeout 300 python run_experiments.py --arms supervised kd --teacher_from_arm supervised --epochs 1 5 \
    --out_dir "$OUT/experiments" --override "${IMAGEFOLDER[@]}" train.num_epochs=5 train.warmup_epochs=1 \
    2>&1 | sed -n '/# Experiment report/,$p'
