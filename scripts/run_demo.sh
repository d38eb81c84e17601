#!/usr/bin/env bash
# One command: set up the environment, then run the end-to-end unlearning demo (MiniLM + tweets).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python examples/demo_tweets.py "$@"
