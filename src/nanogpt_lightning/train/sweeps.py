"""Sweeps (-m, Optuna) that outlive their failures: every job runs, each failure is reported, Ctrl+C stops them.

A job runs wherever the launcher puts it (this process, a joblib worker, a SLURM node), so each job writes
what became of it into the sweep directory (`.jobs/<job number>.json`); `SweepReport.on_multirun_end`, in
the main process after the sweeper (and after Optuna wrote its results), reads them back, prints the summary
and picks the exit status. A failed job returns None, which the Optuna sweeper records as a failed trial, and
the sweep goes on (not NaN: optuna 2.10 refuses to be told NaN, and the sweeper then dies telling it again);
so does a job whose value (the final val loss) is NaN or infinite.
A job stopped by Ctrl+C or SIGTERM (saved by callbacks.GracefulInterrupt) also writes `.jobs/stop`: the jobs
after it find it and do not start.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig

from nanogpt_lightning.console import say
from nanogpt_lightning.errors import TrainingInterrupted, UserError
from nanogpt_lightning.files import write_whole

JOBS_DIR = ".jobs"  # under hydra.sweep.dir
STOP_FILE = "stop"  # in JOBS_DIR: the sweep is stopping, no further job starts
SHARED_FILE = "shared_keys.json"  # in JOBS_DIR: the keys every job sets alike; a job is named by its other overrides

def _keys(overrides: list[str]) -> list[str]:
    return [o.get_key_element() for o in OverridesParser.create().parse_overrides(overrides)]


def describe(num: int, overrides: list[str]) -> str:
    return f"job {num} ({' '.join(overrides)})"


def _write(path: Path, record) -> None:
    """Written whole: the main process never reads half a record."""
    write_whole(path, json.dumps(record).encode())


def report_sweep_job(main):
    """Decorate the task function: a sweep's job records its outcome instead of ending the sweep.

    A failure prints `error: job N (overrides): <message>` (an unexpected exception its traceback first) and
    returns None; Ctrl+C or SIGTERM stops the job (saved) and the sweep. A single run is left as it is.
    """

    @functools.wraps(main)
    def wrapper(cfg: DictConfig) -> float | None:
        hydra = HydraConfig.get()
        if hydra.mode != RunMode.MULTIRUN:
            return main(cfg)
        jobs = Path(hydra.sweep.dir) / JOBS_DIR
        shared = json.loads((jobs / SHARED_FILE).read_text()) if (jobs / SHARED_FILE).exists() else []
        overrides = [o for o, key in zip(hydra.overrides.task, _keys(list(hydra.overrides.task))) if key not in shared]
        record = {"num": hydra.job.num, "overrides": overrides, "output_dir": hydra.runtime.output_dir}
        path = jobs / f"{hydra.job.num}.json"
        if (jobs / STOP_FILE).exists():
            _write(path, {**record, "status": "not run"})
            return None
        try:
            value = main(cfg)
        except (TrainingInterrupted, KeyboardInterrupt) as stop:
            signum = stop.signum if isinstance(stop, TrainingInterrupted) else signal.SIGINT
            _write(path, {**record, "status": "stopped", "signal": signal.Signals(signum).name,
                          "step": getattr(stop, "step", None)})
            _write(jobs / STOP_FILE, {"signal": signal.Signals(signum).name})
            return None
        except Exception as err:  # noqa: BLE001 - a failed job is recorded, the sweep goes on
            error = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            if not isinstance(err, UserError):  # a bug: keep the traceback for the report
                say(traceback.format_exc().rstrip(), file=sys.stderr)
            say(f"error: {describe(hydra.job.num, overrides)}: {error}", file=sys.stderr)
            _write(path, {**record, "status": "failed", "error": error})
            return None
        if value is not None and not math.isfinite(value):  # Optuna must not be told it: a failed trial instead
            error = f"its final val loss is {value}, nothing to compare"
            say(f"error: {describe(hydra.job.num, overrides)}: {error}", file=sys.stderr)
            _write(path, {**record, "status": "failed", "error": error})
            return None
        _write(path, {**record, "status": "done"})
        return value

    return wrapper


def _stop_starting_jobs(jobs: Path, signum: int, frame) -> None:
    if (jobs / STOP_FILE).exists():  # asked twice
        os._exit(128 + signum)
    _write(jobs / STOP_FILE, {"signal": signal.Signals(signum).name})
    say(f"\n{signal.Signals(signum).name}: the sweep stops once the jobs running now have saved; no further job "
        "starts (press Ctrl+C again to quit at once)", file=sys.stderr)


class SweepReport(HydraCallback):
    """Hydra callback: at the end of a sweep, list its failed, stopped and skipped jobs and exit non-zero."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        jobs = Path(config.hydra.sweep.dir) / JOBS_DIR
        shutil.rmtree(jobs, ignore_errors=True)  # a sweep dir used before
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
        _write(jobs / SHARED_FILE, sorted({o.get_key_element() for o in parsed} - swept))
        if not config.hydra.launcher._target_.endswith(".BasicLauncher"):
            # the jobs run in other processes (joblib workers, SLURM), which save and stop on their own:
            # here Ctrl+C only keeps further jobs from starting, and the summary still comes
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, functools.partial(_stop_starting_jobs, jobs))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        jobs = sorted((json.loads(p.read_text()) for p in (sweep / JOBS_DIR).glob("[0-9]*.json")),
                      key=lambda job: job["num"])
        failed = [job for job in jobs if job["status"] == "failed"]
        if failed:
            say(f"error: {len(failed)} of {len(jobs)} jobs of the sweep {sweep} failed:", file=sys.stderr)
            for job in failed:
                say(f"  {describe(job['num'], job['overrides'])}: {job['error']}", file=sys.stderr)
        stop_file = sweep / JOBS_DIR / STOP_FILE
        if stop_file.exists():
            for job in (job for job in jobs if job["status"] == "stopped"):
                where = (f"at iteration {job['step']}; resume that job with the resume: line above"
                         if job["step"] is not None else "before its training began; nothing saved")
                say(f"error: {job['signal']} stopped the sweep {sweep} in "
                    f"{describe(job['num'], job['overrides'])} {where}", file=sys.stderr)
            not_run = [describe(job["num"], job["overrides"]) for job in jobs if job["status"] == "not run"]
            say(f"  not run: {', '.join(not_run) or 'none'}", file=sys.stderr)
            sys.exit(128 + signal.Signals[json.loads(stop_file.read_text())["signal"]])
        if failed:
            sys.exit(1)
