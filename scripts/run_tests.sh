#!/usr/bin/env bash
# One command: set up the environment, then run the whole test suite (pytest).
# Pass pytest arguments through, e.g. `bash scripts/run_tests.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m pytest "$@"
