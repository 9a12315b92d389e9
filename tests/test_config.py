"""config.py and train/settings.py: every option of every config group composes, resolves and passes the checks;
each kind of rule refuses bad values in one line naming the key; the model's rules are GPTConfig's fields'; the
real scripts print that line and exit 1."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from helpers import ROOT, SONNETS, TINY_RUN, run_script
from nanogpt_lightning.config import SAMPLE_RULES, choice, register_resolvers, validate_sample_config
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.model.config import MLPS, NORMS, GPTConfig, setting
from nanogpt_lightning.train import settings
from nanogpt_lightning.train.settings import TRAIN_RULES, compose_train_config, train_rules, validate_train_config

CONF = ROOT / "conf"
# options that cannot compose alone: the values they leave for the user (`???`)
REQUIRED = {"data/text": [f"data.input_file={SONNETS}"]}
# options whose defaults come from a Hydra plugin: the module it installs
PLUGINS = {"hydra/launcher/slurm_gpu": "hydra_plugins.hydra_submitit_launcher",
           "hparams_search/optuna": "hydra_plugins.hydra_optuna_sweeper"}


def group_options() -> list[tuple[str, str]]:
    """(group, option) for every conf/<group>/<option>.yaml, Hydra's own groups as hydra/<group>."""
    options = []
    for path in sorted(CONF.rglob("*.yaml")):
        group = path.parent.relative_to(CONF).as_posix()
        if group != ".":
            options.append((group, path.stem))
    return options


def leaf_keys(node: dict, prefix: str = "") -> list[str]:
    """Dotted keys of the settings in an unresolved config (a list is one setting), less _target_/_partial_."""
    keys = []
    for key, value in node.items():
        if isinstance(value, dict):
            keys += leaf_keys(value, f"{prefix}{key}.")
        elif not key.startswith("_"):
            keys.append(f"{prefix}{key}")
    return keys


def checked(key: str, rules: dict) -> bool:
    """A rule covers `key` itself or a setting above it (e.g. trainer.strategy covers its _target_ config)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in rules for i in range(1, len(parts) + 1))


@pytest.fixture(scope="module")
def composed(tmp_path_factory) -> dict[tuple[str, str], DictConfig | UserError]:
    """Every option composed (with the hydra node) and checked by compose_train_config, or its refusal.

    Composing with output_dir makes it the process's Hydra config (so `${hydra:...}` resolves): only until
    these tests end."""
    output_dir = tmp_path_factory.mktemp("run")
    before = HydraConfig.instance().cfg
    configs = {}
    for group, option in group_options():
        module = PLUGINS.get(f"{group}/{option}")
        if module is not None:
            try:
                __import__(module)
            except ImportError:
                continue
        overrides = [f"{group}={option}", *REQUIRED.get(f"{group}/{option}", [])]
        try:
            configs[group, option] = compose_train_config(overrides, output_dir=str(output_dir))
        except UserError as err:
            configs[group, option] = err
    yield configs
    HydraConfig.instance().cfg = before


@pytest.mark.parametrize("group, option", group_options(), ids=[f"{g}={o}" for g, o in group_options()])
def test_every_option_composes_resolves_and_passes_the_checks(composed, group, option):
    if (group, option) not in composed:
        pytest.skip(f"needs the Hydra plugin {PLUGINS[f'{group}/{option}']}, not installed here")
    cfg = composed[group, option]
    if isinstance(cfg, UserError):
        raise cfg
    assert cfg.hydra.runtime.choices[group] == option
    for key in cfg:  # everything resolves, ${hydra:runtime.output_dir} included; the hydra node: what options set
        value = cfg[key]
        if key != "hydra" and OmegaConf.is_config(value):
            OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
    for node in ("launcher", "sweeper", "job_logging", "hydra_logging"):
        OmegaConf.to_container(cfg.hydra[node], resolve=True, throw_on_missing=True)


def test_every_setting_of_every_option_has_a_rule_and_every_rule_a_setting(composed):
    settings = {key for cfg in composed.values() if isinstance(cfg, DictConfig)
                for key in leaf_keys(OmegaConf.to_container(cfg)) if not key.startswith("hydra.")}
    assert {key for key in settings if not checked(key, TRAIN_RULES)} == set()
    assert set(TRAIN_RULES) - settings == set()  # no rule for a setting that no config has
    sample = OmegaConf.to_container(OmegaConf.load(CONF / "sample.yaml"))
    assert set(leaf_keys(sample)) - {"defaults", "hydra.run.dir", "hydra.output_subdir"} == set(SAMPLE_RULES)


@pytest.fixture(scope="module")
def train_cfg() -> DictConfig:
    return compose_train_config([])


@pytest.fixture
def sample_cfg() -> DictConfig:
    cfg = OmegaConf.load(CONF / "sample.yaml")
    del cfg["defaults"]
    return cfg


NAN, INF = float("nan"), float("inf")
# (key, bad value, the "got" part of the message): each rule kind zero, negative, wrong type, NaN/inf, bool
BAD_TRAIN = [
    ("data.batch_size", 0, "0"), ("trainer.max_steps", -5, "-5"), ("eval_interval", "abc", "'abc'"),
    ("model.n_layer", True, "true"), ("trainer.accumulate_grad_batches", 2.0, "2.0"), ("eval_iters", NAN, "nan"),
    ("data.block_size", None, "null"),
    ("scheduler.warmup_iters", -1, "-1"), ("data.num_workers", 1.5, "1.5"), ("seed", False, "false"),
    ("seed", 2**32, "4294967296"),
    ("optimizer.lr", 0, "0"), ("optimizer.lr", -1e-3, "-0.001"), ("optimizer.lr", NAN, "nan"),
    ("optimizer.lr", INF, "inf"), ("optimizer.lr", "fast", "'fast'"), ("optimizer.lr", True, "true"),
    ("optimizer.weight_decay", -0.1, "-0.1"), ("scheduler.min_lr", NAN, "nan"),
    ("trainer.gradient_clip_val", INF, "inf"), ("trainer.gradient_clip_val", "max", "'max'"),
    ("model.dropout", 1.0, "1.0"), ("model.dropout", -0.1, "-0.1"), ("data.val_fraction", 0, "0"),
    ("optimizer.betas", [0.9, 1.0], "[0.9, 1.0]"), ("optimizer.betas", [0.9], "[0.9]"),
    ("optimizer.betas", [0.9, NAN], "[0.9, nan]"), ("optimizer.betas", "0.9,0.99", "'0.9,0.99'"),
    ("model.bias", 1, "1"), ("model.fused_loss", "yes", "'yes'"), ("verbose", None, "null"),
    ("data.data_dir", 123, "123"), ("ckpt_path", True, "true"),
    ("trainer.accelerator", "tpu", "'tpu'"), ("data.tokenizer", "bpe", "'bpe'"),
    ("trainer.precision", "fp8", "'fp8'"), ("trainer.precision", True, "true"),
    ("trainer.devices", 0, "0"), ("trainer.max_epochs", 0, "0"),
]
BAD_SAMPLE = [
    ("temperature", NAN, "nan"), ("temperature", INF, "inf"), ("temperature", -1, "-1"),
    ("top_k", 0, "0"), ("top_k", True, "true"), ("top_k", 2.5, "2.5"), ("num_samples", 0, "0"),
    ("max_new_tokens", -1, "-1"), ("seed", -1, "-1"), ("device", "tpu", "'tpu'"),
    ("prompt", 123, "123"), ("prompt", True, "true"), ("prompt", 1000.0, "1000.0"), ("prompt", None, "null"),
    ("ckpt", 5, "5"),
]


def refusal(validate, cfg: DictConfig, key: str, value) -> str:
    cfg = cfg.copy()
    OmegaConf.update(cfg, key, value, merge=False)
    with pytest.raises(UserError) as err:
        validate(cfg)
    return str(err.value)


@pytest.mark.parametrize("key, value, shown", BAD_TRAIN)
def test_bad_training_setting_is_refused_naming_the_key(train_cfg, key, value, shown):
    message = refusal(validate_train_config, train_cfg, key, value)
    assert message.startswith(f"{key} must be ") and f", got {shown}; " in message
    assert "\n" not in message


@pytest.mark.parametrize("key, value, shown", BAD_SAMPLE)
def test_bad_sampling_setting_is_refused_naming_the_key(sample_cfg, key, value, shown):
    message = refusal(validate_sample_config, sample_cfg, key, value)
    assert message.startswith(f"{key} must be ") and f", got {shown}; " in message


def test_messages_say_what_to_do(train_cfg, sample_cfg):
    assert refusal(validate_train_config, train_cfg, "optimizer.lr", 0) == \
        "optimizer.lr must be a positive number, got 0; pass e.g. optimizer.lr=0.001"
    assert refusal(validate_train_config, train_cfg, "trainer.max_steps", 1000.0) == (
        "trainer.max_steps must be a positive number of iterations, got 1000.0; "
        "write it without a decimal point or exponent: trainer.max_steps=1000")
    assert refusal(validate_sample_config, sample_cfg, "prompt", 123) == (
        "prompt must be text, got 123; quote it: prompt=\"'123'\", or read it from a file: prompt=FILE:path.txt")
    assert refusal(validate_train_config, train_cfg, "data.input_file", "???") == \
        "data.input_file must be set, got ???; pass data.input_file=PATH"


@pytest.mark.parametrize("key, value", [
    ("trainer.precision", 32), ("trainer.precision", "bf16-mixed"), ("trainer.devices", [0, 1]),
    ("trainer.devices", "auto"), ("trainer.devices", -1), ("trainer.gradient_clip_val", None),
    ("optimizer.lr", 1), ("model.dropout", 0), ("ckpt_path", "run/last.ckpt"), ("data.input_file", None),
])
def test_good_training_values_pass(train_cfg, key, value):
    cfg = train_cfg.copy()
    OmegaConf.update(cfg, key, value, merge=False)
    validate_train_config(cfg)


@pytest.mark.parametrize("key, value", [("top_k", None), ("temperature", 0), ("max_new_tokens", 0),
                                        ("prompt", "FILE:p.txt"), ("device", "cpu")])
def test_good_sampling_values_pass(sample_cfg, key, value):
    sample_cfg[key] = value
    validate_sample_config(sample_cfg)


def test_checks_across_keys(train_cfg):
    cfg = train_cfg.copy()
    cfg.model.n_embd, cfg.model.n_head = 30, 4
    with pytest.raises(UserError, match=r"^model.n_embd \(30\) must be divisible by model.n_head \(4\); "
                                        r"pass e.g. model.n_embd=32$"):
        validate_train_config(cfg)
    cfg = train_cfg.copy()
    cfg.scheduler.warmup_iters = cfg.scheduler.lr_decay_iters = 100
    with pytest.raises(UserError, match="^scheduler.warmup_iters must be below scheduler.lr_decay_iters"):
        validate_train_config(cfg)
    cfg.scheduler.decay_lr = False  # a constant learning rate: no decay to come after the warmup
    validate_train_config(cfg)


def test_the_rotary_head_size_is_checked_before_torch_loads_with_the_models_own_message(train_cfg):
    cfg = train_cfg.copy()
    cfg.model.rotary, cfg.model.n_embd, cfg.model.n_head = True, 12, 4
    with pytest.raises(UserError) as err:
        validate_train_config(cfg)
    with pytest.raises(ValueError) as in_python:
        GPTConfig(block_size=8, vocab_size=10, rotary=True, n_embd=12, n_head=4)
    assert str(err.value) == str(in_python.value) == (
        "model.rotary needs an even head size, got n_embd / n_head = 3; "
        "pass e.g. model.n_embd=16, or model.rotary=false")


@dataclass
class GPTConfigWithAttention(GPTConfig):
    """GPTConfig with one more option, as a new model option would be added: a field and its rule."""

    attention: str = setting("sdpa", choice("sdpa", "flex"))


def test_the_model_settings_rules_are_gptconfigs_fields(train_cfg, monkeypatch):
    model_keys = {key for key in TRAIN_RULES if key.startswith("model.")}
    assert model_keys == {f"model.{f.name}" for f in fields(GPTConfig)
                          if f.name not in ("block_size", "vocab_size")} | {"model.init_from", "model.compile"}
    for f in fields(GPTConfig):
        if f.name not in ("block_size", "vocab_size"):
            assert TRAIN_RULES[f"model.{f.name}"] is f.metadata["rule"]  # the field's rule itself, not a copy
    assert TRAIN_RULES["model.norm"].description == "one of " + ", ".join(NORMS)
    assert TRAIN_RULES["model.mlp"].description == "one of " + ", ".join(MLPS)

    # a new field is a new setting, refused by its own rule without an entry in the table
    monkeypatch.setattr(settings, "TRAIN_RULES", train_rules(GPTConfigWithAttention))
    cfg = train_cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.model.attention = "flex"
    validate_train_config(cfg)
    cfg.model.attention = "flash"
    with pytest.raises(UserError) as err:
        validate_train_config(cfg)
    assert str(err.value) == "model.attention must be one of sdpa, flex, got 'flash'; pass e.g. model.attention=sdpa"
    with pytest.raises(ValueError) as in_python:  # ... and by GPTConfig built in Python, in the same words
        GPTConfigWithAttention(block_size=8, vocab_size=10, attention="flash")
    assert str(in_python.value) == str(err.value)


def test_importing_the_settings_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, nanogpt_lightning.train.settings; assert 'torch' not in sys.modules, 'torch loaded'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_interpolated_values_are_checked_resolved_and_blamed_on_the_key_typed(train_cfg):
    assert OmegaConf.is_interpolation(train_cfg.trainer, "val_check_interval")
    assert refusal(validate_train_config, train_cfg, "eval_interval", 0).startswith("eval_interval ")
    assert refusal(validate_train_config, train_cfg, "trainer.accumulate_grad_batches", "abc").startswith(
        "trainer.accumulate_grad_batches ")
    assert refusal(validate_train_config, train_cfg, "data.eval_iters", "${seed}x").startswith("data.eval_iters ")
    assert refusal(validate_train_config, train_cfg, "eval_iters", "${nope}") == (
        "eval_iters cannot be resolved (Interpolation key 'nope' not found), got ${nope}; "
        "fix the interpolation or pass a value")


def test_absent_keys_are_skipped(train_cfg):
    cfg = train_cfg.copy()
    OmegaConf.set_struct(cfg, False)
    del cfg.model["dropout"], cfg["eval_interval"], cfg.trainer["val_check_interval"]
    validate_train_config(cfg)


def test_values_only_a_hydra_run_resolves_are_skipped_outside_one(train_cfg, monkeypatch):
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    assert OmegaConf.to_container(train_cfg.trainer)["default_root_dir"] == "${hydra:runtime.output_dir}"
    validate_train_config(train_cfg)


def test_composition_errors_are_one_line():
    with pytest.raises(UserError, match=r"^nope is not a setting; check its spelling \(`python scripts/train.py --cfg "
                       r"job` shows every setting\), or add a key of your own with \+nope=1$"):
        compose_train_config(["nope=1"])
    with pytest.raises(UserError, match="^model=gpt5 is not an option of model; pass one of: gpt, modern$"):
        compose_train_config(["model=gpt5"])
    with pytest.raises(UserError, match="^optimizer.lr must be a positive number, got -1;"):
        compose_train_config(["optimizer.lr=-1"])


# the real scripts: (script, arguments, the last line of stderr)
SCRIPT_CASES = {
    "train zero eval_interval": (
        "train.py", ["eval_interval=0"],
        "error: eval_interval must be a positive number of iterations, got 0; pass e.g. eval_interval=1"),
    "train text for an integer": (
        "train.py", ["trainer.accumulate_grad_batches=abc"],
        "error: trainer.accumulate_grad_batches must be a positive integer, got 'abc'; "
        "pass e.g. trainer.accumulate_grad_batches=1"),
    "sample nan temperature": (
        "sample.py", ["temperature=nan"],
        "error: temperature must be a number >= 0, got nan; pass e.g. temperature=0.8"),
    "sample numeric prompt": (
        "sample.py", ["prompt=123"],
        "error: prompt must be text, got 123; quote it: prompt=\"'123'\", "
        "or read it from a file: prompt=FILE:path.txt"),
    "prepare negative block_size": (
        "prepare.py", ["data.block_size=-1"],
        "error: data.block_size must be a positive integer, got -1; pass e.g. data.block_size=1"),
}


@pytest.fixture(scope="module")
def script_results(tmp_path_factory):
    """Each case in its own directory, two at a time (each is mostly ~5 s of imports)."""
    root = tmp_path_factory.mktemp("scripts")

    def run(name):
        script, args, _ = SCRIPT_CASES[name]
        case_dir = root / name.replace(" ", "_")
        case_dir.mkdir()
        if script != "sample.py":
            args = [*TINY_RUN, f"data.data_dir={case_dir / 'data'}", f"hydra.run.dir={case_dir / 'run'}", *args]
        return case_dir, run_script(script, *args, cwd=case_dir, check=False)

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(SCRIPT_CASES, pool.map(run, SCRIPT_CASES)))


@pytest.mark.parametrize("name", SCRIPT_CASES)
def test_scripts_refuse_a_bad_setting_in_one_line(script_results, name):
    case_dir, result = script_results[name]
    stderr = result.stderr
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr and "Error executing job" not in stderr, stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [SCRIPT_CASES[name][2]], stderr
    assert stderr.rstrip().splitlines()[-1] == SCRIPT_CASES[name][2]
    assert not {"data", "run"} & {p.name for p in case_dir.iterdir()}  # no data prepared, no run directory left


def test_register_resolvers_is_idempotent():
    register_resolvers()
    register_resolvers()
    assert OmegaConf.create({"a": 3, "b": "${multiply:${a},2}"}).b == 6
