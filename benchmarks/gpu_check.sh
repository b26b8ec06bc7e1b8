#!/usr/bin/env bash
# The prepared GPU check, end to end, in about 8 minutes on one GPU, each
# stage under a time limit:
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
# It runs on the machine's own python3 and torch: bitfx is installed with
# --no-deps and nothing is fetched.  Rows go to OUTDIR/rows-<benchmark>.jsonl
# (append them to benchmarks/results/), a summary to OUTDIR/summary.txt, the
# logs to OUTDIR/logs.tgz.
#   bash benchmarks/gpu_check.sh OUTDIR
#   bash benchmarks/gpu_check.sh --dry-run OUTDIR   # the same stages on the CPU, tiny
#                                                   # sizes, Triton's interpreter (CI)
set -uo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out="${1:?usage: gpu_check.sh [--dry-run] OUTDIR}"
out="$(mkdir -p "$out" && cd "$out" && pwd)"
logs="$out/logs"
mkdir -p "$logs"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ $dry = 1 ]; then
    # The installed bitfx (CI's), the CPU, the interpreter and tiny sizes.
    export TRITON_INTERPRET=1
    device=cpu
    kernel_sizes=65536 densities=0.5 dtypes=float32 reps=2
    profile_args=(--device cpu --quick)
    run_args=(--quick --device cpu --steps 2)
    scale=4  # two cores, shared with CI's other torch version: every stage's limit is 4x
    # bitfx's default alone: the other configurations run the same script
    # lines with other options, and each is a ResNet-50 compile (90-110 s on
    # two cores); tests/test_benchmarks.py runs them all on a small model
    configs=bittrain
    # CI's test run on this torch runs the kernel tests (Triton's interpreter)
    skip_kernel_tests=1
    gpt_args=(--device cpu --dim 32 --layers 2 --heads 2 --seq 32 --batch 2 --steps 2 --checkpoints 0,2 --rounds 2
              --corpus-bytes 200000)  # fp32 only: --bf16 doubles its ten compiles
else
    python3 -m pip install -q --no-deps --no-build-isolation -e . > "$logs/install.txt" 2>&1 || cat "$logs/install.txt"
    device=cuda
    kernel_sizes=1048576,16777216,67108864 densities=0.1,0.5,0.9 dtypes=float32,bfloat16 reps=20
    profile_args=(--device cuda)
    run_args=(--device cuda --steps 10)
    scale=1
    configs=inductor,inductor@0.9,bittrain,bittrain-dense
    skip_kernel_tests=0
    gpt_args=(--device cuda --dim 512 --layers 4 --heads 8 --seq 512 --batch 16 --steps 200 --checkpoints 0,200
              --rounds 10 --bf16)
fi
{ [ $dry = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} 2>&1 | tee "$logs/env.txt"
status=0
summary="$out/summary.txt"
: > "$summary"
step() {  # step SECONDS NAME COMMAND...: run with a time limit (x scale), log to NAME.txt, one summary line
    local limit=$(($1 * scale)) name=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$logs/$name.txt" 2>&1
    rc=$?
    [ $rc = 0 ] || { status=1; echo "FAILED: $name (exit $rc$([ $rc = 124 ] && echo ', time limit'))"; }
    tail -n 25 "$logs/$name.txt"
    echo "$name: $([ $rc = 0 ] && echo ok || echo "FAILED, exit $rc") in $((SECONDS - start)) s" >> "$summary"
}
[ $skip_kernel_tests = 1 ] || step 60 kernel_tests python3 -m pytest -q -x -p no:cacheprovider tests/test_ops.py \
    tests/test_exponent_codec.py -k "cuda or triton"
step 45 kernels python3 benchmarks/kernel_speed.py --device $device --sizes $kernel_sizes --densities $densities \
    --dtypes $dtypes --reps $reps --out "$out/rows-kernels.jsonl"
step 40 kernels_exp python3 benchmarks/kernel_speed.py --device $device --codec exponent --sizes $kernel_sizes \
    --dtypes $dtypes --reps $reps --out "$out/rows-kernels.jsonl"
step 30 calibrate python3 -m bitfx calibrate "${profile_args[@]}" --out "$out/profile-$device.json"
[ -f "$out/profile-$device.json" ] && export BITFX_PROFILE="$out/profile-$device.json"
step 150 resnet50 python3 benchmarks/run.py --zoo gpu "${run_args[@]}" --autocast bf16 \
    --configs $configs --out "$out/rows-run.jsonl"
step 150 gpt python3 benchmarks/train_lm.py "${gpt_args[@]}" --out "$out/rows-train_lm.jsonl"
for f in "$out"/rows-*.jsonl; do
    [ -f "$f" ] && echo "$(basename "$f"): $(wc -l < "$f") rows" >> "$summary"
done
echo "gpu_check status: $status" | tee -a "$summary"
tar -czf "$out/logs.tgz" -C "$out" logs && rm -rf "$logs"
exit $status
