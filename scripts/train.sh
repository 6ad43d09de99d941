#!/usr/bin/env bash
# Sets everything up, then runs the main job: train a small Performer LM on the embedded corpus and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/train_clm.py "$@"
