"""Sampling from tiny trained checkpoints (one char-level, one GPT-2 BPE), in process and through the script."""

import io
import os
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from helpers import run_script
from nanogpt_lightning.data.tokenizer import GPT2Tokenizer
from nanogpt_lightning.errors import UserError
from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.model.gpt import GPT
from nanogpt_lightning.tools.sample import (
    SEPARATOR,
    generate,
    read_prompt,
    sample,
    stream_text,
)
from nanogpt_lightning.train.checkpoints import load_checkpoint, resolve_checkpoint
from test_model import OPTION_SETS, scrambled_gpt
from test_train import train_in_process

BLOCK_SIZE = 16  # TINY_RUN's data.block_size
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Train the char and the BPE model (in this process: a second each; the script is test_train.py's)."""
    tmp = tmp_path_factory.mktemp("sampling")
    for tokenizer, steps in (("char", 30), ("gpt2", 4)):
        train_in_process(tmp / tokenizer, f"data.tokenizer={tokenizer}", f"data.data_dir={tmp / tokenizer}_data",
                         f"trainer.max_steps={steps}", f"eval_interval={steps}")
    return {"char": tmp / "char", "gpt2": tmp / "gpt2"}


def quiet_sample(ckpt: Path, **settings) -> list[str]:
    return sample(str(ckpt), out=io.StringIO(), info=io.StringIO(), **{"num_samples": 2, "max_new_tokens": 24,
                                                                        "device": "cpu", **settings})


def nanogpt_generate(model, ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None) -> list[int]:
    """nanoGPT's generate, as a reference: the full cropped context recomputed for every token."""
    idx = torch.tensor([ids])
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        logits = logits[:, -1, :model.config.vocab_size]
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
        idx = torch.cat((idx, next_id), dim=1)
    return idx[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_same_seed_same_text_other_seed_other_text(runs, kind):
    first = quiet_sample(runs[kind], prompt="Shall I", seed=7)
    assert quiet_sample(runs[kind], prompt="Shall I", seed=7) == first
    assert quiet_sample(runs[kind], prompt="Shall I", seed=8) != first
    assert len(first) == 2 and all(s.startswith("Shall I") and len(s) > len("Shall I") for s in first)


@pytest.mark.parametrize("temperature, top_k", [(0, None), (0.8, 20), (1.0, None)])
def test_kv_cache_gives_the_tokens_of_full_recomputation_also_past_the_block(runs, temperature, top_k):
    model, tokenizer, _ = load_checkpoint(resolve_checkpoint(str(runs["char"])), CPU)
    prompt = tokenizer.encode("When I do count")
    n_new = 3 * BLOCK_SIZE  # the sequence outgrows the block: the context is cropped
    torch.manual_seed(0)
    ours = list(generate(model, prompt, n_new, temperature, top_k))
    torch.manual_seed(0)
    with torch.no_grad():
        assert ours == nanogpt_generate(model, prompt, n_new, temperature, top_k)
    assert len(ours) == n_new


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_kv_cache_gives_the_logits_and_tokens_of_recomputation_for_every_model_option(options):
    """Greedy, three blocks long: inside the block the cache continues the (rotary) positions at its length;
    past it every step recomputes the cropped context from position 0, as nanoGPT does."""
    model = scrambled_gpt(block_size=8, vocab_multiple=8, **options)  # 65 -> 72: padding is dropped
    prompt = [3, 1, 4]
    logits = {"cache": [], "recompute": []}
    tokens = {}
    real_logits = model.logits
    for way, run in (("cache", lambda: list(generate(model, prompt, 24, temperature=0))),
                     ("recompute", lambda: nanogpt_generate(model, prompt, 24, temperature=0, top_k=None))):
        def recorded(hidden, way=way):  # the logits of the newest position, as each way computes them
            out = real_logits(hidden)
            logits[way].append(out.reshape(-1, out.size(-1))[-1, :65])
            return out

        model.logits = recorded
        with torch.no_grad():
            tokens[way] = run()
        del model.logits
    assert tokens["cache"] == tokens["recompute"] and len(set(tokens["cache"])) > 1
    assert len(logits["cache"]) == len(logits["recompute"]) == 24
    torch.testing.assert_close(torch.stack(logits["cache"]), torch.stack(logits["recompute"]),
                               rtol=1e-5, atol=1e-5)


def test_greedy_ignores_the_seed(runs):
    greedy = quiet_sample(runs["char"], temperature=0, seed=1)
    assert greedy == quiet_sample(runs["char"], temperature=0, seed=2)
    assert greedy[0] == greedy[1]


def test_file_prompt_is_the_files_text(runs, tmp_path):
    text = "From fairest creatures\nwe desire increase,\n"
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(text)
    from_file = quiet_sample(runs["char"], prompt=f"FILE:{prompt_file}", temperature=0)
    assert from_file == quiet_sample(runs["char"], prompt=text, temperature=0)
    assert from_file[0].startswith(text)
    with pytest.raises(UserError, match="cannot read the prompt file"):
        read_prompt(f"FILE:{tmp_path / 'missing.txt'}")


def test_topk_refused_by_the_device_falls_back_to_the_cpu(runs, monkeypatch):
    """What mps does in older PyTorch: `Currently topk on mps works only for k<=16`. Simulated on the CPU:
    the first top-k call is refused; the same tokens must come, the rest of the way without retrying."""
    real_topk = torch.topk
    calls = []

    def refusing_once(logits, k, *args, **kwargs):
        calls.append(k)
        if len(calls) == 1 and k > 16:
            raise RuntimeError("Currently topk on mps works only for k<=16")
        return real_topk(logits, k, *args, **kwargs)

    expected = quiet_sample(runs["char"], top_k=20, num_samples=1, max_new_tokens=10)
    monkeypatch.setattr(torch, "topk", refusing_once)
    assert quiet_sample(runs["char"], top_k=20, num_samples=1, max_new_tokens=10) == expected
    assert calls == [20] * 11  # one refusal, then one CPU call per token


def test_bpe_stream_holds_back_a_split_character():
    tokenizer = GPT2Tokenizer()
    ids = tokenizer.encode("naïve 😀 café")
    pieces = list(stream_text(tokenizer, iter(ids)))
    assert "".join(pieces) == "naïve 😀 café"
    assert not any("\ufffd" in piece for piece in pieces)
    assert len(pieces) < len(ids)  # the emoji's byte tokens came out as one piece


def test_device_setting_goes_through_the_shared_device_choice(runs, monkeypatch):
    """`device=auto` samples on the best device present; an absent one is named by its setting, `device`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    info = io.StringIO()
    sample(str(runs["char"]), num_samples=1, max_new_tokens=2, device="auto", out=io.StringIO(), info=info)
    assert info.getvalue().splitlines()[0].endswith(" on cpu in 32-true")  # the run's precision
    assert info.getvalue().splitlines()[1].startswith("trained on sonnets.txt (sha256 ")  # the data it learnt
    with pytest.raises(UserError) as err:
        quiet_sample(runs["char"], device="mps")
    assert str(err.value) == "device=mps is not available here; available: cpu (or device=auto)"


def test_checkpoint_from_a_file_a_run_dir_or_the_newest_run(runs, tmp_path):
    last = runs["char"] / "checkpoints" / "last.ckpt"
    assert resolve_checkpoint(str(runs["char"])) == last
    assert resolve_checkpoint(str(last.parent)) == last
    assert resolve_checkpoint(str(last)) == last
    older, newer = tmp_path / "runs/a/checkpoints/last.ckpt", tmp_path / "sweeps/s/0_x/checkpoints/last.ckpt"
    for i, path in enumerate([newer, older]):
        path.parent.mkdir(parents=True)
        path.touch()
        os.utime(path, (1_000_000 - i, 1_000_000 - i))
    assert resolve_checkpoint("latest", runs_root=tmp_path) == newer
    with pytest.raises(UserError, match="no checkpoints under"):
        resolve_checkpoint("latest", runs_root=tmp_path / "empty")


def test_checkpoint_errors_say_what_is_wrong(tmp_path):
    out, info = io.StringIO(), io.StringIO()
    with pytest.raises(UserError) as err:  # what sample.py says (its one `error:` line: tests/test_config.py)
        sample(str(tmp_path / "nope.ckpt"), out=out, info=info)
    assert str(err.value) == (f"checkpoint {tmp_path / 'nope.ckpt'} does not exist; "
                              "pass ckpt=FILE.ckpt, a run directory or ckpt=latest")
    assert out.getvalue() == info.getvalue() == ""
    with pytest.raises(UserError, match="no last.ckpt in"):
        resolve_checkpoint(str(tmp_path))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(garbage, CPU)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, foreign)
    with pytest.raises(UserError, match="not a nanogpt_lightning checkpoint"):
        load_checkpoint(foreign, CPU)


def test_prompt_outside_the_character_vocabulary_names_the_characters(runs):
    with pytest.raises(UserError, match="cannot encode the prompt.*'é' 'ü'"):
        quiet_sample(runs["char"], prompt="café über")


def test_an_empty_prompt_is_refused(runs):
    # the ranges of the numeric settings are config.validate_sample_config's (tests/test_config.py)
    with pytest.raises(UserError, match="the prompt is empty"):
        quiet_sample(runs["char"], prompt="")


def test_script_streams_separated_samples_and_leaves_no_files(runs, tmp_path):
    result = run_script("sample.py", f"ckpt={runs['gpt2']}", "prompt=Shall I", "num_samples=3",
                        "max_new_tokens=5", "seed=3", cwd=tmp_path)
    samples = result.stdout.split(f"\n{SEPARATOR}\n")
    assert samples[-1] == "" and len(samples) == 4
    assert all(s.startswith("Shall I") for s in samples[:3])
    assert "tokens/s" in result.stderr.splitlines()[-1]
    assert {p.name for p in tmp_path.iterdir()} <= {"cache"}  # at most run_script's; no outputs/, .hydra or log


def test_padding_of_the_vocabulary_is_never_sampled():
    """With vocab_multiple the output layer has rows for no token; zero weights make all 64 logits equal."""
    model = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8, vocab_multiple=64)).eval()
    torch.nn.init.zeros_(model.lm_head.weight)
    torch.manual_seed(0)
    tokens = list(generate(model, [1], 50, temperature=1.0))
    assert max(tokens) < 10 and len(set(tokens)) > 5
