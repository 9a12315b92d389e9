"""Time training iterations of one config several ways in one run, interleaved (the body of scripts/bench.py).

1. `plain`: nanoGPT's train.py loop (memmap batches, F.cross_entropy on the full logits), same GPT class,
   run as nanoGPT runs it: without this package's CPU memory settings (cpu_memory.py).
2. `plain+tuned`: the same with them, as this project runs: shows how much of the difference they make.
3. `lightning`: the real Trainer of the composed config (all callbacks, TensorBoard logger), fused loss off.
4. `lightning+fused`: the same with the fused output layer + loss on.

`--precisions` adds a dimension: in each low precision (bf16-mixed, 16-mixed; by default the one
`trainer.precision=auto` picks here, if not float32) `plain` runs under autocast as nanoGPT does on a GPU, and
`lightning+fused` runs with trainer.precision set to it. Each row's GFLOP/s is set against its own
precision's matmul peak.

`--compile` (the default on cuda, nanoGPT's own GPU setting) adds, in each precision, `plain+compile`: the
plain loop on `torch.compile(model)` as nanoGPT's train.py compiles it, and `lightning+fused+compile`:
`lightning+fused` with model.compile=true. Compiling happens in the warm-up iterations, which are not timed.

Each variant runs in its own process, but only one at a time: after `warmup` iterations, then after each
`steps` more, it hands over to the next one, so machine noise falls on all variants alike. Matmuls
take their turn too (fp32, and each low precision), giving the machine's peaks under the same
conditions. Processes, not threads: each variant keeps its own memory allocator and its own memory
figure, as it would when training.

The participants' runs (logs, checkpoints) go to a temporary folder, removed at the end unless `--keep-logs`.
Modules: variants (what is timed, each one's config), loops (the timed loops), turns (taking turns, the
clock), measure (device sync, matmul FLOPs, memory), runner (the participants' processes, `run`), report."""

from __future__ import annotations

import argparse

from nanogpt_lightning.tools.bench.runner import run


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="bench.py", description=__doc__.splitlines()[0],
        epilog="other arguments are Hydra overrides, e.g. experiment=m2_shakespeare trainer.accelerator=cuda")
    parser.add_argument("--warmup", type=int, default=3, help="iterations per variant left out first (default 3)")
    parser.add_argument("--rounds", type=int, default=5, help="turns per variant after warm-up (default 5)")
    parser.add_argument("--steps", type=int, default=4, help="iterations per turn (default 4)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time plain+compile and lightning+fused+compile (default: on cuda only)")
    parser.add_argument("--precisions", default="auto",
                        help="low precisions to add to 32-true, comma-separated: bf16-mixed, 16-mixed, or auto "
                             "(default: what trainer.precision=auto picks here; nothing more where that is 32-true)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the participants' temporary folder (logs, checkpoints) and say where it is "
                             "(default: removed at the end)")
    args, overrides = parser.parse_known_args(argv)
    run(overrides, args.warmup, args.rounds, args.steps, args.precisions, args.compile, args.keep_logs)
