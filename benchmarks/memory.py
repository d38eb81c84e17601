"""Peak memory of one ``unlearn()`` call on SmolLM2-135M: MAPE vs full-parameter GradDiff vs LoRA GA.

Each variant runs in a fresh process (so one run's freed-but-kept heap does not hide the next
one's), loads SmolLM2-135M in fp32, takes TOFU-mini's forget01 (40 QA pairs) and a retain sample,
and measures, around the ``unlearn()`` call alone, the peak growth of the resident set on CPU
(sampled every 50 ms; ``mape_devkit.profiling.measure``) or ``torch.cuda.max_memory_allocated``
on CUDA, after one no-grad batch has paged the memory-mapped weights in. Every variant runs the same fixed number of update steps: this measures memory, not
forgetting. Beside the measurement the table gives what the trainable tensors alone need: the
tensors, their gradients and Adam's two moments (4 x 4 bytes per fp32 parameter).

    python benchmarks/memory.py --threads 2            # ~5 min on 2 CPU cores
    python benchmarks/memory.py --device cuda          # on a GPU

Writes ``benchmarks/results/memory_smollm2.{json,md}`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "MAPE GradDiff (sparsity 0.9)": {"kind": "mape"},
    "MAPE GradDiff + gradient checkpointing": {"kind": "mape", "checkpointing": True},
    "full-parameter GradDiff (selection='all')": {"kind": "mape", "selection": "all"},
    "full-parameter GradDiff + gradient checkpointing": {"kind": "mape", "selection": "all", "checkpointing": True},
    "LoRA GA (rank 8 on every projection)": {"kind": "lora"},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="update steps of every variant")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--retain", type=int, default=128, help="retain examples (statistics sample)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated labels")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory_smollm2")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one variant in this process
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_one(args) -> dict:
    import torch
    from peft import get_peft_model

    sys.path.insert(0, str(HERE))
    import _tofu_setup as setup
    from mape_devkit.profiling import measure
    from peft_mape import MAPEConfig
    from peft_mape.baselines import lora_unlearn
    from peft_mape.common.data import pad_collate, to_device

    torch.set_num_threads(args.threads)
    variant = VARIANTS[args.one]
    tokenizer = setup.load_tokenizer()
    recipe = setup.Recipe()
    forget = setup.as_examples(setup.qa_dataset(tokenizer, setup.load_split("forget01"), recipe))
    retain = setup.as_examples(setup.qa_dataset(tokenizer, setup.load_split("retain300")[:args.retain], recipe))
    model = setup.load_base_model().to(args.device)
    if variant.get("checkpointing"):
        model.gradient_checkpointing_enable()
    # The weights are memory-mapped from the checkpoint: the first pass over them would count them
    # as growth. One no-grad batch first pages them in (and warms the allocator) for every variant.
    with torch.no_grad():
        model(**to_device(pad_collate(forget[:args.batch_size]), args.device))
    options = dict(max_steps=args.steps, batch_size=args.batch_size, progress=False)
    if variant["kind"] == "lora":
        with measure(args.device) as used:
            peft_model, report = lora_unlearn(model, forget, retain, method="ga", **options)
        trainable = report["trainable_parameters"]
        seconds = report["seconds"]
    else:
        peft_model = get_peft_model(model, MAPEConfig(sparsity=0.9))
        with measure(args.device) as used:
            report = peft_model.unlearn(forget, retain, selection=variant.get("selection"), **options).to_dict()
        trainable, seconds = report["trainable_parameters"], report["seconds"]
    return {"variant": args.one, "peak_growth_mb": used.peak_memory_mb, "seconds": used.seconds,
            "phase_seconds": seconds, "trainable_parameters": trainable,
            "trainable_state_mb": trainable * 16 / 2**20, "steps": args.steps, "device": args.device,
            "forget_examples": len(forget), "retain_examples": len(retain), "batch_size": args.batch_size}


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"Peak memory growth of one `unlearn()` call on SmolLM2-135M (fp32, {device}), forget01 "
             f"({rows[0]['forget_examples']} QA pairs), {rows[0]['retain_examples']} retain examples, batch "
             f"{rows[0]['batch_size']}, {rows[0]['steps']} update steps each.", "",
             "| variant | trainable parameters | tensors + grads + Adam (MB) | measured peak growth (MB) | seconds |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['trainable_parameters']:,} | {r['trainable_state_mb']:.0f} | "
                     f"{r['peak_growth_mb']:.0f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        args.result.write_text(json.dumps(run_one(args)))
        return
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = args.out.with_suffix(".part.json")
    for label in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if label not in VARIANTS:
            raise SystemExit(f"unknown variant {label!r}; choose from {list(VARIANTS)}")
        command = [sys.executable, __file__, "--one", label, "--result", str(scratch), "--device", args.device,
                   "--threads", str(args.threads), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--retain", str(args.retain)]
        subprocess.run(command, check=True, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
        rows.append(json.loads(scratch.read_text()))
        print(f"{label}: peak +{rows[-1]['peak_growth_mb']:.0f} MB, {rows[-1]['seconds']:.1f} s", flush=True)
    scratch.unlink(missing_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows, args.device))
    print(markdown(rows, args.device))


if __name__ == "__main__":
    main()
