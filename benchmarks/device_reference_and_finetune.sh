#!/usr/bin/env bash
# One call on a lent GPU machine (16 cores + an H200), run from the repository root:
#   * independent replicas of the ALDP reference's biased MD on all cores but three
#     (systems/aldp/reference/md_replicas.py), until MD_S seconds have passed;
#   * beside them, the shipped whole-molecule flow fine-tuned on the GPU for FT_S seconds
#     (systems/aldp/recipes/gpu_pretrained/3_finetune_shipped.yaml, benchmarks/train_within_budget.py);
#   * benchmarks/energy.py on one core if the CPU's best vector capability is AVX2.
# Results go to $OUT (at most 8 files). Wheels for packages the machine lacks (OpenMM) in .whl/.
# DEVICE=cpu and small MD_S / FT_S make a local dry run.
set -u
MD_S=${MD_S:-470}
FT_S=${FT_S:-410}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
LOG=$OUT/logs.txt
{
    date -u; nproc; lscpu | grep -i "model name"; nvidia-smi -L 2>/dev/null
    python3 -c "import torch, openmm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'cpu', torch.backends.cpu.get_cpu_capability(), 'openmm', openmm.__version__)"
} >"$LOG" 2>&1
N=$(nproc); NREP=$(( N > 4 ? N - 3 : 1 ))
python3 systems/aldp/reference/md_replicas.py --replicas "$NREP" --seed 3001 --deadline-s "$MD_S" \
    --stride 20 --work /tmp/md_work --out "$OUT/replicas.npz" >"$OUT/md.json" 2>>"$LOG" &
MD_PID=$!
python3 benchmarks/train_within_budget.py --device "$DEVICE" --budget-s "$FT_S" --calibrate 40 \
    --out /tmp/ft systems/aldp/recipes/gpu_pretrained/3_finetune_shipped.yaml:1 >"$OUT/ft.log" 2>&1 &
FT_PID=$!
CAP=$(python3 -c "import torch; print(torch.backends.cpu.get_cpu_capability())" 2>/dev/null)
if [ "$CAP" = "AVX2" ]; then
    python3 benchmarks/energy.py --threads 1 --batches 1024 --no-compile >"$OUT/energy.json" 2>>"$LOG"
fi
wait $FT_PID; echo "fine-tune exit $?" >>"$LOG"
cp /tmp/ft/stage1/checkpoint.pt "$OUT/ft_checkpoint.pt" 2>>"$LOG"
cp /tmp/ft/stage1/log.csv "$OUT/ft_log.csv" 2>>"$LOG"
wait $MD_PID; echo "md exit $?" >>"$LOG"
tail -n 3 /tmp/md_work/*.log >>"$LOG" 2>&1
date -u >>"$LOG"
