"""bf16-mixed training on the CPU: the loss falls, checkpoints keep float32 weights, resume is exact, and
sampling runs in the run's precision (or the one asked for)."""

import io

import lightning as L
import pytest
import torch

from helpers import fit_tiny
from nanogpt_lightning.devices import auto_precision
from nanogpt_lightning.model.gpt import GPT
from nanogpt_lightning.tools.sample import sample, sampling_precision
from nanogpt_lightning.train.checkpoints import CHECKPOINT_KEY

# clipped, with the fused AdamW (Lightning alone refuses to clip a fused optimizer under mixed precision)
BF16_RUN = {"precision": "bf16-mixed", "lr": 1e-2, "lr_decay_iters": 100, "gradient_clip_val": 1.0}


class Recorder(L.Callback):
    """Each iteration's training loss."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def test_bf16_mixed_trains_in_bfloat16_keeps_float32_weights_resumes_exactly_and_samples_in_bf16(tmp_path, monkeypatch):
    matmul_dtypes = set()
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **k: matmul_dtypes.add(a.dtype) or real_mm(a, b, **k))
    recorder = Recorder()
    L.seed_everything(0, verbose=False)
    unbroken = fit_tiny(tmp_path / "unbroken", 60, recorder, **BF16_RUN)
    assert matmul_dtypes == {torch.bfloat16}  # the fused output layer ran under autocast
    first, last = recorder.losses[:10], recorder.losses[-10:]
    assert sum(last) / 10 < sum(first) / 10 - 0.3, (first, last)

    L.seed_everything(0, verbose=False)
    first_half = fit_tiny(tmp_path / "piece", 30, **BF16_RUN)
    first_half.save_checkpoint(tmp_path / "half.ckpt")
    weights = torch.load(tmp_path / "half.ckpt", weights_only=False)["state_dict"]
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}  # master weights
    resumed = fit_tiny(tmp_path / "piece", 60, ckpt_path=tmp_path / "half.ckpt", **BF16_RUN)
    assert resumed.global_step == unbroken.global_step == 60
    for (name, a), b in zip(unbroken.lightning_module.state_dict().items(),
                            resumed.lightning_module.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    # sampling: in the run's precision unless told otherwise
    checkpoint = torch.load(tmp_path / "half.ckpt", weights_only=False)
    checkpoint[CHECKPOINT_KEY]["settings"] = {"trainer.precision": "bf16-mixed"}  # as train.py records it
    torch.save(checkpoint, tmp_path / "bf16.ckpt")
    logits_dtypes = []
    real_logits = GPT.logits
    monkeypatch.setattr(GPT, "logits", lambda self, h: logits_dtypes.append(real_logits(self, h).dtype)
                        or real_logits(self, h))
    for precision, dtype in (("run", torch.bfloat16), ("32-true", torch.float32), ("auto", None)):
        logits_dtypes.clear()
        info = io.StringIO()
        sample(str(tmp_path / "bf16.ckpt"), num_samples=1, max_new_tokens=3, device="cpu", precision=precision,
               out=io.StringIO(), info=info)
        named = {"run": "bf16-mixed", "32-true": "32-true", "auto": auto_precision(torch.device("cpu"))}[precision]
        assert f" on cpu in {named}\n" in info.getvalue()
        dtype = dtype or {"bf16-mixed": torch.bfloat16, "32-true": torch.float32}[named]
        assert logits_dtypes == [dtype] * 3


@pytest.mark.parametrize("trained, expected", [
    ("bf16-mixed", "bf16-mixed"), ("bf16", "bf16-mixed"),  # Lightning's alias: the same precision
    ("32-true", "32-true"), ("32", "32-true"), (32, "32-true"),
    ("bf16-true", "32-true"), ("64-true", "32-true"), ("64", "32-true"),  # weights load as float32
    ("16-mixed", "auto on cpu"), ("16", "auto on cpu"),  # float16 autocast is a GPU's: the cpu's own pick
])
def test_sampling_in_the_runs_precision_names_what_it_computes_in(trained, expected):
    cpu = torch.device("cpu")
    checkpoint = {CHECKPOINT_KEY: {"settings": {"trainer.precision": trained}}}
    assert sampling_precision("run", checkpoint, cpu) == (auto_precision(cpu) if expected == "auto on cpu"
                                                          else expected)
    assert sampling_precision("run", {CHECKPOINT_KEY: {}}, cpu) == "32-true"  # pretrained weights


def test_model_compile_compiles_each_block_in_place_and_gives_the_eager_loss(monkeypatch, tmp_path):
    """model.compile=true: the blocks go through torch.compile (dynamo; its `eager` backend here, as
    inductor's C++ build takes ~45 s on a 2-core CPU), weights keep their names, loss and gradients are eager's."""
    from functools import partial

    from nanogpt_lightning.model.config import GPTConfig
    from nanogpt_lightning.train.module import GPTModule
    from nanogpt_lightning.train.optimizers import adamw
    from nanogpt_lightning.train.schedules import WarmupCosineLR

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend="eager"))
    torch._dynamo.reset()
    config = GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, rotary=True, qk_norm=True,
                       norm="rmsnorm", mlp="relu2")
    modules = []
    for compile_model in (False, True):
        torch.manual_seed(0)
        modules.append(GPTModule(config, {"kind": "char", "chars": "x"},
                                 optimizer=partial(adamw, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99)),
                                 scheduler=partial(WarmupCosineLR, warmup_iters=1, lr_decay_iters=10, min_lr=1e-4),
                                 compile_model=compile_model))
        modules[-1].configure_model()
    eager, compiled = modules
    assert all(block._compiled_call_impl is not None for block in compiled.model.transformer.h)
    assert all(block._compiled_call_impl is None for block in eager.model.transformer.h)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x, y = torch.randint(0, 40, (3, 16)), torch.randint(0, 40, (3, 16))
    losses = []
    for module in (eager, compiled):
        _, loss = module(x, y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0])
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_model_compile_where_it_cannot_work_is_one_line(monkeypatch):
    import shutil

    from nanogpt_lightning.devices import check_compile
    from nanogpt_lightning.errors import UserError

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError) as err:
        check_compile(torch.device("cpu"))
    assert str(err.value) == ("model.compile=true: torch.compile on cpu needs a C++ compiler (g++ or clang++) on "
                              "the PATH; install one or pass model.compile=false")
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(UserError, match="torch.compile does not support this Python or platform"):
        check_compile(torch.device("cuda"))


def test_trainer_precision_auto_becomes_the_devices_pick_and_the_run_records_that(monkeypatch, tmp_path):
    from nanogpt_lightning.errors import UserError
    from nanogpt_lightning.train import run as training
    from nanogpt_lightning.train.settings import compose_train_config

    for has_units, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda has_units=has_units: has_units)
        cfg = compose_train_config(["trainer.precision=auto", "trainer.accelerator=cpu"])
        training.resolve_precision(cfg, torch.device("cpu"))
        assert cfg.trainer.precision == expected
        assert training.run_settings(cfg)["trainer.precision"] == expected
    cfg = compose_train_config(["trainer.precision=16-mixed", "trainer.accelerator=cpu"])
    with pytest.raises(UserError, match=r"^trainer.precision=16-mixed \(float16 with loss scaling\) needs cuda"):
        training.resolve_precision(cfg, torch.device("cpu"))
    for alias, ran in (("bf16", "bf16-mixed"), ("32", "32-true"), ("64", "64-true")):  # Lightning's short names
        cfg = compose_train_config([f"trainer.precision={alias}", "trainer.accelerator=cpu"])
        training.resolve_precision(cfg, torch.device("cpu"))
        assert cfg.trainer.precision == ran and training.run_settings(cfg)["trainer.precision"] == ran
