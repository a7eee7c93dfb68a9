#!/usr/bin/env bash
# One command on a fresh machine: install everything, then run the offline demo
# (Fashion-MNIST + EfficientNet-Lite0: embed, train a DKVB and a linear head, unlearn each class
# with every method, print the table). Extra arguments go to `dkvb run`, e.g. --set seed=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m dkvb run experiments/fashion_mnist_effnet_lite0.yaml "$@"
