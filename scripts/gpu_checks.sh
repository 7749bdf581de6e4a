#!/bin/bash
# Every GPU check in ONE run of at most 6 minutes, for a session that has a GPU:
#   mkdir -p .device_data && cp /path/to/cifar10-jpeg.tar.gz .device_data/   # git-ignored
#   bash scripts/gpu_checks.sh OUT          # KD_DATA_TAR=... names another tarball
# Without a CUDA GPU it exits at once (code 2) with one line and writes nothing.
#
# Stages, each under its own timeout (sum 325 s; `timeout -k 5` adds <= 5 s to a stage it kills):
#   0. unpack the data                                                                 15 s
#   1. GPU tests (tests/test_gpu.py): a failed capture restores stream and RNG and
#      names its own error; captured == eager on tiny models, drop path on; bf16
#      teacher parity                                                                  40 s
#   2. bench.py, default mode (captured): check, (b), (c), eager variants, host
#      syncs, epoch, profile, (a), then the cached-target step (d) and its check       95 s
#   3. bench.py --compile --no_cached: captured + compiled, compiled uncaptured        95 s
#   4. a real-architecture run, 4 epochs x 10 steps, random teacher (its first log
#      record names the step mode)                                                     30 s
#   5. the evaluator on those 4 checkpoints + teacher + untrained, timed (<= 60 s)     50 s
# The timeouts are estimates made without a GPU: adjust them from the stage times in summary.txt.
# A stage killed by its timeout keeps what it measured: bench.py appends each part to parts.jsonl
# the moment it is measured. Data, tensor cache, teacher cache, checkpoints, the inductor cache
# and full logs go to KD_WORK (default ${TMPDIR:-/tmp}/kd_gpu_checks), never to OUT.
#
# OUT receives 7 small files:
#   summary.txt   per mode: img/s, captured_ok with its figures, peak GPU memory, fallback
#                 reason, host syncs per step (eager and captured), epoch figures; each
#                 stage's exit code and time
#   parts.jsonl   one JSON line per measured part of stages 2-3 ({"part", "compile", figures})
#   bench.jsonl   the final bench.py record of stages 2 and 3 (one line each, if it finished)
#   profile.txt   torch.profiler: top kernels of 3 captured and of 3 uncaptured steps, per mode
#   tests.txt     the GPU tests' report
#   eval.md       the evaluator's table
#   log.txt       the last 25 lines of every stage's output
set -uo pipefail
if ! command -v nvidia-smi > /dev/null 2>&1 \
        || ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" \
             > /dev/null 2>&1; then
    echo "gpu_checks.sh: no CUDA GPU here (no nvidia-smi, or torch.cuda.is_available() is" \
         "False); run it on a GPU machine" >&2
    exit 2
fi
echo "gpu_checks.sh: at most 6 min in all (stage timeouts 15+40+95+95+30+50 = 325 s + kill grace)"
OUT="${1:-gpu_out}"
WORK="${KD_WORK:-${TMPDIR:-/tmp}/kd_gpu_checks}"
TAR="${KD_DATA_TAR:-.device_data/cifar10-jpeg.tar.gz}"
DATA="$WORK/cifar10-jpeg"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"
mkdir -p "$OUT" "$WORK"
SUMMARY="$OUT/summary.txt"
IMAGEFOLDER=(data.dataset_name=imagefolder "data.dataset_root=$DATA"
             "data.cache_dir=$WORK/tensor_cache" data.num_workers=16)

say() { echo "$*" | tee -a "$SUMMARY"; }
stage() {  # stage NAME TIMEOUT COMMAND...: output to WORK/NAME.log, its tail to OUT/log.txt
    local name=$1 limit=$2 started rc
    shift 2
    started=$(date +%s)
    timeout -k 5 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    { echo "== $name (exit $rc)"; tail -n 25 "$WORK/$name.log"; } >> "$OUT/log.txt"
    local killed=""
    [ $rc = 124 ] || [ $rc = 137 ] && killed=", KILLED by its timeout"
    say "== $name: exit $rc in $(( $(date +%s) - started )) s (timeout $limit s)$killed"
    return $rc
}
summarize() {  # summarize COMPILE(true|false): the figures of one bench stage, from parts.jsonl
    python - "$OUT/parts.jsonl" "$1" <<'PY' | tee -a "$SUMMARY"
import json, sys
path, compiled = sys.argv[1], sys.argv[2] == "true"
try:
    lines = [json.loads(line) for line in open(path) if line.strip()]
except (OSError, ValueError) as e:
    sys.exit(f"  no parts: {e}")
r = {}
for line in lines:
    if line.get("compile") == compiled:
        r.update(line)
        if "peak_gpu_mem_gib" in line:
            r.setdefault("peaks", {})[line["part"]] = line["peak_gpu_mem_gib"]
def f(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
print(f"  step mode: {r.get('step_mode')} ({r.get('step_mode_reason')}); "
      f"fallback: {r.get('capture_error')}")
if "cached_step_mode" in r:
    print(f"  cached step mode: {r['cached_step_mode']}; "
          f"fallback: {r.get('cached_capture_error')}")
for k in ("train_step", "train_step_eager", "teacher_forward", "teacher_forward_eager",
          "cached_train_step", "cached_train_step_eager", "reference"):
    if f"{k}_img_per_s" in r:
        print(f"  {k}: {f(r[k + '_img_per_s'])} img/s")
for k in ("captured_check", "cached_captured_check"):
    c = r.get(k)
    if c:
        print(f"  {k}: captured_ok={c['captured_ok']} loss {f(c['loss_rel_diff'])} "
              f"(floor {f(c['loss_rel_floor'])}), update {f(c['update_rel_diff'])} "
              f"(floor {f(c['update_rel_floor'])}), pass <= {c['factor']:g} x max(floor, "
              f"{c['min_floor']:g}); lr=0 replay identical: {c['lr0_weights_identical']}; "
              f"lr {f(c['lr_first'])} -> {f(c['lr_last'])} over {c['steps']} steps")
for k in ("epoch_s", "epoch_end_s", "epoch_img_per_s", "cache_build_views_per_s",
          "cache_full_build_s_est"):
    if k in r:
        print(f"  {k}: {f(r[k])}")
syncs = {k[len("host_syncs_"):]: v for k, v in r.items() if k.startswith("host_syncs_")}
print(f"  host syncs per step: {syncs}")
print(f"  peak GPU memory GiB by part: { {k: f(v) for k, v in r.get('peaks', {}).items()} }")
print(f"  parts measured: {', '.join(l['part'] for l in lines if l.get('compile') == compiled)}")
PY
}

: > "$SUMMARY"
say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
say "$(python -c "import torch, timm
print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, timm {timm.__version__}')")"
say "started $(date -u +%FT%TZ), work dir $WORK"

if [ ! -d "$DATA/train" ]; then
    [ -f "$TAR" ] || { say "no data: $TAR not found; copy cifar10-jpeg.tar.gz there or set" \
                           "KD_DATA_TAR"; exit 2; }
    mkdir -p "$DATA" && stage unpack 15 tar xzf "$TAR" -C "$DATA"
    [ -d "$DATA/train" ] || { say "unpacking $TAR gave no $DATA/train folder"; exit 2; }
fi

stage gpu_tests 40 python -m pytest -q -p no:cacheprovider tests/test_gpu.py
tail -n 15 "$WORK/gpu_tests.log" > "$OUT/tests.txt"
tail -n 1 "$WORK/gpu_tests.log" | tee -a "$SUMMARY"

BENCH=(python bench.py --override "${IMAGEFOLDER[@]}" --parts "$OUT/parts.jsonl"
       --profile "$OUT/profile.txt")
stage bench_default 95 "${BENCH[@]}" --output "$WORK/bench_default.json" \
    && cat "$WORK/bench_default.json" >> "$OUT/bench.jsonl"
summarize false
stage bench_compile 95 "${BENCH[@]}" --compile --no_cached --output "$WORK/bench_compile.json" \
    && cat "$WORK/bench_compile.json" >> "$OUT/bench.jsonl"
summarize true

stage run4 30 python distill_trainer.py --no_resume --override "${IMAGEFOLDER[@]}" \
    model.teacher_pretrained=false train.num_epochs=4 'train.save_epochs=[1,2,3,4]' \
    train.max_steps_per_epoch=10 train.warmup_epochs=0 train.progress=false \
    "train.checkpoint_dir=$WORK/run4"
say "  trainer's first log record: $(head -n 1 "$WORK/run4/log.jsonl" 2>/dev/null | python -c "
import json, sys
r = json.loads(sys.stdin.read() or '{}')
print({k: r.get(k) for k in ('step_mode', 'step_mode_reason', 'capture_error')})")"
stage eval 50 python evaluate_checkpoints.py --checkpoint_dir "$WORK/run4" --epochs 1 2 3 4 \
    --eval_teacher --eval_untrained --num_workers 16 --output_file "$WORK/run4_eval.json"
cp "$WORK/run4_eval.md" "$OUT/eval.md" 2> /dev/null
say "finished $(date -u +%FT%TZ); OUT: $(ls "$OUT" | tr '\n' ' ')"
