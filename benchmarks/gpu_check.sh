#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (a user's, or a GPU CI job):
#   1. builds the CPU kernels and the CUDA kernels for the GPU that is present;
#   2. runs the ops tests, GPU checks included (they skip without a GPU elsewhere);
#   3. times FPS, kNN and a Point-MAE training step with our CUDA kernels against the
#      pure-torch path (and pointnet2_ops when it is installed), written to
#      benchmarks/results/ops_cuda.md (or $GPU_CHECK_OUT).
#
#   bash benchmarks/gpu_check.sh        # or: make gpu-check
#
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3). The
# repository is put on PYTHONPATH, so an uninstalled checkout works too.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() { printf '\n== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PYTHON" - <<'PY'
import sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device; nothing to check here")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, "
          f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
PY

step "build the kernels (CPU, and CUDA for the GPUs present; a recorded failure is retried)"
"$PYTHON" -m pointclora.ops.build cpu & cpu_build=$!
"$PYTHON" -m pointclora.ops.build cuda & cuda_build=$!
wait "$cpu_build"
wait "$cuda_build"

step "ops tests, GPU checks included"
"$PYTHON" -m pytest -v -rs -p no:cacheprovider tests/test_ops.py tests/test_cuda_build.py

step "FPS, kNN and training step: CUDA kernels against the pure-torch path"
"$PYTHON" benchmarks/bench_ops.py --device cuda --out "${GPU_CHECK_OUT:-benchmarks/results/ops_cuda.md}"
step "done"
