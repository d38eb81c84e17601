#!/usr/bin/env bash
# One command: set up the environment, then regenerate every table and plot in
# benchmarks/results/ — tweets classification (random + mislabelled requests, every baseline,
# relearning attack, 10 successive requests), TOFU-mini on SmolLM2-135M, and S3T.
# Measured alone on 2 CPU cores with the fine-tuned originals cached: tweets 40 min, TOFU-mini
# 32 min, S3T 10 min (a first run adds ~10 min of fine-tuning; they are cached afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
start=$(date +%s)
python benchmarks/tweets.py
python benchmarks/tofu_mini.py
python benchmarks/s3t_tweets.py --clock cpu --threads 1
echo "all benchmarks done in $(( $(date +%s) - start )) s; tables and plots in benchmarks/results/"
