"""Running the participants: each in its own process (with its own environment, its output silenced),
one at a time through Turns; collecting their outcomes; `run`, which does all of it and prints the report."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import shutil
import sys
import tempfile
import threading
import traceback

import torch

from nanogpt_lightning.cpu_memory import OFF_SWITCH, tune_cpu_memory
from nanogpt_lightning.devices import MIXED_PRECISION_DTYPES, check_compile, pick_device
from nanogpt_lightning.errors import UserError, naming
from nanogpt_lightning.tools.bench.loops import lightning_loop, matmul_bursts, plain_pytorch_loop
from nanogpt_lightning.tools.bench.measure import TrainingMemory
from nanogpt_lightning.tools.bench.report import report
from nanogpt_lightning.tools.bench.turns import Clock, Turns
from nanogpt_lightning.tools.bench.variants import (
    COMPILED,
    FLOAT32,
    bench_precisions,
    participant_name,
    precision_variants,
    variant_config,
)
from nanogpt_lightning.train.run import build_datamodule
from nanogpt_lightning.train.settings import compose_train_config

# environment of each variant's process: nanoGPT's loop as people run it, without the CPU memory settings
# (nor the huge-page switch that this process's tune_cpu_memory put in its environment); the others
# inherit this process's environment, as scripts/train.py runs (each applies tune_cpu_memory itself)
UNTUNED = {OFF_SWITCH: "0", "THP_MEM_ALLOC_ENABLE": "0"}
ENVIRONMENT = {"plain": UNTUNED}

# kinds of a participant's error, the most telling first: the one reported when several fail
USER_ERROR, FAILURE, ECHO_OF_ANOTHER = 0, 1, 2


@contextlib.contextmanager
def environment_set(values: dict[str, str]):
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


def silence_output() -> None:
    """Send this process's stdout and stderr (progress bar, iteration lines, Lightning's notes, also what C
    code writes) to os.devnull: the bench prints its table only. Errors come back through the results queue."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (sys.stdout.fileno(), sys.stderr.fileno()):
        os.dup2(devnull, fd)
    os.close(devnull)


def participant_process(name: str, variant: str, precision: str, index: int, overrides: list[str],
                        output_dir: str, low_dtypes: list[torch.dtype], warmup: int, rounds: int, steps: int,
                        turns: Turns, results) -> None:
    """One participant's process: build it, take its turns, send back (name, times, peak memory, error)."""
    try:
        silence_output()
        # the malloc settings belong to a process, and importing the package does not make them: each
        # participant makes its own before it builds anything, unless its environment turns them off
        # (`plain`); PyTorch's huge-page switch it inherits through the environment (torch has allocated by now)
        tune_cpu_memory()
        cfg = compose_train_config(overrides, output_dir)
        with naming(key="trainer.accelerator"):
            device = pick_device(cfg.trainer.accelerator)
        if variant == "matmul":
            bursts = 2 + len(low_dtypes)
            clock = Clock(index, turns, [bursts] * (rounds + 1), device, None)
            matmul_bursts(device, low_dtypes, rounds + 1, clock)
        else:
            clock = Clock(index, turns, [warmup] + [steps] * rounds, device, TrainingMemory(device))
            iterations = warmup + rounds * steps
            compiled = variant.endswith(COMPILED)
            config = variant_config(cfg, variant.startswith("lightning+fused"), iterations, device.type, precision,
                                    compiled)
            if variant.startswith("plain"):
                plain_pytorch_loop(config, device, iterations, clock, compiled)
            else:
                lightning_loop(config, device, clock)
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


def collect_outcomes(results, processes) -> list[tuple]:
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


@contextlib.contextmanager
def logs_folder(keep: bool):
    """A new temporary folder for the participants' runs (logs, checkpoints); removed at the end unless `keep`."""
    path = tempfile.mkdtemp(prefix="nanogpt-bench-")
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def run(overrides: list[str], warmup: int, rounds: int, steps: int, precisions: str = "auto",
        compiled: bool | None = None, keep_logs: bool = False) -> dict[str, tuple[list[float], int | None]]:
    """Returns each participant's seconds per timed iteration and peak memory. compiled: add the compiled
    variants (None: on cuda only). keep_logs: keep the participants' temporary folder (the report says where)."""
    if warmup < 1 or rounds < 1 or steps < 1:
        raise UserError("need --warmup, --rounds and --steps >= 1")
    with logs_folder(keep_logs) as output_dir:
        cfg = compose_train_config(overrides, output_dir)
        if str(cfg.trainer.precision) not in ("32-true", "32"):
            raise UserError("bench.py sets each loop's precision itself; choose them with --precisions, "
                            "not trainer.precision")
        if cfg.budget_s is not None:
            raise UserError(f"bench.py times a fixed number of iterations (--warmup, --rounds, --steps), not a "
                            f"time budget: got budget_s={cfg.budget_s:g}; pass budget_s=null")
        with naming(key="trainer.accelerator"):
            device = pick_device(cfg.trainer.accelerator)
        precisions = bench_precisions(precisions, device)
        compiled = device.type == "cuda" if compiled is None else compiled
        if compiled:
            with naming(asked_by="bench.py --compile", switch_off="--no-compile"):
                check_compile(device)
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
            context.Process(target=participant_process, name=name,
                            args=(name, variant, precision, i, overrides, output_dir, low_dtypes, warmup, rounds,
                                  steps, turns, results))
            for i, (name, variant, precision) in enumerate(participants)
        ]
        try:
            for process, (_, variant, _) in zip(processes, participants):
                with environment_set(ENVIRONMENT.get(variant.removesuffix(COMPILED), {})):
                    process.start()
            outcomes = collect_outcomes(results, processes)
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
        report(cfg, device, precisions, compiled, measured, TrainingMemory(device).method,
               output_dir if keep_logs else None)
    return measured
