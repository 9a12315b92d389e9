"""The GPT-2 mapping: the Hugging Face layout of OpenAI's GPT-2 <-> this project's GPT, written once, used both ways.

The parameter names are the same (ours keep GPT-2's), the hub's files may lack the `transformer.` prefix, and
GPT-2's Conv1D layers store their weights transposed (in, out) against our Linear layers (out, in): TRANSPOSED.
In: `gpt_config` + `load_weights` (the files are found and read by train/checkpoints.py). Out: `hf_config` +
`hf_tensors` (written by tools/export.py), which `transformers.GPT2LMHeadModel.from_pretrained` loads.
No files, no transformers: tensors and dicts in, tensors and dicts out.
"""

from __future__ import annotations

import math

import torch

from nanogpt_lightning.config import POSITIVE_INT, refusal
from nanogpt_lightning.errors import UserError, first_line
from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.model.gpt import GPT

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


def shown(value) -> str:
    """A model option's value as it is typed on the command line."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


SHAPE_FIELDS = ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd")  # config.json's, each a positive int
MAX_PARAMETERS = 20e9  # a config.json asking for more is damaged or not meant for this (gpt2-xl has 1.6e9)


def parameter_count(hf: dict) -> int:
    """About how many parameters GPT-2 weights of config.json `hf` have (its shape fields checked)."""
    n_embd = hf["n_embd"]
    return (hf["vocab_size"] + hf["n_positions"]) * n_embd + hf["n_layer"] * 12 * n_embd * n_embd


def gpt_config(hf: dict, named: str, block_size: int | None = None, **settings) -> GPTConfig:
    """The GPTConfig of GPT-2 weights whose config.json is `hf` (`named` in messages, e.g. `ckpt=gpt2`): shapes
    from it, the position table cropped to `block_size` (default: all of it); `settings` are the model keys
    that may differ (dropout, fused_loss)."""
    if not isinstance(hf, dict):
        raise UserError(f"{named}: its config.json is not a JSON object (got {type(hf).__name__}); pass a directory "
                        "written by save_pretrained or scripts/export.py")
    for field in SHAPE_FIELDS:
        if field not in hf:
            raise UserError(f"{named}: its config.json lacks {field}; pass a directory written by save_pretrained "
                            "or scripts/export.py")
        message = refusal(field, POSITIVE_INT, hf[field])
        if message:
            raise UserError(f"{named}: its config.json's {message.split('; ')[0]}; fix config.json or pass "
                            "another directory")
    parameters = parameter_count(hf)
    if parameters > MAX_PARAMETERS:
        raise UserError(f"{named}: its config.json describes a model of {parameters:.3g} parameters (vocab_size "
                        f"{hf['vocab_size']}, n_layer {hf['n_layer']}, n_embd {hf['n_embd']}), over the "
                        f"{MAX_PARAMETERS:.0e} this loads; fix config.json or pass another directory")
    activation = hf.get("activation_function", "gelu_new")
    n_embd = hf.get("n_embd")
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
            raise UserError(f"{named} cannot be loaded: its config.json has {what}")
    positions = hf["n_positions"]
    if block_size is not None and block_size > positions:
        raise UserError(f"data.block_size={block_size} is larger than the {positions} positions of "
                        f"{named}; pass data.block_size={positions} or less")
    try:
        return GPTConfig(block_size=block_size or positions, vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                         n_head=hf["n_head"], n_embd=n_embd, bias=True, vocab_multiple=1,
                         mlp=ACTIVATIONS[activation], **settings)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{named}: its config.json is not a GPT-2 config ({first_line(err)})") from None


def load_weights(model: GPT, tensors: dict[str, torch.Tensor], named: str) -> GPT:
    """Copy GPT-2's `tensors` (in the file's own names) into `model` (built by gpt_config): Conv1D weights
    transposed, the position table cropped to the model's block size, the output layer tied to wte."""
    ours = {}
    for name, tensor in tensors.items():
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
    expected = model.state_dict()
    for name, tensor in ours.items():
        if name in expected and tensor.shape != expected[name].shape:
            raise UserError(f"the weights of {named} do not fit its config.json: {name.removeprefix(PREFIX)} is "
                            f"{tuple(tensor.shape)}, config.json makes it {tuple(expected[name].shape)}")
    try:
        with torch.no_grad():
            model.load_state_dict(ours)
    except RuntimeError as err:
        raise UserError(f"the weights of {named} do not fit its config.json ({first_line(err, 200)})") from None
    return model


def check_gpt2_options(model_settings: dict, named: str) -> None:
    """Refuse, in one line, a model option GPT-2's weights cannot take (training from `named`)."""
    for option, value in GPT2_OPTIONS.items():
        if model_settings.get(option, value) != value:
            raise UserError(f"model.{option}={shown(model_settings[option])} cannot apply to GPT-2 weights "
                            f"({named}); leave it at {shown(value)}, or train from scratch")


def check_exportable(config: GPTConfig) -> None:
    """Refuse, in one line naming it, a model option GPT2LMHeadModel does not have."""
    for option, value in GPT2_OPTIONS.items():
        if getattr(config, option) != value:
            raise UserError(f"cannot export a model with model.{option}={shown(getattr(config, option))}: "
                            f"GPT-2 (transformers' GPT2LMHeadModel) has only {option}={shown(value)}")
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
