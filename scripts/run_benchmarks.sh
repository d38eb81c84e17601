#!/usr/bin/env bash
# One command: set up the environment, then regenerate every table and plot in
# benchmarks/results/ — tweets classification (random + mislabelled requests, every baseline,
# relearning attack, 10 successive requests), TOFU-mini on SmolLM2-135M, S3T and LLMEraser edits.
# The parts run one after another, each with two torch threads on the two cores: two such jobs
# at once oversubscribe the cores and every timing in the tables would be inflated.
# Times: README, "Benchmark results".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
start=$(date +%s)
python benchmarks/tweets.py --threads 2
python benchmarks/tofu_mini.py --threads 2
python benchmarks/s3t_tweets.py --train 2000 --epochs 2 --budgets 1,2 --deletions 0,1,4,16 --clock wall --threads 2
python benchmarks/llmeraser_tweets.py --threads 2
python benchmarks/llmeraser_tofu.py --threads 2
python benchmarks/s3t_tofu.py --threads 2
python benchmarks/memory.py --threads 2
python benchmarks/gpu_scale.py --processes 1,2 --threads 2
echo "all benchmarks done in $(( $(date +%s) - start )) s; tables and plots in benchmarks/results/"
