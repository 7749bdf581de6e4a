# Sourced by train.sbatch and eval.sbatch inside the job: the site settings (docs/cluster.md), then
# the checks. KD_* variables already in the environment (sbatch exports the submitting shell's) win
# over the file.
_kd_site="${KD_SITE:-site.env}"
if [ -f "$_kd_site" ]; then
    _kd_saved=""
    [ -z "${!KD_@}" ] || _kd_saved="$(declare -p ${!KD_@})"
    set -a
    . "$_kd_site"
    set +a
    eval "$_kd_saved"
elif [ -n "${KD_SITE:-}" ]; then
    echo "error: KD_SITE=$KD_SITE: no such file (from $(pwd)); fix the path or unset KD_SITE" >&2
    exit 2
fi
if [ -n "${KD_SETUP:-}" ]; then
    if ! eval "$KD_SETUP"; then
        echo "error: KD_SETUP failed: $KD_SETUP (set in $_kd_site or the environment)" >&2
        exit 2
    fi
fi
if [ "${KD_GPU_REQUEST:-gpus-per-node}" != none ] && [ -z "${CUDA_VISIBLE_DEVICES:-}" ] \
        && [ "${SLURM_GPUS_ON_NODE:-0}" = 0 ]; then
    echo "error: job ${SLURM_JOB_ID:-?} got no GPU: submit with --gpus-per-node=1 (or" \
         "--gres=gpu:1), or through python slurm_grid.py with KD_GPU_REQUEST in site.env;" \
         "KD_GPU_REQUEST=none runs on CPU" >&2
    exit 2
fi
unset _kd_site _kd_saved
