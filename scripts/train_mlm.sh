#!/usr/bin/env bash
# The masked-LM job: pretrain a small bidirectional Performer (and, for comparison, a same-size softmax BERT) on the
# embedded corpus with examples/train_mlm.py; prints the results table and a fill-mask example. One thread and a
# fixed seed (42), as scripts/train.sh. Extra arguments go to examples/train_mlm.py.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
THREADS=${TORCH_THREADS:-1}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
.venv/bin/python examples/train_mlm.py --compare_bert --torch_threads "$THREADS" "$@"
