"""The README's commands work: every `python scripts/...` line of its code blocks is checked against the code.

train.py/prepare.py commands are composed and checked in this process (sweeps: each combination of the sweep's
values); sample.py, eval.py, export.py and plot_loss.py commands run the real script on a tiny run that one
README command (the sweep of "Plot the loss") trains once, end to end. A renamed option, a removed experiment or
a command Hydra cannot parse fails here, naming the README line.
"""

import itertools
import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from helpers import ROOT, SONNETS, TINY_RUN, run_script

README = ROOT / "README.md"
SCRIPTS = ("prepare.py", "train.py", "sample.py", "eval.py", "export.py", "plot_loss.py", "bench.py")
PREFIXES = ("python scripts/", ".venv/bin/python scripts/")
NETWORK = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}  # ckpt= values that download weights: --cfg job only


def readme_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line number, argv from the script on) of each command in the code blocks (indented or fenced)."""
    commands, lines, fenced = [], text.splitlines(), False
    i = 0
    while i < len(lines):
        line, number = lines[i], i + 1
        if line.strip().startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            code = line.strip().removeprefix("$ ")
            while code.endswith("\\") and i + 1 < len(lines):  # a command continued on the next line
                i += 1
                code = code[:-1] + " " + lines[i].strip()
            if code.startswith(PREFIXES):
                argv = shlex.split(code, comments=True)
                commands.append((number, argv[1:]))
        i += 1
    return commands


COMMANDS = readme_commands(README.read_text())


def by_script(*names: str) -> list:
    return [pytest.param(argv, id=f"README:{n}:{' '.join(argv)[:60]}")
            for n, argv in COMMANDS if Path(argv[0]).name in names]


def compose(overrides: list[str]):
    try:  # where compose_train_config lives now; it used to be in the base
        from nanogpt_lightning.train.settings import compose_train_config
    except ImportError:
        from nanogpt_lightning.train.settings import compose_train_config
    return compose_train_config(overrides)


def key_of(override: str) -> str:
    return override.lstrip("~+").split("=", 1)[0]


def synopsis_removed(args: list[str]) -> list[str]:
    """`eval.py ckpt=latest [split=val|train] ...`: the optional parts of a synopsis are not arguments."""
    return [a for a in args if not (a.startswith("[") or a.endswith("]") or a == "...")]


def test_the_readme_has_commands_for_every_script():
    scripts = {Path(argv[0]).name for _, argv in COMMANDS}
    assert {"prepare.py", "train.py", "sample.py", "eval.py", "export.py", "plot_loss.py"} <= scripts, scripts
    for number, argv in COMMANDS:
        assert (ROOT / argv[0]).is_file(), f"README line {number}: no such script {argv[0]}"


def sweep_combinations(overrides: list[str]) -> list[list[str]]:
    """Each combination of a `-m` command's values (an Optuna range stays out: the search picks from it)."""
    parsed = OverridesParser.create().parse_overrides(overrides)  # a syntax error fails here
    choices = []
    for text, override in zip(overrides, parsed):
        if override.is_sweep_override():
            if override.is_interval_sweep() or override.is_range_sweep():
                choices.append([None])
            else:
                choices.append([f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()])
        else:
            choices.append([text])
    return [[o for o in combo if o is not None] for combo in itertools.product(*choices)]


@pytest.mark.parametrize("argv", by_script("train.py", "prepare.py", "bench.py"))
def test_train_and_prepare_commands_compose_and_validate(argv):
    args = synopsis_removed(argv[1:])
    args = [a for a in args if a not in ("-m", "--multirun") and not a.startswith("--")]
    # hydra's own settings (launcher, run dir) are Hydra's business; the run's config is what is checked
    hydra_args = [a for a in args if key_of(a).startswith(("hydra.", "hydra/"))]
    for a in hydra_args:
        if key_of(a).startswith("hydra/launcher"):
            launcher = a.split("=", 1)[1]
            assert launcher == "joblib" or (ROOT / "conf/hydra/launcher" / f"{launcher}.yaml").is_file(), a
    run_args = [a for a in args if a not in hydra_args and not a.startswith("[")]
    if any(a.startswith("-") for a in run_args):  # bench.py's own flags (--rounds 10): not Hydra overrides
        run_args = [a for a in run_args if not a.startswith("-") and not a.isdigit()]
    for combination in sweep_combinations(run_args):
        cfg = compose(combination)
        for override in combination:  # each override really set something of this config
            key = key_of(override)
            if "=" in override and "/" not in key and not override.startswith("~") and "." in key:
                node = cfg
                for part in key.split("."):
                    assert part in node, f"{' '.join(argv)}: {key} is not a setting"
                    node = node[part]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The README's sweep of "Plot the loss", on the sonnets with a tiny model: two runs in a sweep directory."""
    command = next(argv for _, argv in COMMANDS if argv[0] == "scripts/train.py" and "-m" in argv
                   and "scripts/plot_loss.py" in {a[0] for _, a in COMMANDS})
    cwd = tmp_path_factory.mktemp("readme")
    shorter = ["trainer.max_steps=30", "eval_interval=15", "log_interval=5"]  # the same command, shorter
    args = [a for a in command[1:] if key_of(a) not in {key_of(o) for o in shorter}]
    args += [*shorter, *(a for a in TINY_RUN if key_of(a) not in {key_of(o) for o in args})]
    sweep_dir = cwd / "outputs" / "sweeps" / "tiny"
    run_script("train.py", *args, f"hydra.sweep.dir={sweep_dir}", cwd=cwd)
    runs = sorted(p for p in sweep_dir.iterdir() if (p / "checkpoints" / "last.ckpt").is_file())
    assert len(runs) == 2, runs
    return cwd, sweep_dir, runs


def localised(argv: list[str], cwd: Path, sweep_dir: Path, runs: list[Path]) -> list[str]:
    """The command with its example paths replaced by the tiny run's."""
    out, positional = [], 0
    for a in argv[1:]:
        if a.startswith("ckpt=") and a != "ckpt=latest" and a.split("=", 1)[1] not in NETWORK:
            best = a.endswith("best.ckpt")
            a = f"ckpt={runs[0] / 'checkpoints' / 'best.ckpt'}" if best else f"ckpt={runs[0]}"
        elif a.startswith("out="):
            a = f"out={cwd / 'export' / a.split('=', 1)[1]}"
        elif argv[0].endswith("plot_loss.py") and not a.startswith("-") and a != "-" and not a.endswith(".png"):
            if "sweeps" in a:
                a = str(sweep_dir)
            elif a.endswith(".log"):
                a = str(runs[positional % 2] / "train.log")
            else:
                a = str(runs[positional % 2])
            positional += 1
        elif argv[0].endswith("plot_loss.py") and a.endswith(".png"):
            a = str(cwd / a)
        out.append(a)
    return out


TOOLS = by_script("sample.py", "eval.py", "export.py", "plot_loss.py")


def tool_args(argv: list[str], cwd: Path, sweep_dir: Path, runs: list[Path]) -> list[str]:
    args = localised(synopsis_removed(argv), cwd, sweep_dir, runs)
    if any(a.split("=", 1)[1] in NETWORK for a in args if a.startswith("ckpt=")):
        return [*args, "--cfg", "job"]  # parsed and composed; the weights need the network
    if Path(argv[0]).name == "sample.py":  # the same command, shorter
        args = [a for a in args if not a.startswith(("num_samples=", "max_new_tokens="))]
        args += ["num_samples=1", "max_new_tokens=20"]
    return args


@pytest.fixture(scope="module")
def tool_results(tiny):
    """Each command's real script, one after another (run_script forks the heavy ones from a process that has
    imported PyTorch and Lightning once, which keeps this file within a minute)."""
    cwd, sweep_dir, runs = tiny
    results = {}
    for param in TOOLS:
        argv = param.values[0]
        args = tool_args(argv, cwd, sweep_dir, runs)
        stdin = (runs[0] / "train.log").read_text() if "-" in args else ""
        results[tuple(argv)] = (args, run_script(Path(argv[0]).name, *args, cwd=cwd, check=False, stdin=stdin))
    return results


@pytest.mark.parametrize("argv", TOOLS)
def test_tool_commands_run_on_a_tiny_run(argv, tiny, tool_results):
    _, sweep_dir, _ = tiny
    args, result = tool_results[tuple(argv)]
    script = Path(argv[0]).name
    assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}"
    if script == "plot_loss.py" and str(sweep_dir) in args:  # the ranking the README shows
        assert re.search(r"^run\s+val loss\s+val bpb\s+n_embd$", result.stdout, re.M), result.stdout
    if script == "eval.py":
        assert re.search(r"^loss \d+\.\d{4} nats per token, perplexity [\d.]+, bits per byte \d+\.\d{4}$",
                         result.stdout, re.M), result.stdout
    if script == "export.py":
        out = Path(next(a for a in args if a.startswith("out=")).split("=", 1)[1])
        assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    if script == "sample.py" and "--cfg" not in args:
        assert "-" * 15 in result.stdout, result.stdout


def test_a_readme_train_command_trains_end_to_end(tiny):
    """The fixture ran the README's sweep command (tiny): both runs wrote what the README says a run writes."""
    _, _, runs = tiny
    for run in runs:
        for name in ("train.log", "loss.png", "checkpoints/last.ckpt", ".hydra/config.yaml"):
            assert (run / name).exists(), run / name
        assert "step 30: train loss" in (run / "train.log").read_text()
    assert SONNETS.name in (runs[0] / "train.log").read_text()
