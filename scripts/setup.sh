#!/usr/bin/env bash
# Install dkvb and everything it needs into the active Python environment (a fresh venv is fine).
# Fashion-MNIST comes from Debian's dataset-fashion-mnist package when apt is available (offline
# machines); elsewhere torchvision downloads it on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1; then
    echo "setup: could not apt-get install dataset-fashion-mnist; torchvision will download Fashion-MNIST instead" >&2
  fi
fi

"$PY" -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
"$PY" -m pip install -q --disable-pip-version-check -e ".[dev]"
"$PY" -c "import dkvb, faiss, fvcore, open_clip, efficientnet_lite_pytorch; print('dkvb', dkvb.__version__, 'installed')"
