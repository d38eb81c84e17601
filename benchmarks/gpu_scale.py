"""Seconds per phase and peak memory of ``unlearn()`` on a Llama of Llama-3.2-1B's shape.

The workload: a random-init Llama (timing needs no trained weights) unlearns ``--sequences``
sequences of ``--tokens`` tokens (the forget set; as many retain sequences), GradDiff with a
step budget of one pass over the forget set. The yardstick is one forward + backward pass of the
full model (every parameter's gradient) over the forget set's tokens, in the same process and
precision. Variants: MAPE (sparsity 0.9) and full-parameter GradDiff (``selection="all"``),
each in a fresh process, at 1 process and, with ``--processes 2``, at 2 (``torchrun``; on CUDA
one device per process).

    python benchmarks/gpu_scale.py --device cuda                    # the 1B shape, bf16, 1024 x 512
    python benchmarks/gpu_scale.py --size cpu --processes 1,2       # a small shape on CPU (default)

Writes ``benchmarks/results/gpu_scale_<size>.{json,md}``; the device is named in both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Llama-3.2-1B: hidden 2048, 16 layers, 32 query / 8 key-value heads, FFN 8192, vocab 128256.
SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256),
    "cpu": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1024, vocab_size=8192),
}
WORKLOADS = {"1b": dict(sequences=1024, tokens=512, batch_size=16, dtype="bfloat16"),
             "cpu": dict(sequences=64, tokens=128, batch_size=8, dtype="float32")}
VARIANTS = {"MAPE GradDiff (sparsity 0.9)": None, "full-parameter GradDiff": "all"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), default=None, help="default: 1b on CUDA, cpu otherwise")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", default="1", help="comma-separated process counts, e.g. 1,2")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all (split between processes)")
    parser.add_argument("--sequences", type=int)
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.size or ("1b" if args.device.startswith("cuda") else "cpu")
    for key, value in WORKLOADS[args.size].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.out = args.out or HERE / "results" / f"gpu_scale_{args.size}"
    return args


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores visible)"


def run_variant(args) -> dict:
    """One variant in this process (one rank of it under torchrun)."""
    import torch
    import torch.distributed as dist
    import transformers as T
    from peft import get_peft_model

    from mape_devkit.profiling import measure
    from peft_mape import MAPEConfig, is_main_process
    from peft_mape.common.data import make_loader
    from peft_mape.common.distributed import RowShard, join_launch, world_size

    join_launch()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, args.threads // world_size()))
    dtype = getattr(torch, args.dtype)
    config = T.LlamaConfig(**SHAPES[args.size], max_position_embeddings=max(args.tokens, 128), tie_word_embeddings=True)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    generator = torch.Generator().manual_seed(1)

    def sequences(n):
        ids = torch.randint(0, config.vocab_size, (n, args.tokens), generator=generator)
        return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]

    forget, retain = sequences(args.sequences), sequences(args.sequences)

    # The yardstick: one forward + backward of the whole model over the forget set (this rank's share).
    shard = RowShard(make_loader(forget, args.batch_size))
    for p in model.parameters():
        p.requires_grad_(True)
    with measure(device) as yardstick:
        for batch in shard:
            batch = {k: v.to(device) for k, v in batch.items()}
            model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)

    peft_model = get_peft_model(model, MAPEConfig(sparsity=0.9))
    steps = max(1, args.sequences // args.batch_size)
    with measure(device) as used:
        report = peft_model.unlearn(forget, retain, selection=VARIANTS[args.variant], max_steps=steps,
                                    batch_size=args.batch_size, progress=False)
    if dist.is_initialized():
        dist.barrier()
    return {"variant": args.variant, "processes": world_size(), "main": is_main_process(),
            "device": device_name(device), "dtype": args.dtype, "size": args.size, "shape": SHAPES[args.size],
            "sequences": args.sequences, "tokens": args.tokens, "batch_size": args.batch_size, "steps": steps,
            "yardstick_seconds": yardstick.seconds, "yardstick_peak_mb": yardstick.peak_memory_mb,
            "unlearn_seconds": used.seconds, "unlearn_peak_mb": used.peak_memory_mb,
            "phase_seconds": report.seconds, "trainable_parameters": report.trainable_parameters}


def markdown(rows: list[dict]) -> str:
    first = rows[0]
    lines = [f"`unlearn()` on a random-init Llama ({first['size']} shape: {first['shape']}), {first['dtype']}, "
             f"{first['sequences']} forget + {first['sequences']} retain sequences x {first['tokens']} tokens, batch "
             f"{first['batch_size']}, {first['steps']} GradDiff steps; device: {first['device']}. The yardstick is one "
             "forward + backward of the whole model over the forget tokens; peak memory is the growth during the "
             "call (CUDA: allocated tensors; CPU: resident set).", "",
             "| variant | processes | trainable | statistics s | search s | update s | evaluation s | unlearn s "
             "| x one fwd+bwd | peak MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["phase_seconds"]
        lines.append(f"| {r['variant']} | {r['processes']} | {r['trainable_parameters']:,} | {s['statistics']:.1f} | "
                     f"{s['search']:.1f} | {s['update']:.1f} | {s['evaluation']:.1f} | {r['unlearn_seconds']:.1f} | "
                     f"{r['unlearn_seconds'] / r['yardstick_seconds']:.1f} | {r['unlearn_peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        result = run_variant(args)
        if result["main"]:
            args.result.write_text(json.dumps(result))
        return
    rows, scratch = [], args.out.with_suffix(".part.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), OMP_NUM_THREADS="1")
    for processes in [int(p) for p in args.processes.split(",")]:
        for variant in VARIANTS:
            launcher = ([sys.executable] if processes == 1 else
                        [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node",
                         str(processes)])
            command = launcher + [__file__, "--variant", variant, "--result", str(scratch), "--size", args.size,
                                  "--device", args.device, "--threads", str(args.threads), "--sequences",
                                  str(args.sequences), "--tokens", str(args.tokens), "--batch-size",
                                  str(args.batch_size)]
            clock = time.perf_counter()
            subprocess.run(command, check=True, env=env)
            rows.append(json.loads(scratch.read_text()))
            print(f"{variant} x{processes}: unlearn {rows[-1]['unlearn_seconds']:.1f} s "
                  f"({time.perf_counter() - clock:.0f} s with start-up)", flush=True)
    scratch.unlink(missing_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
