"""Helpers of the tests, the demo and the benchmarks (offline assets, time and memory
measurement); not part of the installed ``peft_mape`` package."""
