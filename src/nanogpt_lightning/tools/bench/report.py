"""Printing bench's report: the machine's matmul peaks, then each participant's times, throughput, share of
its precision's peak and memory, and the ratios between the loops."""

from __future__ import annotations

import os
import statistics

import torch
from omegaconf import DictConfig

from nanogpt_lightning.cpu_memory import OFF_SWITCH
from nanogpt_lightning.devices import MIXED_PRECISION_DTYPES
from nanogpt_lightning.model.fused_loss import onednn_in_use
from nanogpt_lightning.tools.bench.measure import MATMULS_PER_TURN, matmul_flops, matmul_size
from nanogpt_lightning.tools.bench.variants import FLOAT32, participant_name, precision_variants, variant_config
from nanogpt_lightning.train.run import build_datamodule, build_module


def report(cfg: DictConfig, device: torch.device, precisions: list[str], compiled: bool,
           measured: dict[str, tuple[list[float], int | None]], memory_method: str | None,
           logs_dir: str | None = None) -> None:
    """`measured`: each participant's seconds per timed iteration and peak memory; `logs_dir`: where the
    participants' logs were kept, if they were."""
    datamodule = build_datamodule(cfg)
    tokens = datamodule.batch_size * datamodule.block_size * cfg.trainer.accumulate_grad_batches
    model = build_module(variant_config(cfg, True, 1, device.type), datamodule, device).model
    flops = model.flops_per_token() * tokens
    matmul_times, _ = measured["matmul"]
    # bursts in turn: fp32 torch.mm, fp32 through the fused loss's matmul, then each low precision
    n_kinds = 1 + len(precisions)
    mm_peak, fused_peak, *low_peaks = (max(matmul_flops(device) / t for t in matmul_times[i::n_kinds])
                                       for i in range(n_kinds))
    peaks = dict(zip(precisions, [max(mm_peak, fused_peak), *low_peaks]))
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"\n== bench on {device.type}{threads}: {tokens} tokens/iteration "
          f"({datamodule.batch_size} x {datamodule.block_size} x {cfg.trainer.accumulate_grad_batches} "
          f"micro-batches), {model.num_params() / 1e6:.2f}M params, {flops / 1e9:.2f} GFLOP/iteration")
    fused_library = "oneDNN" if onednn_in_use(device, torch.float32) else "torch.mm again"
    bursts = len(matmul_times) // n_kinds
    print(f"fp32 matmul peak: {peaks[FLOAT32] / 1e9:.1f} GFLOP/s (best of {bursts} bursts of {MATMULS_PER_TURN} "
          f"{matmul_size(device)}^2 matmuls, interleaved: torch.mm {mm_peak / 1e9:.1f}, "
          f"{fused_library} {fused_peak / 1e9:.1f})")
    for precision in precisions[1:]:
        print(f"{precision} matmul peak: {peaks[precision] / 1e9:.1f} GFLOP/s (torch.mm in "
              f"{str(MIXED_PRECISION_DTYPES[precision]).removeprefix('torch.')}, interleaved with the above)")
    width = max(len(name) for name in measured) + 1
    print(f"{'variant':<{width}} {'ms/iter':>9} {'p25-p75 ms':>15} {'n':>4} {'tokens/s':>9} {'GFLOP/s':>8} "
          f"{'% peak':>7} {'peak MB':>8}")
    medians = {}
    for precision in precisions:
        for variant in precision_variants(precision, compiled):
            name = participant_name(variant, precision)
            times, mem = measured[name]
            times = sorted(times)
            medians[name] = median = statistics.median(times)
            q25, q75 = times[len(times) // 4], times[(3 * len(times)) // 4]
            mem_text = f"{mem / 2**20:.1f}" if mem is not None else "n/a"
            print(f"{name:<{width}} {1000 * median:>9.1f} {f'{1000 * q25:.1f}-{1000 * q75:.1f}':>15} "
                  f"{len(times):>4} {tokens / median:>9.0f} {flops / median / 1e9:>8.3g} "
                  f"{100 * flops / median / peaks[precision]:>6.3g}% {mem_text:>8}")
    print(f"time per iteration vs plain: lightning {medians['lightning'] / medians['plain']:.2f}x, "
          f"lightning+fused {medians['lightning+fused'] / medians['plain']:.2f}x; "
          f"vs plain+tuned: lightning+fused {medians['lightning+fused'] / medians['plain+tuned']:.2f}x")
    for precision in precisions[1:]:
        ours, plain = (medians[participant_name(v, precision)] for v in ("lightning+fused", "plain"))
        print(f"in {precision}: lightning+fused {ours / plain:.2f}x of plain in {precision}, "
              f"{ours / medians['lightning+fused']:.2f}x of lightning+fused in 32-true")
    if compiled:
        for precision in precisions:
            ours, plain = (medians[participant_name(v, precision)]
                           for v in ("lightning+fused+compile", "plain+compile"))
            best = min((medians[participant_name(v, precision)], v)
                       for v in ("lightning+fused", "lightning+fused+compile"))
            print(f"compiled, in {precision}: lightning+fused+compile {ours / plain:.2f}x of plain+compile; "
                  f"our faster loop ({best[1]}) {best[0] / plain:.2f}x of plain+compile")
    environment = {key: os.environ.get(key, "unset") for key in (OFF_SWITCH, "THP_MEM_ALLOC_ENABLE")}
    environment |= {key: value for key, value in os.environ.items() if key.startswith("MALLOC_")}
    print("plain+tuned: the plain loop with this package's CPU memory settings (huge pages, malloc: cpu_memory.py), "
          "as the lightning loops run them; here " + ", ".join(f"{k}={v}" for k, v in environment.items()))
    print(f"peak MB: memory of the warm-up iterations above the built model and data: "
          f"{memory_method or 'not measured on this device'}")
    logs = f"; logs in {logs_dir}" if logs_dir is not None else ""
    print(f"GFLOP/iteration: 6 x params x tokens + attention (PaLM appendix B){logs}")
