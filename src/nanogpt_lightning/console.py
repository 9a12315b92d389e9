"""Lines for the user: printed on the terminal and recorded in the run's log file (`train.log`).

The run's log is the `nanogpt_lightning` logger: Hydra's job logging (conf/hydra/job_logging/run_log.yaml)
gives it a file handler in the run directory; elsewhere (sampling, tests, a notebook) it records nothing.
Printing and recording are separate, so a progress bar on the terminal never ends up in the file.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from tqdm import tqdm

RUN_LOG = logging.getLogger("nanogpt_lightning")
RUN_LOG.addHandler(logging.NullHandler())  # no handler configured: record nothing (not Python's stderr fallback)
RUN_LOG.propagate = False


def say(line: str, file: TextIO | None = None, write=None) -> None:
    """Print `line` to `file` (default stdout), or through `write` (e.g. a progress bar's), and record it."""
    if write is not None:
        write(line)
    else:
        print(line, file=file or sys.stdout, flush=True)
    RUN_LOG.info(line)


def print_line(trainer, line: str) -> None:
    """During training (`trainer`, a Lightning Trainer): print once (rank zero), above the progress bar when there
    is one, and record it in the run's log."""
    if not trainer.is_global_zero:
        return
    bar = trainer.progress_bar_callback
    # tqdm.write: above the bars, and printed also when none is open yet (Lightning's bar.print drops it then)
    say(line, write=tqdm.write if bar is not None and bar.is_enabled else None)
