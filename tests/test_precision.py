"""bf16-mixed training on the CPU: the loss falls, checkpoints keep float32 weights, and resume is exact."""

import lightning as L
import torch

from conftest import fit_tiny


# clipped, with the fused AdamW (Lightning alone refuses to clip a fused optimizer under mixed precision)
BF16_RUN = {"precision": "bf16-mixed", "lr": 1e-2, "lr_decay_iters": 100, "gradient_clip_val": 1.0}


class Recorder(L.Callback):
    """Each iteration's training loss."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def test_bf16_mixed_trains_in_bfloat16_keeps_float32_weights_and_resumes_exactly(tmp_path, monkeypatch):
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
