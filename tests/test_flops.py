"""MFU on the iteration lines: nanoGPT's FLOPs per token, the device's peak (datasheet or measured), the line."""

import re
from time import perf_counter

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from helpers import fit_tiny
from nanogpt_lightning import flops
from nanogpt_lightning.flops import compute_dtype, datasheet_peak, measured_peak, peak_flops
from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.model.gpt import GPT
from nanogpt_lightning.train.callbacks import IterationLogger


def test_flops_per_token_is_nanogpts_formula_counted_by_hand():
    model = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=2, n_head=2, n_embd=8))
    # N leaves out the position table (nanoGPT's get_num_params); the token table is lm_head's weight (tied)
    block = 8 + 8 * 3 * 8 + 8 * 8 + 8 + 8 * 4 * 8 + 4 * 8 * 8  # ln_1, c_attn, c_proj, ln_2, c_fc, mlp c_proj
    n = 10 * 8 + 2 * block + 8  # wte, the blocks, ln_f (no biases)
    assert model.num_params() == n == 1656
    L, H, Q, T = 2, 2, 4, 8
    assert model.flops_per_token() == 6 * n + 12 * L * H * Q * T == 11_472


def test_datasheet_peaks_of_known_gpus_in_the_dtype_that_runs():
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert datasheet_peak("NVIDIA A100-SXM4-40GB", torch.float32) == 19.5e12
    assert datasheet_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert datasheet_peak("NVIDIA H100 PCIe", torch.float16) == 756e12  # float16 at the bfloat16 rate
    assert datasheet_peak("NVIDIA H200", torch.float32) == 66.9e12
    assert datasheet_peak("NVIDIA L40S", torch.bfloat16) is None  # not L4
    assert datasheet_peak("Tesla T4", torch.bfloat16) is None
    assert [compute_dtype(p) for p in ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true")] == [
        torch.float32, torch.bfloat16, torch.float16, torch.bfloat16, torch.float64]


def test_a_known_gpu_is_rated_by_its_datasheet_and_tf32_counts(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    cuda = torch.device("cuda", 0)
    assert peak_flops(cuda, "bf16-mixed") == (312e12, "the NVIDIA A100-SXM4-80GB's datasheet bfloat16 peak", False)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # matmul_precision=high: TF32
    assert peak_flops(cuda, "32-true") == (156e12, "the NVIDIA A100-SXM4-80GB's datasheet tf32 peak", False)
    assert peak_flops(cuda, "32-true", again=True).flops == 156e12  # a datasheet's is never measured again


def test_a_cpu_peak_is_measured_quickly_once_per_process_leaving_the_random_state():
    measured_peak.cache_clear()
    random_state = torch.get_rng_state()
    start = perf_counter()
    peak, source, measured = peak_flops(torch.device("cpu"), "32-true")
    assert perf_counter() - start < 0.5 + flops.MEASURE_SECONDS
    assert torch.equal(torch.get_rng_state(), random_state)  # the run's random numbers are untouched
    assert 1e9 < peak < 1e14 and source.startswith("a float32 matmul peak measured on this cpu with ") and measured
    assert peak_flops(torch.device("cpu"), "32-true")[0] == peak  # not measured again


def test_iteration_lines_carry_mfu_and_it_is_logged(tmp_path, capsys):
    run = tmp_path / "run"
    trainer = fit_tiny(run, 4, IterationLogger(), logger=CSVLogger(run, name="csv"))
    printed = capsys.readouterr().out
    note = re.search(r"^mfu: the model's flops per second against a float32 matmul peak measured on this cpu "
                     r"with \d+ threads? \((\S+) TFLOP/s\)$", printed, re.M)
    lines = re.findall(r"^iter (\d+): loss \d+\.\d{4}, time (\d+\.\d{2})ms, mfu (\d+\.\d{2})%$", printed, re.M)
    assert note and [int(n) for n, *_ in lines] == [1, 2, 3, 4]
    assert printed.index(note[0]) < printed.index("iter 1:")  # named once, before the first line
    flops_per_iteration = trainer.lightning_module.model.flops_per_token() * 2 * 8  # fit_tiny: batch 2 x block 8
    for _, ms, mfu in lines:
        assert 0 < float(mfu) < 100  # a tiny model, far from the peak
        expected = 100 * flops_per_iteration / (float(ms) / 1000) / (float(note[1]) * 1e12)
        assert float(mfu) == pytest.approx(expected, rel=0.02, abs=0.01)  # the printed figures are rounded
    header = (run / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "perf/mfu" in header.split(",")


def test_a_peak_measured_on_a_busy_machine_is_measured_again_when_the_model_beats_it(tmp_path, capsys, monkeypatch):
    """A CPU busy with something else during the first measurement gives a low peak: mfu over 100% is never
    printed; the peak is measured again (here: the first measurement made a million times too low)."""
    measured_peak.cache_clear()
    true_peak = measured_peak(torch.device("cpu"), torch.float32)
    taken = []

    def busy_first_time(device, dtype):  # the first measurement on a busy machine, then a quiet one
        taken.append(dtype)
        return true_peak / 1e6 if len(taken) == 1 else true_peak

    busy_first_time.cache_clear = lambda: None
    monkeypatch.setattr(flops, "measured_peak", busy_first_time)
    fit_tiny(tmp_path / "run", 2, IterationLogger())
    printed = capsys.readouterr().out
    again = re.findall(r"^mfu: the peak measured again, the first was low: (\S+) TFLOP/s$", printed, re.M)
    assert len(again) == 1 and float(again[0]) * 1e12 > true_peak / 1e6 and len(taken) == 2
    assert all(0 < float(mfu) <= 100 for mfu in re.findall(r", mfu (\d+\.\d{2})%$", printed, re.M))
