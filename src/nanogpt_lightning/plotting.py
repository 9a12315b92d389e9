"""Loss curves from TensorBoard events, CSV logs or nanoGPT-style text logs, drawn into an image (PNG unless told
otherwise).

A run directory (or a sweep directory holding several) is read from what its loggers left: TensorBoard's events
(with TensorBoard's own reader), else Lightning's CSVLogger's metrics.csv files, else its train.log (any logger,
e.g. wandb alone); a text log is parsed from its `iter N: loss X` and `step N: train loss X, val loss Y` lines.
Several runs are told apart by their names and the settings that shape their results where those differ (the
HPARAMS row each run recorded), in a figure of fixed size whatever the labels.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import matplotlib
import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2

from nanogpt_lightning.errors import UserError
from nanogpt_lightning.metrics import EVAL_BPB_TAGS, EVAL_LOSS_TAGS, ITER_LOSS_TAG

EVENTS_GLOB = "events.out.tfevents.*"
CSV_FILE = "metrics.csv"  # Lightning's CSVLogger: <save_dir>/<name>/version_N/metrics.csv
CSV_PATTERNS = (CSV_FILE, f"*/{CSV_FILE}", f"*/version_*/{CSV_FILE}")  # where a run directory keeps them
RUN_LOG_FILE = "train.log"  # the lines a run printed (conf/hydra/job_logging/run_log.yaml)
NUMBER = r"([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))"
ITER_LINE = re.compile(rf"iter (\d+): loss {NUMBER}")
EVAL_LINE = re.compile(rf"step (\d+): train loss {NUMBER}, val loss {NUMBER}(?:, val bpb {NUMBER})?")
SMOOTHING_SPAN = 20  # the smoothed curve averages over about 1/SMOOTHING_SPAN of a run's logged points
SETTINGS_FILE = "hparams.yaml"  # CSVLogger's copy of the run's HPARAMS row: <name>/version_N/hparams.yaml
FIGURE_SIZE = (10, 6)  # inches at FIGURE_DPI: 1200 x 720 pixels, whatever the labels
FIGURE_DPI = 120
LABEL_WIDTH = 60  # characters of a legend label (2 columns of them fit the figure's width)
TITLE_WIDTH = 100
CELL_WIDTH = 24  # characters of a table cell (accumulate_grad_batches: 23)
TABLE_WIDTH = 120  # the table's columns of settings stop here; the settings left out are named below it


@dataclass
class Series:
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)


@dataclass
class LossCurves:
    """One run's losses: per iteration (`iters`) and at evaluations (`evals["train"]`, `evals["val"]`), and
    the evaluations' val bits per byte (`val_bpb`; logs from before bits per byte have none)."""

    name: str
    iters: Series = field(default_factory=Series)
    evals: dict[str, Series] = field(default_factory=lambda: {split: Series() for split in EVAL_LOSS_TAGS})
    val_bpb: Series = field(default_factory=Series)
    config: dict[str, object] = field(default_factory=dict)  # the run's flattened Hydra config, if any
    settings: dict[str, object] = field(default_factory=dict)  # the settings that shape its result, as recorded

    @property
    def final_val_loss(self) -> float:
        values = self.evals["val"].values
        return values[-1] if values else math.nan

    @property
    def final_val_bpb(self) -> float:
        values = self.val_bpb.values
        return values[-1] if values else math.nan


def curves_from_text(text: str, name: str) -> LossCurves:
    curves = LossCurves(name)
    for match in ITER_LINE.finditer(text):
        curves.iters.add(int(match[1]), float(match[2]))
    for match in EVAL_LINE.finditer(text):
        curves.evals["train"].add(int(match[1]), float(match[2]))
        curves.evals["val"].add(int(match[1]), float(match[3]))
        if match[4] is not None:
            curves.val_bpb.add(int(match[1]), float(match[4]))
    return curves


def curves_from_events(events_dir: Path, name: str) -> LossCurves:
    """The loss scalars of the TensorBoard event files in `events_dir` (all of them: resumed runs add files),
    and the run's HPARAMS row as `settings`."""
    accumulator = EventAccumulator(str(events_dir), size_guidance={"scalars": 0})  # 0: keep every point
    reader_log = logging.getLogger("tensorboard")
    level = reader_log.level
    reader_log.setLevel(logging.WARNING)  # the reader notes each file it has finished at INFO: noise in a run's log
    try:
        accumulator.Reload()
    finally:
        reader_log.setLevel(level)
    tags = set(accumulator.Tags()["scalars"])
    curves = LossCurves(name)
    for tag, series in _loss_series(curves).items():
        for event in accumulator.Scalars(tag) if tag in tags else ():
            series.add(event.step, event.value)
    try:
        row = accumulator.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[hparams_metadata.SESSION_START_INFO_TAG]
    except KeyError:  # no HPARAMS written
        return curves
    hparams = plugin_data_pb2.HParamsPluginData.FromString(row).session_start_info.hparams
    curves.settings = {key: getattr(value, value.WhichOneof("kind")) for key, value in hparams.items()}
    return curves


def _loss_series(curves: LossCurves) -> dict[str, Series]:
    """The series of `curves` each logged tag fills."""
    return ({ITER_LOSS_TAG: curves.iters, EVAL_BPB_TAGS["val"]: curves.val_bpb}
            | {tag: curves.evals[split] for split, tag in EVAL_LOSS_TAGS.items()})


def curves_from_csv(files: list[Path], name: str) -> LossCurves:
    """The loss columns of CSVLogger metrics files, in order (a resumed run adds a version directory)."""
    curves = LossCurves(name)
    wanted = _loss_series(curves)
    for file in files:
        with open(file, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                for tag, series in wanted.items():
                    if row.get(tag) not in (None, ""):
                        series.add(int(row["step"]), float(row[tag]))
    return curves


def _csv_files(run_dir: Path) -> list[Path]:
    files = {f for pattern in CSV_PATTERNS for f in run_dir.glob(pattern)}
    return sorted(files, key=lambda f: _natural_key(f.relative_to(run_dir)))  # version_2 before version_10


def _flatten(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in _flatten(child, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def _events_dir(run_dir: Path) -> Path:
    """Where a run keeps its events: `tensorboard/` (our logger's layout), or the directory itself."""
    return run_dir / "tensorboard" if any((run_dir / "tensorboard").glob(EVENTS_GLOB)) else run_dir


def run_curves(run_dir: Path) -> LossCurves:
    """A run directory's losses, with its Hydra config (as composed, interpolations unresolved): from its
    TensorBoard events, else its CSV logs, else its train.log. With the settings that shape its result as the
    run recorded them: CSVLogger's hparams.yaml, else TensorBoard's HPARAMS (typed by the config)."""
    if any(_events_dir(run_dir).glob(EVENTS_GLOB)):
        curves = curves_from_events(_events_dir(run_dir), run_dir.name)
    elif csv_files := _csv_files(run_dir):
        curves = curves_from_csv(csv_files, run_dir.name)
    elif (run_dir / RUN_LOG_FILE).is_file():
        curves = curves_from_text((run_dir / RUN_LOG_FILE).read_text(encoding="utf-8", errors="replace"),
                                  run_dir.name)
    else:
        curves = LossCurves(run_dir.name)
    config_file = run_dir / ".hydra" / "config.yaml"
    if config_file.is_file():
        curves.config = _flatten(OmegaConf.to_container(OmegaConf.load(config_file), resolve=False))
    records = sorted(run_dir.glob(f"*/version_*/{SETTINGS_FILE}"), key=lambda f: _natural_key(f.relative_to(run_dir)))
    recorded = (yaml.safe_load(f.read_text(encoding="utf-8")) for f in reversed(records))  # the latest, not `{}`
    curves.settings = next(filter(None, recorded), None) or _typed_like_config(curves.settings, curves.config)
    return curves


def _typed_like_config(hparams: dict[str, object], config: dict[str, object]) -> dict[str, object]:
    """TensorBoard's HPARAMS row as the run's settings: it keeps booleans as numbers and None as 'None', and its
    order is lost; the Hydra config gives both back."""
    order = {key: i for i, key in enumerate(config)}
    typed = {}
    for key in sorted(hparams, key=lambda k: (order.get(k, len(order)), k)):
        value, like = hparams[key], config.get(key)
        typed[key] = bool(value) if isinstance(like, bool) else None if value == "None" else value
    return typed


def _natural_key(path: Path) -> list:
    """Sort `2_x` before `10_x` (sweep jobs are numbered; so are CSV log versions)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _csv_run_dir(file: Path) -> Path:
    """The run directory of a CSVLogger file: above `<name>/version_N/`, `<name>/`, or its own directory."""
    if file.parent.name.startswith("version_"):
        return file.parent.parent.parent
    return file.parent if file.parent.name != "csv" else file.parent.parent


def find_run_dirs(path: Path) -> list[Path]:
    """`path` itself when it holds one run's logs, else each run directory below it (a sweep): those with
    TensorBoard events or CSV logs, else those with a train.log."""
    if any(_events_dir(path).glob(EVENTS_GLOB)) or _csv_files(path) or (path / RUN_LOG_FILE).is_file():
        return [path]
    runs = {p.parent.parent if p.parent.name == "tensorboard" else p.parent for p in path.rglob(EVENTS_GLOB)}
    runs |= {_csv_run_dir(p) for p in path.rglob(CSV_FILE)}
    runs = runs or {p.parent for p in path.rglob(RUN_LOG_FILE)}
    if not runs:
        raise UserError(f"no TensorBoard events under {path} (nor CSV logs or a {RUN_LOG_FILE}); pass a run or "
                        "sweep directory, or a text log")
    return sorted(runs, key=_natural_key)


def load_inputs(inputs: list[str], stdin_text: str | None = None) -> list[LossCurves]:
    """Curves for each input: a run or sweep directory, a text log file, or `-` (a log on standard input)."""
    curves = []
    for item in inputs:
        path = Path(item).expanduser()
        if item == "-":
            curves.append(curves_from_text(stdin_text or "", "stdin"))
        elif path.is_dir():
            curves.extend(run_curves(run_dir) for run_dir in find_run_dirs(path))
        elif path.is_file():
            curves.append(curves_from_text(path.read_text(encoding="utf-8", errors="replace"), path.name))
        else:
            raise UserError(f"{item} does not exist; pass run directories, a sweep directory, log files or -")
    for c in curves:
        if not c.iters.steps and not c.evals["val"].steps:
            raise UserError(f"no losses found in {c.name}: expected `iter N: loss X` lines or a run's train/iter_loss")
    return curves


def compared_settings(curves: list[LossCurves]) -> list[dict[str, object]]:
    """Each run's settings to compare: those it recorded (the settings that shape its result). A run that recorded
    none (wandb alone, an older run) gives those same keys from its Hydra config, or its whole config when no run
    recorded any; a text log has none."""
    keys = dict.fromkeys(key for c in curves for key in c.settings)
    return [c.settings or ({k: c.config[k] for k in keys if k in c.config} if keys else c.config) for c in curves]


def differing_keys(curves: list[LossCurves]) -> list[str]:
    """The settings whose values are not the same in all runs that have settings, in the runs' order."""
    settings = [s for s in compared_settings(curves) if s]
    if len(settings) < 2:
        return []
    keys = dict.fromkeys(key for s in settings for key in s)
    return [k for k in keys if len({shown(s, k) for s in settings}) > 1]


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key's shortest dotted suffix that no other key ends with (`model.n_embd` -> `n_embd`); a group's
    `_target_` is the group (`optimizer._target_` -> `optimizer`)."""
    names = {}
    for key in keys:
        parts = key.removesuffix("._target_").split(".")
        suffixes = [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]
        unique = [s for s in suffixes if not any(other != key and ("." + other).endswith("." + s) for other in keys)]
        names[key] = unique[0] if unique else key
    return names


def shown(settings: dict[str, object], key: str) -> str:
    """A setting's value as text, the same whichever record it came from (`-`: the run has no such setting); a
    `_target_` by its last name (`nanogpt_lightning.train.optimizers.muon` -> `muon`)."""
    if key not in settings:
        return "-"
    value = settings[key]
    if key.endswith("_target_"):
        return str(value).rsplit(".", 1)[-1]
    if isinstance(value, float):
        return f"{value:.10g}"  # TensorBoard's 32.0 is the 32 of hparams.yaml
    return str(value)


def clipped(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def labels(curves: list[LossCurves]) -> list[str]:
    """Each run's label: its name, then its values of the settings that differ (`0: n_embd=64 lr=0.001`; none
    for a setting it lacks), at most LABEL_WIDTH characters."""
    keys = differing_keys(curves)
    names = short_names(keys)
    result = []
    for c, settings in zip(curves, compared_settings(curves)):
        values = " ".join(f"{names[k]}={shown(settings, k)}" for k in keys if k in settings)
        result.append(clipped(f"{c.name}: {values}" if values else c.name, LABEL_WIDTH))
    return result


def plain(text: str) -> str:
    """`text` drawn as it is: a `$` would start matplotlib's mathematics (`${hydra:runtime.output_dir}`)."""
    return text.replace("$", r"\$")


def smooth(values: list[float]) -> list[float]:
    """The mean of a window centred on each point, about 1/SMOOTHING_SPAN of the points wide: it follows the
    data without lagging behind it (a moving average of the past sits above a falling loss). Near the ends
    the window shrinks to stay centred; non-finite values pass through and are left out of the means."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    sums = np.concatenate(([0.0], np.cumsum(np.where(finite, v, 0.0))))
    counts = np.concatenate(([0], np.cumsum(finite)))
    i = np.arange(len(v))
    half = np.minimum(len(v) // (2 * SMOOTHING_SPAN), np.minimum(i, len(v) - 1 - i))
    lo, hi = i - half, i + half + 1
    means = (sums[hi] - sums[lo]) / np.maximum(counts[hi] - counts[lo], 1)
    return np.where(finite, means, v).tolist()


def loss_figure(curves: list[LossCurves], title: str) -> Figure:
    """Per-iteration training loss (faint: raw, solid: smoothed) and eval points (o: train, x: val),
    one colour per run; the legend below the plot, so the plot keeps its size whatever the labels."""
    # drawn by Agg, without pyplot: no window, no global figure state
    fig = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (c, label) in enumerate(zip(curves, map(plain, labels(curves)))):
        colour = colours[i % len(colours)]
        if c.iters.steps:
            ax.plot(c.iters.steps, c.iters.values, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(c.iters.steps, smooth(c.iters.values), color=colour, linewidth=1.5, label=label)
            label = None  # one legend entry per run
        for split, marker in (("train", "o"), ("val", "x")):
            series = c.evals[split]
            ax.plot(series.steps, series.values, marker, color=colour, markersize=6,
                    markerfacecolor="none" if split == "train" else colour, label=label)
            label = None
    ax.plot([], [], "ko", markerfacecolor="none", label="eval: train loss")
    ax.plot([], [], "kx", label="eval: val loss")
    ax.set(xlabel="iteration", ylabel="loss", title=plain(clipped(title, TITLE_WIDTH)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    return fig


def plot_curves(curves: list[LossCurves], out: Path, title: str) -> Path:
    fig = loss_figure(curves, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)  # FIGURE_SIZE at FIGURE_DPI: no `bbox_inches="tight"`, which grows the image with the legend
    return out


def check_output(out: Path) -> None:
    """Refuse an output that cannot be written before the slow reading and drawing: an image format
    matplotlib lacks (it would also add `.png` to a name without one), or a place this user may not write."""
    if out.is_dir():
        raise UserError(f"cannot write {out}: it is a directory; give a file name such as {out / 'loss.png'}")
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:
        raise UserError(f"cannot write {out}: unsupported image format; end the name with one of "
                        + ", ".join(f".{ext}" for ext in sorted(formats)))
    existing = next(p for p in (out, *out.parents) if p.exists())  # the file to replace, or where to add it
    if existing != out and not existing.is_dir():
        raise UserError(f"cannot write {out}: {existing} is a file, not a directory; choose another path")
    if not os.access(existing, os.W_OK if existing == out else os.W_OK | os.X_OK):
        raise UserError(f"cannot write {out}: no permission to write {'it' if existing == out else f'in {existing}'}; "
                        "choose another path")


def sweep_table(curves: list[LossCurves]) -> str:
    """Runs sorted by final val loss (runs with none last), with their final val bits per byte and the settings
    that differ, as many as fit TABLE_WIDTH characters (the others named below); cells of CELL_WIDTH at most."""
    keys = differing_keys(curves)
    names = short_names(keys)
    ranked = sorted(zip(curves, compared_settings(curves)), key=lambda r: (math.isnan(r[0].final_val_loss),
                                                                         r[0].final_val_loss))
    columns = [["run"] + [c.name for c, _ in ranked], ["val loss"] + [f"{c.final_val_loss:.4f}" for c, _ in ranked],
               ["val bpb"] + [f"{c.final_val_bpb:.4f}" for c, _ in ranked]]
    left_out = []
    for key in keys:
        column = [names[key]] + [shown(settings, key) for _, settings in ranked]
        columns.append(column)
        if sum(min(max(map(len, col)), CELL_WIDTH) + 2 for col in columns) - 2 > TABLE_WIDTH:
            left_out.append(columns.pop()[0])
    widths = [min(max(map(len, col)), CELL_WIDTH) for col in columns]
    lines = ["  ".join(clipped(col[row], w).ljust(w) for col, w in zip(columns, widths)).rstrip()
             for row in range(len(ranked) + 1)]
    if left_out:
        lines += textwrap.wrap(f"also differ: {', '.join(left_out)}", TABLE_WIDTH, subsequent_indent="  ")
    return "\n".join(lines)


def default_output(inputs: list[str]) -> Path:
    """`loss.png` in the first run (or sweep) directory; beside a log file (`train.log` -> `train.png`);
    here for standard input."""
    first = Path(inputs[0]).expanduser()
    if first.is_dir():
        return first / "loss.png"
    return Path("loss.png") if inputs[0] == "-" else first.with_suffix(".png")


def plot_loss(inputs: list[str], output: str | None = None, stdin: TextIO = sys.stdin,
              out: TextIO = sys.stdout) -> Path:
    """Draw the inputs' losses into an image and print its path; with several runs, first a table ranking them."""
    out_path = Path(output).expanduser() if output else default_output(inputs)
    check_output(out_path)
    curves = load_inputs(inputs, stdin.read() if "-" in inputs else None)
    path = plot_curves(curves, out_path, title=" ".join("standard input" if i == "-" else i for i in inputs))
    if len(curves) > 1:
        print(sweep_table(curves), file=out)
    print(path, file=out)
    return path
