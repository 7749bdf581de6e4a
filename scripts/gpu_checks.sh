#!/bin/bash
# Every GPU check, for a session that has a GPU, in one command of under 8 minutes (stage timeouts: 180+130+60+90 s):
#   mkdir -p .device_data && cp /path/to/cifar10-jpeg.tar.gz .device_data/    # .device_data/ is git-ignored
#   bash scripts/gpu_checks.sh OUT_DIR
# 1. bench.py in the trainer's default mode (captured CUDA graph on one GPU): (a)-(d), the eager variants, the
#    captured-vs-eager losses/weights after 5 identical steps, a whole epoch and the 50-epoch estimates;
# 2. the same with --compile;
# 3. a short real-architecture run (4 x 20 steps, random teacher) and the evaluator on its 4 checkpoints with the
#    teacher and untrained baselines, timed (target: <= 60 s).
# Targets (README "Speed"): (b) >= 4,500 img/s, b/a >= 3, b/c >= 0.6, (d) >= 12,000, epoch_over_b >= 0.9,
# run50_min_est_live <= 10, run50_min_est_cached <= 6.
set -uo pipefail
OUT="${1:-gpu_out}"
DATA=.device_data/cifar10-jpeg
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
[ -d "$DATA/train" ] || { mkdir -p "$DATA" && tar xzf .device_data/cifar10-jpeg.tar.gz -C "$DATA"; }
IMAGEFOLDER=(data.dataset_name=imagefolder "data.dataset_root=$DATA" "data.cache_dir=$OUT/tensor_cache"
             data.num_workers=16)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
summary() {  # the figures the targets are about, from one bench JSON line
    python - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("step_mode", "reference_img_per_s", "train_step_img_per_s", "train_step_eager_img_per_s",
        "teacher_forward_img_per_s", "teacher_forward_eager_img_per_s", "cached_train_step_img_per_s",
        "cached_train_step_eager_img_per_s", "ratio_b_over_a", "ratio_b_over_c", "epoch_s", "epoch_end_s",
        "epoch_over_b", "run50_min_est_live", "run50_min_est_cached", "captured_vs_eager", "peak_gpu_mem_gib")
for k in keys:
    v = r.get(k)
    print(f"  {k}: {round(v, 3) if isinstance(v, float) else v}")
PY
}

echo "== 1. bench (default mode)"
timeout 180 python bench.py --override "${IMAGEFOLDER[@]}" --output "$OUT/bench.json" 2> "$OUT/bench.err" \
    && summary "$OUT/bench.json" || tail -5 "$OUT/bench.err"
echo "== 2. bench --compile"
timeout 130 python bench.py --compile --override "${IMAGEFOLDER[@]}" --output "$OUT/bench_compile.json" \
    2> "$OUT/bench_compile.err" && summary "$OUT/bench_compile.json" || tail -5 "$OUT/bench_compile.err"
echo "== 3. real-architecture run + evaluator timing"
timeout 60 python distill_trainer.py --no_resume --override "${IMAGEFOLDER[@]}" model.teacher_pretrained=false \
    train.num_epochs=4 'train.save_epochs=[1,2,3,4]' train.max_steps_per_epoch=20 train.warmup_epochs=0 \
    "train.checkpoint_dir=$OUT/run4" > "$OUT/run4.log" 2>&1; tail -2 "$OUT/run4.log"
start=$(date +%s.%N)
timeout 90 python evaluate_checkpoints.py --checkpoint_dir "$OUT/run4" --epochs 1 2 3 4 --eval_teacher \
    --eval_untrained --num_workers 16 --output_file "$OUT/run4_eval.json" > "$OUT/eval.log" 2>&1
rc=$?
echo "evaluator: exit $rc in $(python -c "import time; print(round(time.time() - $start, 1))") s (target <= 60 s)"
grep -E "^(epoch_|teacher|untrained)" "$OUT/eval.log" | cut -c1-160
