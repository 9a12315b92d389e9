"""optimizer=muon: Muon on the block matrices, AdamW on the rest, as one optimizer that Lightning, the LR
schedule, the non-finite skip and checkpoints see as one."""

import copy
import dataclasses
from functools import partial

import lightning as L
import pytest
import torch

from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.model.gpt import GPT
from nanogpt_lightning.train.module import GPTModule
from nanogpt_lightning.train.optimizers import BatchedMuon, MuonAdamW, muon, muon_split
from nanogpt_lightning.train.schedules import WarmupCosineLR
from test_data import make_datamodule

CONFIG = GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=32)
SETTINGS = dict(lr=0.02, adamw_lr=3e-3, weight_decay=0.01, adamw_weight_decay=0.1, momentum=0.95, betas=(0.9, 0.99))


def tiny_model(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CONFIG)


def batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(CONFIG.vocab_size, (4, CONFIG.block_size), generator=generator),
            torch.randint(CONFIG.vocab_size, (4, CONFIG.block_size), generator=generator))


def train(model, optimizer, steps, scheduler=None, first_batch=0) -> list[float]:
    losses = []
    for i in range(steps):
        x, y = batch(first_batch + i)
        optimizer.zero_grad(set_to_none=True)

        def closure(x=x, y=y):
            _, loss = model(x, y)
            loss.backward()
            losses.append(loss.item())
            return loss
        optimizer.step(closure)
        if scheduler is not None:
            scheduler.step()
    return losses


def test_split_muon_takes_the_block_matrices_adamw_the_rest_each_parameter_once():
    model = tiny_model()
    hidden, rest = muon_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in hidden) == sorted(
        f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                     "mlp.c_proj"))
    assert {names[id(p)] for p in rest} >= {"transformer.wte.weight", "transformer.wpe.weight"}
    assert all(p.dim() < 2 or not names[id(p)].startswith("transformer.h.") for p in rest)
    # value embeddings and the trigram table are tables beside the blocks: AdamW's, as the token embedding
    with_tables = GPT(dataclasses.replace(CONFIG, value_embeddings=True, trigram_buckets=61))
    hidden_too, rest_too = muon_split(with_tables)
    table_names = {n for n, p in with_tables.named_parameters() if any(p is q for q in rest_too)}
    assert {"transformer.vte.0.weight", "transformer.vte.1.weight", "transformer.tte.weight"} <= table_names
    assert len(hidden_too) == len(hidden)
    optimizer = muon(model, **SETTINGS)
    in_groups = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(in_groups) == len({id(p) for p in in_groups}) == len(list(model.parameters()))  # tied: once
    assert {id(p) for p in in_groups} == {id(p) for p in model.parameters()}
    # the groups are the inner optimizers' own dicts, Muon's first (the schedule's max_lr is its lr)
    assert all(a is b for a, b in zip(optimizer.param_groups,
                                      optimizer.muon.param_groups + optimizer.adamw.param_groups, strict=True))
    assert isinstance(optimizer.muon, BatchedMuon) and optimizer.adamw.defaults["fused"]
    muon_group, decay, no_decay = optimizer.param_groups
    assert (muon_group["lr"], muon_group["weight_decay"], muon_group["momentum"]) == (0.02, 0.01, 0.95)
    assert (decay["lr"], decay["weight_decay"], decay["betas"], no_decay["weight_decay"]) == (3e-3, 0.1, (0.9, 0.99), 0)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])


def test_loss_falls_on_a_fixed_batch():
    model = tiny_model()
    optimizer = muon(model, **SETTINGS)
    x, y = batch()
    losses = []
    for _ in range(30):
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_batched_newton_schulz_matches_torch_muon():
    """BatchedMuon's update is torch.optim.Muon's: same momentum buffers, parameters within bf16 rounding."""
    ours, theirs = tiny_model(), tiny_model()
    opt_ours = BatchedMuon(muon_split(ours)[0], lr=0.02, weight_decay=0.1, momentum=0.95)
    opt_theirs = torch.optim.Muon(muon_split(theirs)[0], lr=0.02, weight_decay=0.1, momentum=0.95)
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        for p, q in zip(muon_split(ours)[0], muon_split(theirs)[0]):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        before = [p.clone() for p in muon_split(ours)[0]]
        opt_ours.step()
        opt_theirs.step()
        for p, q, p0 in zip(muon_split(ours)[0], muon_split(theirs)[0], before):
            assert torch.equal(opt_ours.state[p]["momentum_buffer"], opt_theirs.state[q]["momentum_buffer"])
            # both orthogonalize in bfloat16 (on this CPU bit-equal); updates are ~0.01, so 1e-4 is bf16's ~1%
            torch.testing.assert_close(p - p0, q - p0, rtol=0, atol=1e-4)
            p.data.copy_(q)  # carry on from the same parameters
    assert opt_ours.state_dict()["state"].keys() == opt_theirs.state_dict()["state"].keys()


def test_schedule_scales_both_inner_optimizers_by_the_same_factor():
    model = tiny_model()
    optimizer = muon(model, **SETTINGS)
    scheduler = WarmupCosineLR(optimizer, warmup_iters=2, lr_decay_iters=10, min_lr=2e-3)
    initial = [g["lr"] for g in optimizer.muon.param_groups + optimizer.adamw.param_groups]
    assert initial[0] == pytest.approx(0.02 / 3) and initial[1] == pytest.approx(3e-3 / 3)  # warmup's first
    train(model, optimizer, 6, scheduler)
    factor = scheduler.lr_lambdas[0](6)
    assert 0.1 < factor < 1
    lrs = [g["lr"] for g in optimizer.muon.param_groups + optimizer.adamw.param_groups]
    assert lrs == pytest.approx([0.02 * factor, 3e-3 * factor, 3e-3 * factor])


def test_state_dict_round_trip_resumes_bit_exactly():
    model = tiny_model()
    optimizer = muon(model, **SETTINGS)
    scheduler = WarmupCosineLR(optimizer, warmup_iters=2, lr_decay_iters=20, min_lr=2e-3)
    train(model, optimizer, 5, scheduler)
    saved = [{k: v.clone() for k, v in model.state_dict().items()},
             copy.deepcopy(optimizer.state_dict()),
             scheduler.state_dict()]
    train(model, optimizer, 5, scheduler, first_batch=5)

    resumed = tiny_model(seed=1)
    resumed.load_state_dict(saved[0])
    optimizer2 = muon(resumed, **SETTINGS)
    scheduler2 = WarmupCosineLR(optimizer2, warmup_iters=2, lr_decay_iters=20, min_lr=2e-3)
    optimizer2.load_state_dict(saved[1])
    scheduler2.load_state_dict(saved[2])
    # loading gave the inner optimizers new group dicts; the wrapper's list (the scheduler's) shares them
    assert all(a is b for a, b in zip(optimizer2.param_groups,
                                      optimizer2.muon.param_groups + optimizer2.adamw.param_groups, strict=True))
    train(resumed, optimizer2, 5, scheduler2, first_batch=5)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="not Muon"):
        optimizer2.load_state_dict(torch.optim.AdamW(resumed.parameters()).state_dict())


def test_a_step_without_gradients_changes_nothing():
    """The non-finite skip: zero_grad(set_to_none=True), then step(): parameters and state untouched."""
    model = tiny_model()
    optimizer = muon(model, **SETTINGS)
    train(model, optimizer, 2)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    before = [(id(p), {n: t.clone() for n, t in s.items()}) for p, s in optimizer.state.items()]
    assert len(before) == len(list(model.parameters()))  # the joint view holds both optimizers' state
    optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())
    after = [(id(p), s) for p, s in optimizer.state.items()]
    assert [i for i, _ in before] == [i for i, _ in after]
    for (_, s0), (_, s1) in zip(before, after):
        assert s0.keys() == s1.keys() and all(torch.equal(s0[n], s1[n]) for n in s0)


def fit(tmp_path, max_steps, ckpt_path=None, save_to=None) -> GPTModule:
    """A tiny Lightning run with Muon + AdamW, accumulation 2 and clipping."""
    data = make_datamodule(tmp_path, block_size=16, batch_size=4, eval_iters=1)
    data.prepare_data()
    L.seed_everything(7, verbose=False)
    module = GPTModule(GPTConfig(block_size=16, vocab_size=data.vocab_size, n_layer=1, n_head=2, n_embd=32),
                       data.meta["tokenizer"], optimizer=partial(muon, **SETTINGS),
                       scheduler=partial(WarmupCosineLR, warmup_iters=2, lr_decay_iters=20, min_lr=2e-3))
    trainer = L.Trainer(max_steps=max_steps, max_epochs=-1, accumulate_grad_batches=2, gradient_clip_val=0.5,
                        limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu", devices=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        logger=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    assert isinstance(trainer.optimizers[0], MuonAdamW)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return module


def test_lightning_checkpoint_resume_repeats_an_unbroken_run(tmp_path):
    unbroken = fit(tmp_path, 6)
    fit(tmp_path, 3, save_to=tmp_path / "three.ckpt")
    resumed = fit(tmp_path, 6, ckpt_path=tmp_path / "three.ckpt")
    assert unbroken.trainer.global_step == resumed.trainer.global_step == 6
    for (name, a), b in zip(unbroken.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.trainer.optimizers[0].param_groups[1]["lr"] == unbroken.trainer.optimizers[0].param_groups[1]["lr"]


def test_ns_steps_sets_the_newton_schulz_iterations_of_each_update(monkeypatch):
    from nanogpt_lightning.train import optimizers

    seen = []
    real = optimizers.orthogonalize
    monkeypatch.setattr(optimizers, "orthogonalize",
                        lambda matrices, coefficients, steps, eps: seen.append(steps) or real(matrices, coefficients,
                                                                                               steps, eps))
    for ns_steps in (5, 3):
        model = tiny_model()
        train(model, muon(model, **SETTINGS, ns_steps=ns_steps), 1)
    assert set(seen[:len(seen) // 2]) == {5} and set(seen[len(seen) // 2:]) == {3}
