import math
from dataclasses import asdict

import pytest
import torch

from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.model.gpt import GPT, apply_rotary, rotary_table

# each modern option alone, and all together (tests/test_fused_loss.py and test_sampling.py use these too);
# a small soft cap, so that it changes the logits of these tiny models
MODEL_OPTIONS = {
    "rotary": dict(rotary=True),
    "rmsnorm": dict(norm="rmsnorm"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(mlp="relu2"),
    "untied": dict(tie_embeddings=False),
    "softcap": dict(logit_softcap=5.0),
    "zero_init": dict(zero_init=True),
    "value_embeddings": dict(value_embeddings=True),
    "trigram": dict(trigram_buckets=61),
}
OPTION_SETS = {"default": {}, **MODEL_OPTIONS,
               "all": {key: value for option in MODEL_OPTIONS.values() for key, value in option.items()}}
# the parameters of nanoGPT's model (2 layers, no bias), as checkpoints written before the options hold them
OLD_STATE_DICT_KEYS = [
    "transformer.wte.weight", "transformer.wpe.weight",
    *(f"transformer.h.{i}.{name}.weight" for i in range(2)
      for name in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")),
    "transformer.ln_f.weight", "lm_head.weight",
]


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    options = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)
    return GPT(GPTConfig(**{**options, **overrides}))


def scrambled_gpt(**overrides) -> GPT:
    """A tiny GPT with noise on every parameter: zero-initialised layers and uniform logits hide nothing."""
    model = tiny_gpt(**overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_every_model_option_trains(options):
    """A few dozen AdamW steps on one small batch: the loss falls from log(vocab) to a small fraction of it."""
    model = tiny_gpt(vocab_size=40, **options)
    generator = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, 40, (4, 16), generator=generator) for _ in range(2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(40), abs=0.1)
    assert losses[-1] < losses[0] / 4


def test_untrained_loss_is_near_log_vocab():
    model = tiny_gpt().eval()
    x = torch.randint(0, 65, (8, 16))
    y = torch.randint(0, 65, (8, 16))
    _, loss = model(x, y)
    assert loss.item() == pytest.approx(math.log(65), abs=0.05)


@pytest.mark.parametrize("tied", [True, False])
def test_padded_vocabulary(tied):
    model = tiny_gpt(vocab_size=50257, vocab_multiple=64, tie_embeddings=tied)
    assert model.lm_head.weight.shape[0] == model.transformer.wte.weight.shape[0] == 50304
    assert (model.transformer.wte.weight is model.lm_head.weight) == tied


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_changing_a_later_token_never_changes_an_earlier_logit(options):
    model = scrambled_gpt(**options)
    x = torch.randint(0, 65, (1, 16))
    with torch.no_grad():
        before = model.logits(model.hidden_states(x))
        for t in range(16):
            changed = x.clone()
            changed[0, t] = (changed[0, t] + 1) % 65
            after = model.logits(model.hidden_states(changed))
            assert torch.equal(after[:, :t], before[:, :t])
            assert not torch.allclose(after[:, t], before[:, t])


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_kv_cache_gives_the_same_hidden_states_as_one_pass(options):
    """Also the rotary positions: cached queries and keys continue at the cache's length."""
    model = scrambled_gpt(**options)
    x = torch.randint(0, 65, (2, 16))
    with torch.no_grad():
        full = model.hidden_states(x)
        caches = [{} for _ in model.transformer.h]
        parts = [model.hidden_states(x[:, :5], caches), model.hidden_states(x[:, 5:6], caches),
                 model.hidden_states(x[:, 6:], caches)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_rotary_attention_scores_depend_only_on_the_distance():
    torch.manual_seed(0)
    cos, sin = rotary_table(8, 40)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        return (apply_rotary(q, cos[m:m + 1], sin[m:m + 1]) * apply_rotary(k, cos[n:n + 1], sin[n:n + 1])).sum()

    torch.testing.assert_close(score(0, 0), (q * k).sum())  # position 0 is not rotated
    torch.testing.assert_close(score(7, 3), score(30, 26))
    assert not torch.allclose(score(7, 3), score(7, 4))
    assert torch.allclose(apply_rotary(q, cos[5:6], sin[5:6]).norm(), q.norm())


def test_a_config_without_the_new_keys_builds_the_old_model():
    """Checkpoints written before the modern options store asdict(GPTConfig) without them: same model."""
    stored = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False,
                  vocab_multiple=1, fused_loss=True)
    config = GPTConfig(**stored)
    assert {k: v for k, v in asdict(config).items() if k in stored} == stored
    assert (config.rotary, config.norm, config.qk_norm, config.mlp, config.tie_embeddings, config.logit_softcap,
            config.zero_init, config.value_embeddings, config.trigram_buckets) == (
        False, "layernorm", False, "gelu", True, None, False, False, 0)
    model = GPT(config)
    assert list(model.state_dict()) == OLD_STATE_DICT_KEYS
    assert model.transformer.wte.weight is model.lm_head.weight
    assert model.num_params() == model.num_params(non_embedding=False) - 16 * 32
    x = torch.randint(0, 65, (1, 16))
    torch.testing.assert_close(model(x)[0], model.lm_head(model.hidden_states(x)[:, [-1]]))  # no cap


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_state_dict_keys_of_every_option(options):
    """Only rotary (no wpe), the value embeddings (vte, one table per layer) and the trigram table (tte) change
    the parameter names; rotary's cos/sin table is not saved."""
    model = tiny_gpt(**options)
    expected = [k for k in OLD_STATE_DICT_KEYS if not (options.get("rotary") and k == "transformer.wpe.weight")]
    if options.get("value_embeddings"):
        at = expected.index("transformer.h.0.ln_1.weight")
        expected[at:at] = ["transformer.vte.0.weight", "transformer.vte.1.weight"]
    if options.get("trigram_buckets"):
        at = expected.index("transformer.h.0.ln_1.weight")
        expected[at:at] = ["transformer.tte.weight"]
    assert list(model.state_dict()) == expected
    assert ("wpe" in model.transformer) != bool(options.get("rotary"))
    GPT(model.config).load_state_dict(model.state_dict())  # strict


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_parameter_count_leaves_out_embedding_lookups_only(options):
    model = tiny_gpt(**options)
    lookups = 0 if options.get("rotary") else 16 * 32  # wpe
    if not options.get("tie_embeddings", True):
        lookups += 65 * 32  # wte, not the output layer
    if options.get("value_embeddings"):
        lookups += 2 * 65 * 32  # a table per layer
    if options.get("trigram_buckets"):
        lookups += 61 * 32
    assert model.num_params(non_embedding=False) == sum(p.numel() for p in model.parameters())
    assert model.num_params() == model.num_params(non_embedding=False) - lookups


@pytest.mark.parametrize("tied", [True, False])
def test_zero_init_zeroes_the_output_projections(tied):
    model = tiny_gpt(zero_init=True, tie_embeddings=tied)
    projections = [p for name, p in model.named_parameters() if name.endswith("c_proj.weight")]
    assert len(projections) == 4 and all(not p.any() for p in projections)
    assert model.lm_head.weight.any() == tied  # tied, it is the token embedding
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert tiny_gpt().transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_soft_capped_logits_stay_within_the_cap():
    model = scrambled_gpt(logit_softcap=2.0)
    x = torch.randint(0, 65, (2, 16))
    with torch.no_grad():
        hidden = model.hidden_states(x)
        raw = model.lm_head(hidden)
        assert raw.abs().max() > 2.5
        torch.testing.assert_close(model.logits(hidden), 2.0 * torch.tanh(raw / 2.0))
        torch.testing.assert_close(model(x)[0], model.logits(hidden[:, [-1]]))
        assert model.logits(hidden).abs().max() < 2.0


def test_sequence_longer_than_the_block_is_refused():
    with pytest.raises(ValueError, match="block size is 16"):
        tiny_gpt()(torch.zeros(1, 17, dtype=torch.long))


def test_invalid_shape_is_refused():
    with pytest.raises(ValueError, match="n_embd .* divisible by model.n_head"):
        GPTConfig(block_size=8, vocab_size=10, n_embd=30, n_head=4)


@pytest.mark.parametrize("setting, message", [
    (dict(norm="batchnorm"), "model.norm must be one of layernorm, rmsnorm, got 'batchnorm'; "
                             "pass e.g. model.norm=layernorm"),
    (dict(mlp="swiglu"), "model.mlp must be one of gelu, gelu_tanh, relu2, got 'swiglu'; pass e.g. model.mlp=gelu"),
    (dict(logit_softcap=0.0), "model.logit_softcap must be a positive number or null, got 0.0; "
                              "pass e.g. model.logit_softcap=30"),
    (dict(logit_softcap=-30), "model.logit_softcap must be a positive number or null, got -30; "
                              "pass e.g. model.logit_softcap=30"),
    (dict(logit_softcap=math.inf), "model.logit_softcap must be a positive number or null, got inf; "
                                   "pass e.g. model.logit_softcap=30"),
    (dict(rotary=True, n_embd=12, n_head=4), "model.rotary needs an even head size, got n_embd / n_head = 3; "
                                             "pass e.g. model.n_embd=16, or model.rotary=false"),
    (dict(dropout=1.0), "model.dropout must be a number in [0, 1), got 1.0; pass e.g. model.dropout=0.1"),
    (dict(n_layer=0), "model.n_layer must be a positive integer, got 0; pass e.g. model.n_layer=1"),
    (dict(block_size=0), "data.block_size must be a positive integer, got 0; pass e.g. data.block_size=1"),
])
def test_invalid_model_option_is_refused(setting, message):
    """In the words of the training config's check (tests/test_config.py): the same rule, the same function."""
    with pytest.raises(ValueError) as err:
        GPTConfig(**{"block_size": 8, "vocab_size": 10, **setting})
    assert str(err.value) == message


def test_weight_decay_groups_cover_every_parameter_once():
    model = tiny_gpt(bias=True)
    decay, no_decay = model.optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_value_embeddings_start_at_zero_and_add_each_layers_token_vector_to_the_values():
    """Zero tables give the model without them (same weights otherwise); a layer's table row for a token is
    what that layer's attention adds to its values, at exactly the positions holding the token, and the
    change reaches no earlier position."""
    model = tiny_gpt(value_embeddings=True)
    plain = tiny_gpt()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("transformer.vte.")})
    x = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(0))
    assert all(not table.weight.any() for table in model.transformer.vte)
    before = model.hidden_states(x)
    torch.testing.assert_close(before, plain.hidden_states(x))

    token = int(x[0, 3])
    with torch.no_grad():
        model.transformer.vte[1].weight[token] = torch.arange(32.0) / 32
    attn, added = model.transformer.h[1].attn, {}
    forward = attn.forward
    attn.forward = lambda h, kv_cache, rotary, value_embedding: (
        added.setdefault("v", value_embedding), forward(h, kv_cache, rotary, value_embedding))[1]
    after = model.hidden_states(x)
    expected = torch.zeros(2, 16, 32)
    expected[x == token] = torch.arange(32.0) / 32
    torch.testing.assert_close(added["v"], expected)
    first = int((x[0] == token).nonzero()[0])
    torch.testing.assert_close(after[0, :first], before[0, :first])
    assert not torch.allclose(after[0, first:], before[0, first:])


def test_trigram_buckets_hash_each_token_with_the_two_before_it_in_the_window():
    """Before the window's first token stands a marker that is no token (65 here); a zero table gives the model
    without it; a row reaches the input at exactly the positions hashed to it, and no earlier position."""
    model = tiny_gpt(trigram_buckets=61)
    x = torch.tensor([[5, 7, 9, 5, 7, 9, 11]])
    base = 66
    by_hand = [((65 * base + 65) * base + 5) % 61, ((65 * base + 5) * base + 7) % 61,
               ((5 * base + 7) * base + 9) % 61, ((7 * base + 9) * base + 5) % 61,
               ((9 * base + 5) * base + 7) % 61, ((5 * base + 7) * base + 9) % 61, ((7 * base + 9) * base + 11) % 61]
    assert model.trigram_buckets_of(x).tolist() == [by_hand]
    plain = tiny_gpt()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "transformer.tte.weight"})
    before = model.hidden_states(x)
    torch.testing.assert_close(before, plain.hidden_states(x))
    with torch.no_grad():
        model.transformer.tte.weight[by_hand[2]] = 1.0  # the trigram (5, 7, 9), at positions 2 and 5
    after = model.hidden_states(x)
    torch.testing.assert_close(after[:, :2], before[:, :2])
    assert not torch.allclose(after[:, 2], before[:, 2])


def test_trigram_buckets_must_not_be_negative():
    with pytest.raises(ValueError, match="^model.trigram_buckets must be a non-negative number of buckets, got -1"):
        tiny_gpt(trigram_buckets=-1)
