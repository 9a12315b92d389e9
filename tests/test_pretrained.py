"""GPT-2 weights in and out, checked against Hugging Face transformers (a test dependency only).

A small random GPT2LMHeadModel, built by transformers and saved with save_pretrained, stands in for OpenAI's
GPT-2: model.init_from, ckpt= for sampling and evaluation, the fine-tuning experiment, and export back.
"""

import io

import lightning as L
import pytest
import torch
import transformers
from torch.nn import functional as F

from helpers import ROOT, SONNETS
from nanogpt_lightning.data.tokenizer import GPT2Tokenizer
from nanogpt_lightning.errors import UserError, naming
from nanogpt_lightning.model import gpt2
from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.model.gpt import GPT
from nanogpt_lightning.tools.evaluate import evaluate
from nanogpt_lightning.tools.export import export
from nanogpt_lightning.tools.sample import sample
from nanogpt_lightning.train import checkpoints
from nanogpt_lightning.train.checkpoints import load_checkpoint
from nanogpt_lightning.train.settings import compose_train_config

CPU = torch.device("cpu")
N_POSITIONS = 32


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(directory, model): a 2-layer GPT-2 of GPT-2's vocabulary, every weight and bias random, saved."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=N_POSITIONS, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2's init leaves biases at 0 and norms at 1: make every mapped tensor count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model.save_pretrained(directory)
    return directory, model


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


@pytest.mark.parametrize("fused_loss", [True, False])
def test_init_from_a_directory_gives_transformers_logits_and_loss(hf_model, fused_loss):
    directory, hf = hf_model
    weights = checkpoints.read_pretrained(str(directory))
    config = gpt2.gpt_config(weights.hf_config, "model.init_from", block_size=16, fused_loss=fused_loss)
    assert (config.n_layer, config.n_embd, config.bias, config.mlp, config.block_size) == (2, 16, True, "gelu_tanh", 16)
    model = gpt2.load_weights(GPT(config), weights.tensors, "model.init_from").eval()
    idx, targets = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    expected = hf_logits(hf, idx)
    with torch.no_grad():
        logits = model.logits(model.hidden_states(idx))
        _, loss = model(idx, targets)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert loss.item() == pytest.approx(F.cross_entropy(expected.view(-1, 50257), targets.view(-1)).item(), abs=1e-5)


def test_greedy_sampling_from_pretrained_weights_is_transformers_greedy_generate(hf_model):
    directory, hf = hf_model
    tokenizer = GPT2Tokenizer()
    prompt = "Shall I compare thee"
    ids = torch.tensor([tokenizer.encode(prompt)])
    n_new = N_POSITIONS - ids.size(1)  # up to the last position: the cache path all the way
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False,
                               pad_token_id=50256)[0, ids.size(1):]
    info = io.StringIO()
    texts = sample(str(directory), prompt=prompt, num_samples=1, max_new_tokens=n_new, temperature=0, device="cpu",
                   out=io.StringIO(), info=info)
    assert texts == [prompt + tokenizer.decode(expected.tolist())]
    assert info.getvalue().startswith(f"sampling from pretrained {directory} on cpu in 32-true\n")


def test_eval_of_pretrained_weights_is_the_mean_of_transformers_window_losses(hf_model, tmp_path):
    directory, hf = hf_model
    text = tmp_path / "text.txt"
    text.write_text(SONNETS.read_text()[:400])
    report = evaluate(str(directory), text=str(text), device="cpu", out=io.StringIO())
    tokens = torch.tensor(GPT2Tokenizer().encode(text.read_text()))
    losses = []  # windows of 33 tokens stepping by 32, as evaluation.py says
    for start in range(0, len(tokens) - 1, N_POSITIONS):
        window = tokens[start:start + N_POSITIONS + 1][None]
        logits = hf_logits(hf, window[:, :-1])
        losses.append(F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item())
    assert report["loss"] == pytest.approx(sum(losses) / (len(tokens) - 1), abs=1e-5)
    with pytest.raises(UserError, match="does not record the data it was trained on \\(pretrained weights\\)"):
        evaluate(str(directory), device="cpu", out=io.StringIO())


class Evaluations(L.Callback):
    """Records each evaluation's val loss; at the evaluation of step `worse_at` reports a higher one instead
    (before ModelCheckpoint, which Lightning runs last), as a run whose val loss rose there."""

    seen: list = []
    saved_at: list = []

    def __init__(self, worse_at: int):
        self.worse_at = worse_at
        Evaluations.seen, Evaluations.saved_at = [], []

    def on_validation_end(self, trainer, pl_module):
        loss = float(trainer.callback_metrics["val/loss"])
        Evaluations.seen.append((trainer.global_step, loss))
        if trainer.global_step == self.worse_at:
            trainer.callback_metrics["val/loss"] = torch.tensor(loss + 1.0)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        Evaluations.saved_at.append(trainer.global_step)


@pytest.fixture(scope="module")
def finetuned(hf_model, tmp_path_factory):
    """experiment=finetune_shakespeare from the small model, shrunk: sonnets, block 16, 2 micro-batches."""
    from hydra.core.hydra_config import HydraConfig

    from nanogpt_lightning.train.run import train

    directory, _ = hf_model
    tmp = tmp_path_factory.mktemp("finetune")
    before = HydraConfig.instance().cfg
    cfg = compose_train_config(["experiment=finetune_shakespeare", f"model.init_from={directory}",
                                f"data.input_file={SONNETS}", f"data.data_dir={tmp / 'data'}", "data.block_size=16",
                                "data.batch_size=4", "trainer.accumulate_grad_batches=2", "eval_iters=4",
                                "optimizer.lr=3e-3", "trainer.accelerator=cpu", "callbacks.progress_bar.refresh_rate=0",
                                "+callbacks.evaluations._target_=test_pretrained.Evaluations",
                                "+callbacks.evaluations.worse_at=15"], output_dir=str(tmp / "run"))
    try:
        train(cfg)
    finally:
        HydraConfig.instance().cfg = before
    return tmp / "run", cfg


def test_finetune_experiment_trains_and_writes_a_checkpoint_only_when_val_loss_improves(finetuned):
    run, cfg = finetuned
    assert (cfg.optimizer.lr, cfg.scheduler.decay_lr, cfg.trainer.max_steps, cfg.eval_interval) == (3e-3, False, 20, 5)
    steps, losses = zip(*Evaluations.seen)
    assert steps == (5, 10, 15, 20)
    assert losses[-1] < losses[0]  # the real val loss falls
    assert Evaluations.saved_at == [5, 10, 20]  # 15 reported a worse val loss: no checkpoint
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt"]
    _, _, checkpoint = load_checkpoint(run / "checkpoints" / "best.ckpt", CPU)
    assert checkpoint["global_step"] == 20
    stored = checkpoint["nanogpt_lightning"]["model_config"]  # what sample, eval and resume need
    assert (stored["n_layer"], stored["n_embd"], stored["block_size"], stored["bias"], stored["mlp"]) == (
        2, 16, 16, True, "gelu_tanh")
    assert checkpoint["nanogpt_lightning"]["settings"]["model.n_layer"] == 2  # the weights' shape, not gpt.yaml's


def test_export_of_a_trained_checkpoint_loads_in_transformers_with_the_same_logits(finetuned, tmp_path):
    run, _ = finetuned
    out = export(str(run / "checkpoints" / "best.ckpt"), str(tmp_path / "export"))
    model, _, _ = load_checkpoint(run / "checkpoints" / "best.ckpt", CPU)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf, idx), model.logits(model.hidden_states(idx)), atol=1e-5, rtol=0)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "Shall I compare thee to a summer’s day?"
    assert hf_tokenizer(text)["input_ids"] == GPT2Tokenizer().encode(text)


def test_a_bias_free_padded_exact_gelu_model_maps_to_gpt2_with_zero_biases():
    """This project's defaults (no biases, exact GELU) and a padded vocabulary are GPT-2 too."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=65, n_layer=1, n_head=2, n_embd=8, vocab_multiple=64)).eval()
    config = transformers.GPT2Config(**gpt2.hf_config(model.config, bpe=False))
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.load_state_dict(gpt2.hf_tensors(model), strict=False)  # lm_head: tied to wte
    idx = torch.randint(0, 65, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(hf, idx), model.logits(model.hidden_states(idx))[..., :65], atol=1e-5,
                                   rtol=0)


@pytest.mark.parametrize("option, value", [("rotary", True), ("norm", "rmsnorm"), ("qk_norm", True),
                                           ("tie_embeddings", False), ("logit_softcap", 30.0), ("mlp", "relu2"),
                                           ("value_embeddings", True), ("trigram_buckets", 61)])
def test_export_refuses_an_option_gpt2_lacks_naming_it(option, value):
    config = GPTConfig(block_size=8, vocab_size=65, **{option: value})
    with pytest.raises(UserError, match=f"cannot export a model with model.{option}="):
        gpt2.check_exportable(config)
    gpt2.check_exportable(GPTConfig(block_size=8, vocab_size=65, zero_init=True))  # only an initialisation


def test_init_from_refusals_are_one_line(hf_model, monkeypatch, tmp_path):
    from huggingface_hub import constants

    directory, _ = hf_model
    with pytest.raises(UserError, match="needs data in GPT-2's byte-pair encoding.*pass data.tokenizer=gpt2"):
        checkpoints.init_from(str(directory), {"kind": "char"}, 16, {})
    with pytest.raises(UserError, match="model.rotary=true cannot apply to GPT-2 weights"):
        checkpoints.init_from(str(directory), {"kind": "gpt2"}, 16, {"rotary": True})
    with pytest.raises(UserError, match=f"data.block_size=64 is larger than the {N_POSITIONS} positions"):
        checkpoints.init_from(str(directory), {"kind": "gpt2"}, 64, {})
    with pytest.raises(UserError, match="is neither a directory nor one of gpt2, gpt2-medium"):
        checkpoints.locate("gpt3")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # not cached, and no network
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match="not in the Hugging Face cache .* `hf download gpt2 config.json "
                                        "model.safetensors`.* or pass model.init_from=DIR") as refused:
        with naming(key="model.init_from"):
            checkpoints.locate("gpt2")
    assert "\n" not in str(refused.value)


def test_without_network_the_hub_is_not_tried_for_half_a_minute(monkeypatch, tmp_path):
    """No connection to the hub: one line at once, with the reason; no download (it would retry first)."""
    import socket

    import huggingface_hub
    from huggingface_hub import constants

    def no_network(address, timeout):
        assert address == ("huggingface.co", 443) and timeout == checkpoints.HUB_CONNECT_S
        raise socket.gaierror(-2, "Name or service not known")

    downloads = []

    def only_the_cache(*args, local_files_only=False, **kwargs):
        if not local_files_only:
            downloads.append(args)
            raise OSError("no network")
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", only_the_cache)
    with pytest.raises(UserError, match=r"^cannot get ckpt=gpt2: .* downloading it failed \(gaierror: \[Errno -2\] "
                                        r"Name or service not known\); download it where there is network"):
        checkpoints.locate("gpt2")
    assert downloads == []
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # through a proxy only the download can tell
    with pytest.raises(UserError, match=r"downloading it failed \(OSError: no network\)"):
        checkpoints.locate("gpt2")
    assert downloads == [("gpt2", "config.json")]


def test_export_settings_have_rules_and_out_must_be_given():
    from omegaconf import OmegaConf

    from nanogpt_lightning.config import EXPORT_RULES, validate_export_config

    cfg = OmegaConf.load(ROOT / "conf" / "export.yaml")
    assert set(cfg) - {"defaults", "hydra"} == set(EXPORT_RULES)
    with pytest.raises(UserError, match=r"out must be set, got \?\?\?; pass out=DIR"):
        validate_export_config(cfg)
