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
figure, as it would when training."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from nanogpt_lightning.cpu_memory import OFF_SWITCH, tune_cpu_memory
from nanogpt_lightning.devices import (
    MIXED_PRECISION_DTYPES,
    auto_precision,
    autocast_for,
    check_compile,
    check_precision,
    pick_device,
)
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.model.fused_loss import matmul, onednn_in_use
from nanogpt_lightning.train.run import build_datamodule, build_module, build_trainer
from nanogpt_lightning.train.settings import compose_train_config

MATMULS_PER_TURN = 5
VARIANTS = ("plain", "plain+tuned", "lightning", "lightning+fused")
LOW_PRECISION_VARIANTS = ("plain", "lightning+fused")  # the reference and ours, in each low precision
COMPILED_VARIANTS = ("plain+compile", "lightning+fused+compile")  # the same two compiled, in each precision
COMPILED = "+compile"
FLOAT32 = "32-true"
# environment of each variant's process: nanoGPT's loop as people run it, without the CPU memory settings
# (nor the huge-page switch that this process's tune_cpu_memory put in its environment); the others
# inherit this process's environment, as scripts/train.py runs (each applies tune_cpu_memory itself)
UNTUNED = {OFF_SWITCH: "0", "THP_MEM_ALLOC_ENABLE": "0"}
ENVIRONMENT = {"plain": UNTUNED}


def matmul_size(device: torch.device) -> int:
    return 2048 if device.type == "cpu" else 8192


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


class TrainingMemory:
    """Peak memory of the warm-up iterations above what the process held before the first one (model,
    data, and for Lightning its set-up): device allocator stats on cuda; on a Linux CPU the resident-set
    high-water mark, reset (/proc/self/clear_refs) after glibc's free memory is handed back (malloc_trim).
    Whatever a variant keeps from one iteration to the next (optimizer state, buffers) counts."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated minus memory_allocated before the first iteration"
        elif device.type == "cpu" and sys.platform == "linux":
            try:
                self._malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
                self.method = "VmHWM minus VmRSS before the first iteration (Linux /proc, after malloc_trim)"
            except (OSError, AttributeError):
                pass

    @staticmethod
    def _proc_status_bytes(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def start(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        if self.method is None:
            return None
        self._malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return self._proc_status_bytes("VmRSS")

    def peak_above(self, start: int | None) -> int | None:
        if start is None:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() - start
        return self._proc_status_bytes("VmHWM") - start


class Turns:
    """Lets the participants (processes) run one at a time, in order, each until it hands over; the
    first turn starts once all of them are built and waiting."""

    def __init__(self, n: int, context):
        self._cond = context.Condition()
        self._turn = context.Value("i", 0, lock=False)  # guarded by _cond
        self._done = context.Array("b", n, lock=False)
        self._ready = context.Barrier(n)

    def wait(self, i: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn.value == i)

    def wait_for_all_then_first_turn(self, i: int) -> None:
        self._ready.wait()
        self.wait(i)

    def abort(self) -> None:
        self._ready.abort()

    def hand_over(self, i: int, finished: bool = False) -> None:
        with self._cond:
            self._done[i] = self._done[i] or finished
            n = len(self._done)
            for k in range(1, n + 1):
                if not self._done[(i + k) % n]:
                    self._turn.value = (i + k) % n
                    break
            self._cond.notify_all()


@dataclass
class Clock:
    """Times one participant's iterations (`tick` ends one) and hands over at the end of each turn."""

    index: int
    turns: Turns
    turn_lengths: list[int]  # iterations per turn; the first turn is warm-up
    device: torch.device
    memory: TrainingMemory | None  # measures the warm-up iterations
    times: list[float] = field(default_factory=list)  # seconds of each iteration after warm-up
    peak_memory: int | None = None
    _ticks: int = 0
    _discard: bool = False

    def start(self) -> None:
        """Wait until every participant is built, then for this one's first turn."""
        self.turns.wait_for_all_then_first_turn(self.index)

    def begin_iterations(self) -> None:
        """Call right before the first iteration."""
        self._memory_start = self.memory.start() if self.memory is not None else None
        self._last = perf_counter()

    def discard_current(self) -> None:
        """Leave the running iteration out (e.g. it ran an evaluation)."""
        self._discard = True

    def tick(self) -> None:
        synchronize(self.device)
        elapsed = perf_counter() - self._last
        self._ticks += 1
        warmup = self.turn_lengths[0]
        if self._ticks > warmup and not self._discard:
            self.times.append(elapsed)
        self._discard = False
        if self.memory is not None and self._ticks == warmup:
            self.peak_memory = self.memory.peak_above(self._memory_start)
        ends = np.cumsum(self.turn_lengths)
        if self._ticks in ends[:-1]:  # after the last turn the loop ends and the participant hands over
            self.turns.hand_over(self.index)
            self.turns.wait(self.index)
        self._last = perf_counter()


class _LightningClock(L.Callback):
    """Ticks the clock at each optimizer step; an iteration that ran an evaluation is left out."""

    def __init__(self, clock: Clock):
        self.clock = clock

    def on_train_start(self, trainer, pl_module):
        self._step = trainer.global_step
        self.clock.begin_iterations()

    def on_validation_start(self, trainer, pl_module):
        self.clock.discard_current()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._step:
            self._step = trainer.global_step
            self.clock.tick()


def participant_name(variant: str, precision: str) -> str:
    return variant if precision == FLOAT32 else f"{variant} {precision}"


def precision_variants(precision: str, compiled: bool) -> tuple[str, ...]:
    """The loops timed in one precision: all four in float32, the reference and ours in a low one; with
    `compiled`, also those two compiled."""
    variants = VARIANTS if precision == FLOAT32 else LOW_PRECISION_VARIANTS
    return variants + (COMPILED_VARIANTS if compiled else ())


def plain_pytorch_loop(cfg: DictConfig, device: torch.device, iterations: int, clock: Clock,
                       compiled: bool = False) -> None:
    """nanoGPT's train.py loop, on the project's GPT with `F.cross_entropy` on the full logits; in a low
    precision under autocast, with a gradient scaler for float16 (nanoGPT's `ctx` and `scaler`); `compiled`:
    on torch.compile(model), as nanoGPT's `compile=True`."""
    datamodule = build_datamodule(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    model = build_module(cfg, datamodule).model.to(device)
    block_size, batch_size = datamodule.block_size, datamodule.batch_size
    accumulation = cfg.trainer.accumulate_grad_batches
    # nanoGPT uses the fused AdamW on cuda only
    optimizer = torch.optim.AdamW(model.optimizer_groups(cfg.optimizer.weight_decay), lr=cfg.optimizer.lr,
                                  betas=tuple(cfg.optimizer.betas), fused=device.type == "cuda")
    scheduler = instantiate(cfg.scheduler)(optimizer)  # sets the learning rate of each iteration
    if compiled:  # after the optimizer is built on its parameters, as nanoGPT does
        model = torch.compile(model)
    autocast = autocast_for(str(cfg.trainer.precision), device)
    scaler = torch.amp.GradScaler(device.type, enabled=str(cfg.trainer.precision) == "16-mixed")

    def get_batch():
        # nanoGPT recreates the memmap every batch to avoid a memory leak
        data = np.memmap(datamodule.prepared_dir / "train.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    clock.start()
    clock.begin_iterations()
    x, y = get_batch()
    for iteration in range(iterations):
        for _ in range(accumulation):
            with autocast:
                _, loss = model(x, y)
            loss = loss / accumulation
            x, y = get_batch()
            scaler.scale(loss).backward()
        if cfg.trainer.gradient_clip_val:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if iteration % cfg.log_interval == 0:  # nanoGPT's log line (its output goes to os.devnull here)
            print(f"plain iter {iteration}: loss {loss.item() * accumulation:.4f}", flush=True)
        clock.tick()


def lightning_loop(cfg: DictConfig, clock: Clock) -> None:
    """The Trainer train.py builds from the config (its callbacks and logger), plus the bench's clock."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    trainer = build_trainer(cfg, extra_callbacks=(_LightningClock(clock),))
    clock.start()
    trainer.fit(module, datamodule=datamodule)


def matmul_peak(device: torch.device, low_dtypes: list[torch.dtype], turns: int, clock: Clock) -> None:
    """Square matmuls, bursts in turn: fp32 through torch.mm's library (MKL on x86 CPUs), fp32 through the
    fused loss's (oneDNN there, see fused_loss.matmul), then torch.mm in each low precision; each kind's best
    burst is the machine's peak for it."""
    n = matmul_size(device)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    bursts = [(torch.mm, a, b), (matmul, a, b)] + [(torch.mm, a.to(dtype), b.to(dtype)) for dtype in low_dtypes]
    clock.start()
    clock.begin_iterations()
    for _ in range(turns):
        for product, left, right in bursts:
            for _ in range(MATMULS_PER_TURN):
                product(left, right)
            clock.tick()


def matmul_flops(device: torch.device) -> float:
    return MATMULS_PER_TURN * 2 * matmul_size(device) ** 3


def variant_config(cfg: DictConfig, fused_loss: bool, max_steps: int, accelerator: str,
                   precision: str = FLOAT32, compiled: bool = False) -> DictConfig:
    cfg = cfg.copy()
    cfg.model.fused_loss = fused_loss
    cfg.model.compile = compiled
    cfg.trainer.max_steps = max_steps
    cfg.trainer.accelerator = accelerator
    cfg.trainer.precision = precision
    return cfg


def bench_precisions(wanted: str, device: torch.device) -> list[str]:
    """32-true first, then the low precisions asked for (`auto`: what trainer.precision=auto picks here)."""
    precisions = [FLOAT32]
    for name in filter(None, (part.strip() for part in wanted.split(","))):
        name = auto_precision(device) if name == "auto" else name
        if name != FLOAT32 and name not in MIXED_PRECISION_DTYPES:
            raise UserError(f"--precisions takes 32-true, {', '.join(MIXED_PRECISION_DTYPES)} or auto, "
                            f"got {name!r}")
        check_precision(name, device, "--precisions")
        if name not in precisions:
            precisions.append(name)
    return precisions


# kinds of a participant's error, the most telling first: the one reported when several fail
USER_ERROR, FAILURE, ECHO_OF_ANOTHER = 0, 1, 2


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """Sets environment variables for what starts inside, e.g. a process."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _silence_output() -> None:
    """Send this process's stdout and stderr (progress bar, iteration lines, Lightning's notes, also what C
    code writes) to os.devnull: the bench prints its table only. Errors come back through the results queue."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (sys.stdout.fileno(), sys.stderr.fileno()):
        os.dup2(devnull, fd)
    os.close(devnull)


def _participant(name: str, variant: str, precision: str, index: int, overrides: list[str], output_dir: str,
                 low_dtypes: list[torch.dtype], warmup: int, rounds: int, steps: int, turns: Turns,
                 results) -> None:
    """One participant's process: build it, take its turns, send back (name, times, peak memory, error)."""
    try:
        _silence_output()
        # the malloc settings belong to a process, and importing the package does not make them: each
        # participant makes its own before it builds anything, unless its environment turns them off
        # (`plain`); PyTorch's huge-page switch it inherits through the environment (torch has allocated by now)
        tune_cpu_memory()
        cfg = compose_train_config(overrides, output_dir)
        device = pick_device(cfg.trainer.accelerator, "trainer.accelerator")
        if variant == "matmul":
            bursts = 2 + len(low_dtypes)
            clock = Clock(index, turns, [bursts] * (rounds + 1), device, None)
            matmul_peak(device, low_dtypes, rounds + 1, clock)
        else:
            clock = Clock(index, turns, [warmup] + [steps] * rounds, device, TrainingMemory(device))
            iterations = warmup + rounds * steps
            compiled = variant.endswith(COMPILED)
            config = variant_config(cfg, variant.startswith("lightning+fused"), iterations, device.type, precision,
                                    compiled)
            if variant.startswith("plain"):
                plain_pytorch_loop(config, device, iterations, clock, compiled)
            else:
                lightning_loop(config, clock)
        results.put((name, clock.times, clock.peak_memory, None))
    except BaseException as err:  # noqa: BLE001 - every failure, Ctrl+C included, is sent back as a result
        turns.abort()  # no one waits for a participant that will never come
        if isinstance(err, UserError):
            error = (USER_ERROR, str(err))
        elif isinstance(err, threading.BrokenBarrierError):
            error = (ECHO_OF_ANOTHER, f"{name}: another participant failed")
        else:
            error = (FAILURE, traceback.format_exc())
        results.put((name, None, None, error))
    finally:
        turns.hand_over(index, finished=True)


def _collect(results, processes) -> list[tuple]:
    """One outcome per participant; a participant that died without sending one is an error."""
    outcomes = []
    while len(outcomes) < len(processes):
        try:
            outcomes.append(results.get(timeout=1.0))
        except queue.Empty:
            reported = {name for name, *_ in outcomes}
            for process in processes:
                if process.exitcode not in (None, 0) and process.name not in reported:
                    died = f"the {process.name} bench process died (exit code {process.exitcode})"
                    raise RuntimeError(died) from None
    return outcomes


def run(overrides: list[str], warmup: int, rounds: int, steps: int, precisions: str = "auto",
        compiled: bool | None = None) -> dict[str, tuple[list[float], int | None]]:
    """Returns each participant's seconds per timed iteration and peak memory. compiled: add the compiled
    variants (None: on cuda only)."""
    if warmup < 1 or rounds < 1 or steps < 1:
        raise UserError("need --warmup, --rounds and --steps >= 1")
    output_dir = tempfile.mkdtemp(prefix="nanogpt-bench-")
    cfg = compose_train_config(overrides, output_dir)
    if str(cfg.trainer.precision) not in ("32-true", "32"):
        raise UserError("bench.py sets each loop's precision itself; choose them with --precisions, "
                        "not trainer.precision")
    device = pick_device(cfg.trainer.accelerator, "trainer.accelerator")
    precisions = bench_precisions(precisions, device)
    compiled = device.type == "cuda" if compiled is None else compiled
    if compiled:
        check_compile(device, "bench.py --compile", "--no-compile")
    low_dtypes = [MIXED_PRECISION_DTYPES[p] for p in precisions[1:]]
    build_datamodule(cfg).prepare_data()
    participants = [("matmul", "matmul", FLOAT32)] + [
        (participant_name(variant, precision), variant, precision)
        for precision in precisions for variant in precision_variants(precision, compiled)]
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no thread pools carried over
    turns = Turns(len(participants), context)
    results = context.Queue()
    # not daemons: a Lightning variant may start DataLoader worker processes of its own
    processes = [
        context.Process(target=_participant, name=name,
                        args=(name, variant, precision, i, overrides, output_dir, low_dtypes, warmup, rounds,
                              steps, turns, results))
        for i, (name, variant, precision) in enumerate(participants)
    ]
    try:
        for process, (_, variant, _) in zip(processes, participants):
            with _environment(ENVIRONMENT.get(variant.removesuffix(COMPILED), {})):
                process.start()
        outcomes = _collect(results, processes)
    except BaseException:  # Ctrl+C, or a participant died: the others would wait for their turns forever
        for process in processes:
            if process.is_alive():
                process.terminate()
        raise
    finally:
        for process in processes:
            if process.pid is not None:
                process.join()
    errors = sorted(error for *_, error in outcomes if error is not None)
    if errors:
        kind, message = errors[0]
        raise UserError(message) if kind == USER_ERROR else RuntimeError(f"a bench process failed:\n{message}")
    measured = {name: (times, peak) for name, times, peak, _ in outcomes}
    report(cfg, device, precisions, compiled, measured, TrainingMemory(device).method, output_dir)
    return measured


def report(cfg: DictConfig, device: torch.device, precisions: list[str], compiled: bool,
           measured: dict[str, tuple[list[float], int | None]], memory_method: str | None, output_dir: str) -> None:
    datamodule = build_datamodule(cfg)
    tokens = datamodule.batch_size * datamodule.block_size * cfg.trainer.accumulate_grad_batches
    model = build_module(variant_config(cfg, True, 1, device.type), datamodule).model
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
    print(f"GFLOP/iteration: 6 x params x tokens + attention (PaLM appendix B); logs in {output_dir}")


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
    args, overrides = parser.parse_known_args(argv)
    run(overrides, args.warmup, args.rounds, args.steps, args.precisions, args.compile)
