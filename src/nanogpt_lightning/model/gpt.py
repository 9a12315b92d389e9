"""The GPT language model in plain PyTorch, after nanoGPT's model.py.

Knows nothing of Lightning or Hydra. References:
1) OpenAI's GPT-2 TensorFlow implementation: https://github.com/openai/gpt-2/blob/master/src/model.py
2) Karpathy's nanoGPT: https://github.com/karpathy/nanoGPT/blob/master/model.py
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanogpt_lightning.model.config import GPTConfig
from nanogpt_lightning.model.fused_loss import fused_linear_cross_entropy

ROTARY_BASE = 10000.0


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight and no bias."""

    def __init__(self, ndim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, 1e-5)


def make_norm(config: GPTConfig) -> nn.Module:
    return RMSNorm(config.n_embd) if config.norm == "rmsnorm" else LayerNorm(config.n_embd, bias=config.bias)


def rotary_table(head_size: int, length: int) -> torch.Tensor:
    """cos and sin of position x frequency, (2, length, head_size / 2): frequencies base^(-2i / head_size)."""
    inv_freq = ROTARY_BASE ** -(torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return torch.stack((angles.cos(), angles.sin())).float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by position: the pairs (i, i + D/2) (half-split, as GPT-NeoX and Llama) turn by
    the angle in cos/sin (T, D/2), so q . k depends on the positions only through their difference."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm

    def forward(self, x, kv_cache=None, rotary=None, value_embedding=None):
        """kv_cache: None, or a dict holding this layer's past keys and values, extended in place.
        rotary: None, or the (cos, sin) of the positions of x (see apply_rotary).
        value_embedding: None, or (B, T, C) vectors of x's tokens, added to the values."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        if value_embedding is not None:
            v = v + value_embedding
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:  # norm, then rotary (as modded-nanogpt): rotation keeps the norm
            q, k = F.rms_norm(q, (q.size(-1),), eps=1e-5), F.rms_norm(k, (k.size(-1),), eps=1e-5)
        if rotary is not None:  # the cache holds rotated keys: each keeps the rotation of its own position
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None and "k" in kv_cache:
            k = torch.cat((kv_cache["k"], k), dim=2)
            v = torch.cat((kv_cache["v"], v), dim=2)
        if kv_cache is not None:
            kv_cache["k"], kv_cache["v"] = k, v
        if T == k.size(2):
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        else:
            # new queries after cached keys: each query sees every cached key and the new ones up to itself
            past = k.size(2) - T
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.kind = config.mlp
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)
        if self.kind == "relu2":
            x = F.relu(x).square()
        else:
            x = F.gelu(x, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, rotary=None, value_embedding=None):
        x = x + self.attn(self.ln_1(x), kv_cache, rotary, value_embedding)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        vocab = config.padded_vocab_size
        modules = dict(wte=nn.Embedding(vocab, config.n_embd))
        if not config.rotary:
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        if config.value_embeddings:  # beside the blocks, not in them: embeddings, trained by AdamW under Muon
            modules["vte"] = nn.ModuleList([nn.Embedding(vocab, config.n_embd) for _ in range(config.n_layer)])
        if config.trigram_buckets:  # an input-side table, as wte: AdamW's under Muon
            modules["tte"] = nn.Embedding(config.trigram_buckets, config.n_embd)
        modules.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        )
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        if config.tie_embeddings:
            # weight tying: https://paperswithcode.com/method/weight-tying
            self.transformer.wte.weight = self.lm_head.weight
        if config.rotary:
            # cos and sin of every position of the block; not persistent: state_dicts stay as without rotary
            self.register_buffer("rotary_cos_sin", rotary_table(config.n_embd // config.n_head, config.block_size),
                                 persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections, or zeros (modded-nanogpt)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init:
                    torch.nn.init.zeros_(p)
                else:
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.zero_init and not config.tie_embeddings:
            torch.nn.init.zeros_(self.lm_head.weight)
        if config.value_embeddings:  # start as the model without them
            for table in self.transformer.vte:
                torch.nn.init.zeros_(table.weight)
        if config.trigram_buckets:
            torch.nn.init.zeros_(self.transformer.tte.weight)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; embedding lookups are left out by default: the position table (none with rotary),
        the value embeddings, and the token table when it is not tied to lm_head (tied, it is the output
        layer's matmul)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if "vte" in self.transformer:
                n -= sum(table.weight.numel() for table in self.transformer.vte)
            if "tte" in self.transformer:
                n -= self.transformer.tte.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def hidden_states(self, idx, kv_caches=None):
        """Final-norm hidden states (B, T, n_embd); with caches, positions continue after the cached ones."""
        T = idx.size(1)
        start = kv_caches[0]["k"].size(2) if kv_caches and "k" in kv_caches[0] else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"cannot forward a sequence of length {start + T}, block size is {self.config.block_size}"
            )
        x = self.transformer.wte(idx)
        if "tte" in self.transformer:
            x = x + self.transformer.tte(self.trigram_buckets_of(idx, kv_caches))
        rotary = None
        if self.config.rotary:
            rotary = self.rotary_cos_sin[:, start:start + T].unbind(0)
        else:
            x = x + self.transformer.wpe(torch.arange(start, start + T, dtype=torch.long, device=idx.device))
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            value_embedding = self.transformer.vte[i](idx) if "vte" in self.transformer else None
            x = block(x, kv_caches[i] if kv_caches is not None else None, rotary, value_embedding)
        return self.transformer.ln_f(x)

    def trigram_buckets_of(self, idx, kv_caches=None):
        """The bucket of each token with the two tokens before it in the window (B, T). Before the window's first
        token stands a marker that is no token, so a window scores the same whether it is passed whole or token
        by token through the caches (which keep the last two tokens for the next call)."""
        marker = self.config.padded_vocab_size
        before = kv_caches[0].get("last_tokens") if kv_caches else None
        if before is None:
            before = torch.full_like(idx[:, :2], marker)
        context = torch.cat((before, idx), dim=1)
        if kv_caches is not None:
            kv_caches[0]["last_tokens"] = context[:, -2:]
        base = marker + 1
        trigram = (context[:, :-2] * base + context[:, 1:-1]) * base + idx
        return trigram % self.config.trigram_buckets

    def logits(self, hidden):
        """The output layer on hidden states, soft-capped when logit_softcap is set (padded vocabulary included)."""
        logits = self.lm_head(hidden)
        cap = self.config.logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def forward(self, idx, targets=None):
        """With targets: (None, mean loss). Without: (logits of the last position, None)."""
        x = self.hidden_states(idx)
        if targets is None:
            return self.logits(x[:, [-1], :]), None
        hidden, flat_targets = x.view(-1, x.size(-1)), targets.view(-1)
        if self.config.fused_loss:
            loss = fused_linear_cross_entropy(hidden, self.lm_head.weight, flat_targets,
                                              softcap=self.config.logit_softcap)
        else:
            loss = F.cross_entropy(self.logits(hidden), flat_targets, ignore_index=-1)
        return None, loss

    def optimizer_groups(self, weight_decay: float):
        """nanoGPT's split: weight decay on every 2D tensor (matmuls, embeddings), none on biases and norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward) as in the PaLM paper, appendix B: 6N + 12 L H Q T."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.block_size
