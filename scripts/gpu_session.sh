#!/usr/bin/env bash
# Everything issue 16 needs from a lent GPU (H100/H200), in one call of the device tool: correctness first, then
# the benchmarks. Each section writes its output to $OUT/<section>.txt and has its own time limit, so a hang or a
# failure in one leaves the others their time; a summary (each section's exit status and last lines) is printed last.
#
# Prepare here (no GPU needed), then make ONE device call from the repository root:
#     bash scripts/gpu_wheels.sh              # wheels of what the device image lacks, into .whl/ (git-ignored)
#     device run: carry [".whl"], timeout_s 590,
#                 command "COMMIT=<git rev-parse --short HEAD> bash scripts/gpu_session.sh"
# SECTIONS="tests norm" (a subset, in order) reruns some sections on a machine that is still warm.
# Record what comes back verbatim under benchmarks/results/ and the ratio tables in BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_session}"
mkdir -p "$OUT"
SECTIONS="${SECTIONS:-env tests kernels optimizer norm trainer}"
export PYTHON="${PYTHON:-python3}" OUT COMMIT="${COMMIT:-unknown}"
# The package from the working tree; Triton compiles for the GPU (the test suite otherwise picks the interpreter).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

declare -A LIMIT=([env]=30 [tests]=160 [kernels]=40 [optimizer]=90 [norm]=120 [trainer]=120)
declare -A STATUS=()

section_env() {
    date -u
    echo "commit ${COMMIT:-unknown}"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    "$PYTHON" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(), "| SMs", torch.cuda.get_device_properties(0).multi_processor_count)
for name in ("triton", "transformers", "accelerate", "peft", "bitsandbytes", "liger_kernel", "pytorch_optimizer"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # report whatever is missing, then go on
        print(name, "not available:", type(error).__name__, str(error)[:80])
EOF
}

section_tests() {
    local workers=()
    "$PYTHON" -c "import xdist" 2>/dev/null && workers=(-n 6)  # pytest-xdist: compile in parallel
    "$PYTHON" -m pytest -q -p no:cacheprovider -rfEs "${workers[@]}" tests/gpu/test_gns_norm_gpu.py tests/gpu/test_stable_spam_gpu.py
}

section_kernels() {
    "$PYTHON" benchmarks/kernel_resources.py --quick --check --sms "$("$PYTHON" -c \
        'import torch; print(torch.cuda.get_device_properties(0).multi_processor_count)')"
}

section_optimizer() {
    "$PYTHON" benchmarks/optimizer_step.py --device cuda --model 1b --dtype bfloat16 --repeats 20 \
        && "$PYTHON" benchmarks/optimizer_step.py --device cuda --model 1b --dtype float32 --repeats 20
}

section_norm() {
    "$PYTHON" benchmarks/norm_kernels.py --device cuda --repeats 30 \
        && "$PYTHON" benchmarks/norm_kernels.py --device cuda --dtype float32 --hidden 4096 --repeats 30
}

section_trainer() {
    "$PYTHON" benchmarks/trainer_throughput.py --size 1b --batch 8 --warmup-steps 3 --timed-steps 12 \
        --output "$OUT/trainer.json"
}

for name in $SECTIONS; do
    echo "=== $name (limit ${LIMIT[$name]} s) ==="
    start=$SECONDS
    # shellcheck disable=SC2034  # the function runs in the subshell that timeout starts
    timeout --signal=KILL "${LIMIT[$name]}" bash -c "$(declare -f "section_$name"); section_$name" \
        >"$OUT/$name.txt" 2>&1
    STATUS[$name]=$?
    echo "exit ${STATUS[$name]} after $((SECONDS - start)) s"
done

echo
echo "=== summary (full outputs under \$OUT) ==="
for name in $SECTIONS; do
    echo "--- $name: exit ${STATUS[$name]}"
    tail -n 12 "$OUT/$name.txt"
done
