"""What every layer shares: model-ready examples and batches, per-example losses, causal-LM
examples, model modes, small files, and the one optimisation loop."""
