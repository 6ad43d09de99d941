#!/usr/bin/env bash
# Sets everything up, then runs the main job: train a small Performer LM on the embedded corpus and generate.
# Deterministic: a fixed seed (42; data order, weights, feature redraws) and a fixed thread count (TORCH_THREADS,
# default 1) give the same losses bit for bit on the same machine and software; results differ between thread counts
# (a float sum's order depends on how it is split between threads). Extra arguments go to examples/train_clm.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One thread: on a shared 2-core machine two threads wait for each other (see choose_cpu_threads in train_clm.py).
THREADS=${TORCH_THREADS:-1}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
.venv/bin/python examples/train_clm.py --torch_threads "$THREADS" "$@"
