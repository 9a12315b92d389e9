import math

import pytest
import torch

from nanogpt_lightning.model import GPT, GPTConfig


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    options = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**options, **overrides}))


def test_untrained_loss_is_near_log_vocab():
    model = tiny_gpt().eval()
    x = torch.randint(0, 65, (8, 16))
    y = torch.randint(0, 65, (8, 16))
    _, loss = model(x, y)
    assert loss.item() == pytest.approx(math.log(65), abs=0.05)


def test_padded_vocabulary():
    model = tiny_gpt(vocab_size=50257, vocab_multiple=64)
    assert model.lm_head.weight.shape[0] == 50304
    assert model.transformer.wte.weight is model.lm_head.weight


def test_changing_a_later_token_never_changes_an_earlier_logit():
    model = tiny_gpt().eval()
    x = torch.randint(0, 65, (1, 16))
    with torch.no_grad():
        before = model.lm_head(model.hidden_states(x))
        for t in range(16):
            changed = x.clone()
            changed[0, t] = (changed[0, t] + 1) % 65
            after = model.lm_head(model.hidden_states(changed))
            assert torch.equal(after[:, :t], before[:, :t])
            assert not torch.allclose(after[:, t], before[:, t])


def test_kv_cache_gives_the_same_hidden_states_as_one_pass():
    model = tiny_gpt().eval()
    x = torch.randint(0, 65, (2, 12))
    with torch.no_grad():
        full = model.hidden_states(x)
        caches = [{} for _ in model.transformer.h]
        parts = [model.hidden_states(x[:, :5], caches), model.hidden_states(x[:, 5:6], caches),
                 model.hidden_states(x[:, 6:], caches)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_sequence_longer_than_the_block_is_refused():
    with pytest.raises(ValueError, match="block size is 16"):
        tiny_gpt()(torch.zeros(1, 17, dtype=torch.long))


def test_invalid_shape_is_refused():
    with pytest.raises(ValueError, match="n_embd .* divisible by model.n_head"):
        GPTConfig(block_size=8, vocab_size=10, n_embd=30, n_head=4)


def test_weight_decay_groups_cover_every_parameter_once():
    model = tiny_gpt(bias=True)
    decay, no_decay = model.optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
