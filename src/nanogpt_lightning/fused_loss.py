"""Output layer + cross-entropy fused, in row chunks: the full (rows x vocab) logits of a big batch never exist.

With a 50k vocabulary the logits of a small model dwarf everything else it computes. Here each chunk of
rows makes its logits, turns them into the loss and, when gradients are wanted, straight into the
gradients of the hidden states and of the output weight, then drops them. The backward pass only scales
those stored gradients. PyTorch ops (one matmul through oneDNN on x86 CPUs, see matmul): runs on cpu, mps
and cuda.

Per chunk the (rows x vocab) block lives in one buffer and is touched by the logits matmul, one in-place
softmax (P), two row-max reads (they give the log-sum-exp exactly, see below) and the two gradient
matmuls. The one-hot part of P - Y is done once on (rows, n_embd) tensors:
d(loss)/d(hidden) = scale * (P @ W - W[targets]) and
d(loss)/d(W) = P^T @ (scale * hidden), minus scale * hidden added at the target rows of W.

Soft-capped logits (softcap=c: z = c * tanh(raw / c), raw = hidden @ W^T) change the gradient wrt the raw
logits to (P - Y) * (1 - t^2), t = tanh(raw / c). With gradients wanted, each chunk then keeps t in a
second (rows x vocab) buffer, scales P in place by 1 - t^2 before the two gradient matmuls, and the one-hot
terms take the target's factor 1 - t_target^2 = 1 - (z_target / c)^2. The two buffers together stay within
CHUNK_BYTES (half the rows per chunk). Without a cap nothing of this runs.
"""

import functools
import platform

import torch

# bytes of one chunk's (rows x vocab) block at most: per chunk the output weight is read twice and its
# gradient updated once, so fewer, bigger chunks are faster, up to a size that still bounds the memory
CHUNK_BYTES = 64 * 2**20


@functools.cache
def _onednn_linear():
    """oneDNN's linear op where it passes a one-time self-check against torch.mm, else None (matmul: `a @ b`).

    PyTorch's float32 matmul on a CPU always calls MKL's sgemm; oneDNN, built into the same PyTorch,
    computes P @ W (a long reduction into n_embd columns) faster, in strict float32. PyTorch reaches it only
    through an internal op of its compiler, whose signature may change between releases: so it is used only
    on x86-64 CPUs, and only if once, on a small product laid out as in the loss, it runs and agrees with
    torch.mm.
    """
    if not (torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")):
        return None
    generator = torch.Generator().manual_seed(0)  # leaves the global random stream (training's) untouched
    a, b = torch.rand(8, 512, generator=generator), torch.randn(512, 16, generator=generator)
    try:
        op = torch.ops.mkldnn._linear_pointwise
        got = op(a, b.t(), None, "none", [], "")
        agrees = isinstance(got, torch.Tensor) and got.shape == (8, 16) and torch.allclose(
            got, a @ b, rtol=1e-5, atol=1e-5)
    except Exception:  # missing, or a changed signature: whatever an internal op raises, it is not usable
        return None
    return op if agrees else None


def onednn_in_use(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and _onednn_linear() is not None


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b, through oneDNN for float32 on x86-64 CPUs where it passed its self-check (see _onednn_linear)."""
    if onednn_in_use(a.device, a.dtype):
        return _onednn_linear()(a, b.t(), None, "none", [], "")
    return a @ b


def default_chunk_rows(n_rows: int, vocab_size: int, dtype: torch.dtype, n_buffers: int = 1) -> int:
    """As many rows as fit in CHUNK_BYTES, spread evenly over the chunks that takes (512 -> 2 x 256 for GPT-2).

    n_buffers: the (rows x vocab) buffers a chunk uses (2 for soft-capped logits with gradients)."""
    most = max(1, CHUNK_BYTES // (n_buffers * vocab_size * dtype.itemsize))
    n_chunks = -(-n_rows // most)
    return -(-n_rows // n_chunks)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, want_grads, softcap):
        n_rows = hidden.size(0)
        valid = targets != -1
        n_valid = valid.sum()
        targets = targets.clamp_min(0)
        # each row's share of d(mean loss)/d(logits); ignored rows get 0
        row_scale = (valid.to(hidden.dtype) / n_valid.clamp_min(1)).unsqueeze(1)
        want_hidden_grad, want_weight_grad = want_grads
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.empty_like(weight) if want_weight_grad else None
        scaled_hidden = hidden * row_scale if want_weight_grad else None
        # reused by every chunk: no allocation (nor page zeroing) per chunk
        block = hidden.new_empty(min(chunk_rows, n_rows), weight.size(0))
        target_log_prob = hidden.new_empty(n_rows)
        # soft-capping with gradients: tanh(raw / c) of the chunk, and each row's 1 - t_target^2
        capped_grads = softcap is not None and (want_hidden_grad or want_weight_grad)
        tanh_block = torch.empty_like(block) if capped_grads else None
        target_factor = hidden.new_empty(n_rows) if capped_grads else None
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            n = min(chunk_rows, n_rows - start)
            z = torch.mm(hidden[rows], weight.t(), out=block[:n])
            if capped_grads:
                t = torch.tanh(z.div_(softcap), out=tanh_block[:n])
                torch.mul(t, softcap, out=z)
            elif softcap is not None:
                z.div_(softcap).tanh_().mul_(softcap)
            target_logit = z.gather(1, targets[rows].unsqueeze(1)).squeeze(1)
            row_max = z.amax(dim=1)
            p = torch.softmax(z, dim=1, out=z)  # row by row: each row is read before it is written
            # log p[target] = z[target] - logsumexp(z), and logsumexp(z) = max(z) - log(max(p)): exact
            # even where p[target] underflows to 0, as max(p) >= 1 / vocab
            torch.sub(target_logit, row_max, out=target_log_prob[rows]).add_(p.amax(dim=1).log_())
            if capped_grads:
                p.addcmul_(p, t.square_(), value=-1)  # P * (1 - t^2)
                torch.div(target_logit, softcap, out=target_factor[rows]).square_().neg_().add_(1)
            if grad_hidden is not None:
                grad_hidden[rows] = matmul(p, weight)
            if grad_weight is None:
                continue
            if start == 0:
                torch.mm(p.t(), scaled_hidden[rows], out=grad_weight)
            else:
                grad_weight.addmm_(p.t(), scaled_hidden[rows])
        if capped_grads:  # the one-hot terms carry the target's factor 1 - t_target^2
            target_factor = target_factor.unsqueeze(1)
            if grad_hidden is not None:
                grad_hidden.sub_(weight[targets].mul_(target_factor)).mul_(row_scale)
            if grad_weight is not None:
                grad_weight.index_add_(0, targets, scaled_hidden * target_factor, alpha=-1)
        else:
            if grad_hidden is not None:
                grad_hidden.sub_(weight[targets]).mul_(row_scale)  # scale * (P - Y) @ W
            if grad_weight is not None:
                grad_weight.index_add_(0, targets, scaled_hidden, alpha=-1)  # - Y^T @ (scale * hidden)
        ctx.save_for_backward(grad_hidden, grad_weight)
        # mean over valid rows; no valid row gives nan, like F.cross_entropy
        return -target_log_prob.masked_fill_(~valid, 0.0).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        # out of place: a graph kept with retain_graph=True (gradcheck does so) can be backpropagated again
        return *(g * grad_loss if g is not None else None for g in ctx.saved_tensors), None, None, None, None


def fused_linear_cross_entropy(hidden, weight, targets, chunk_rows: int | None = None,
                               softcap: float | None = None):
    """Same value and gradients as F.cross_entropy(hidden @ weight.T, targets, ignore_index=-1), or with
    softcap=c as F.cross_entropy(c * tanh(hidden @ weight.T / c), ...).

    hidden: (N, C), weight: (V, C), targets: (N,) int64 with -1 for rows to ignore. chunk_rows: rows per
    chunk, by default default_chunk_rows.
    """
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")
    grad_on = torch.is_grad_enabled()
    want_grads = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    n_buffers = 2 if softcap is not None and any(want_grads) else 1
    chunk_rows = chunk_rows or default_chunk_rows(hidden.size(0), weight.size(0), weight.dtype, n_buffers)
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, want_grads, softcap)
