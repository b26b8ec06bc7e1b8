#!/usr/bin/env bash
# The prepared GPU check, end to end, in under 10 minutes on one GPU:
#   1. the kernel tests (bitmap and exponent codecs, Triton on the GPU) and
#      the kernels' speed;
#   2. python -m bitfx calibrate --device cuda: the device profile (copied to
#      OUTDIR/profile-cuda.json) that prices every plan after it;
#   3. ResNet-50 (batch 64, 224x224, bf16 autocast) and the squared-ReLU GPT
#      of train_lm.py (bf16 rows too): stock, stock at budget 0.9, bitfx's
#      default and its plan stored dense, each with its peak
#      (max_memory_allocated), saved bytes, interleaved step ratio, and
#      exactness against compress=False (gradients for ResNet-50, every
#      step's loss for the GPT).
# The benchmarks append rows to benchmarks/results/*.jsonl; the rows this run
# added are copied to OUTDIR as rows-<benchmark>.jsonl (append them to the
# repository's files), the logs to OUTDIR/logs.tgz.
#   bash benchmarks/gpu_check.sh OUTDIR
set -uo pipefail
out="${1:?usage: gpu_check.sh OUTDIR}"
mkdir -p "$out/logs"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
logs="$out/logs"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$logs/install.txt" 2>&1 || cat "$logs/install.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$logs/env.txt"
declare -A before
for b in kernels run train_lm; do
    f="benchmarks/results/$b.jsonl"
    before[$b]=$( [ -f "$f" ] && wc -l < "$f" || echo 0 )
done
status=0
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to NAME.txt
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$logs/$name.txt" 2>&1 || { status=1; echo "FAILED: $name"; }
    tail -n 25 "$logs/$name.txt"
}
step 90 kernel_tests python3 -m pytest -q -x tests/test_ops.py tests/test_exponent_codec.py -k "cuda or triton"
step 45 kernels python3 benchmarks/kernels.py --device cuda --sizes 1048576,16777216,67108864 \
    --densities 0.1,0.5,0.9 --dtypes float32,bfloat16 --reps 20
step 40 kernels_exp python3 benchmarks/kernels.py --device cuda --codec exponent --sizes 1048576,16777216 \
    --dtypes float32,bfloat16 --reps 20
step 30 calibrate python3 -m bitfx calibrate --device cuda --out "$out/profile-cuda.json"
[ -f "$out/profile-cuda.json" ] && export BITFX_PROFILE="$out/profile-cuda.json"
step 180 resnet50 python3 benchmarks/run.py --zoo gpu --device cuda --autocast bf16 --steps 10 \
    --configs inductor,inductor@0.9,bittrain,bittrain-dense
step 210 gpt python3 benchmarks/train_lm.py --device cuda --dim 512 --layers 4 --heads 8 --seq 512 --batch 16 \
    --steps 200 --checkpoints 0,200 --bf16 --rounds 10
for b in kernels run train_lm; do
    f="benchmarks/results/$b.jsonl"
    [ -f "$f" ] && tail -n +"$(( ${before[$b]} + 1 ))" "$f" > "$out/rows-$b.jsonl"
done
echo "gpu_check status: $status" | tee "$logs/status.txt"
tar -czf "$out/logs.tgz" -C "$out" logs && rm -rf "$logs"
exit $status
