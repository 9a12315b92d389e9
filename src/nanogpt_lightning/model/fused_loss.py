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

Under autocast (trainer.precision=bf16-mixed or 16-mixed) the three matmuls run in the low precision, as
autocast runs a Linear: the hidden states and the weight are cast once per call, each chunk's logits come
out of the matmul in that precision and are widened into a float32 block for the soft-cap, the softmax
and the loss; P goes back to the low precision for the two gradient matmuls, whose results are summed in
float32. The row scaling 1 / n_valid is applied in float32 after each gradient matmul (float16 would lose
small products), and the gradients come back in the dtypes of hidden and weight.
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
    except Exception:  # noqa: BLE001 - missing, or a changed signature: whatever an internal op raises, it is not usable
        return None
    return op if agrees else None


def onednn_in_use(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and _onednn_linear() is not None


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b, through oneDNN for float32 on x86-64 CPUs where it passed its self-check (see _onednn_linear)."""
    if onednn_in_use(a.device, a.dtype):
        return _onednn_linear()(a, b.t(), None, "none", [], "")
    return a @ b


def default_chunk_rows(n_rows: int, vocab_size: int, bytes_per_logit: int = 4) -> int:
    """As many rows as fit in CHUNK_BYTES, spread evenly over the chunks that takes (512 -> 2 x 256 for GPT-2).

    bytes_per_logit: what one logit of a chunk takes in all its (rows x vocab) buffers (chunk_buffer_bytes)."""
    most = max(1, CHUNK_BYTES // (bytes_per_logit * vocab_size))
    n_chunks = -(-n_rows // most)
    return -(-n_rows // n_chunks)


def chunk_buffer_bytes(compute_dtype: torch.dtype, capped_grads: bool) -> int:
    """Bytes per logit of a chunk's (rows x vocab) buffers: the block of logits/P in float32 (or float64),
    its low-precision twin under autocast, and tanh(raw / c) for soft-capped logits with gradients."""
    wide = max(compute_dtype.itemsize, 4)
    return wide + (compute_dtype.itemsize if compute_dtype.itemsize < 4 else 0) + (wide if capped_grads else 0)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, want_grads, softcap, compute_dtype):
        with torch.autocast(hidden.device.type, enabled=False):  # the casts below are explicit
            return _FusedLinearCrossEntropy._forward(ctx, hidden, weight, targets, chunk_rows, want_grads, softcap,
                                                     compute_dtype)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, chunk_rows, want_grads, softcap, compute_dtype):
        n_rows = hidden.size(0)
        valid = targets != -1
        n_valid = valid.sum()
        targets = targets.clamp_min(0)
        wide = torch.promote_types(compute_dtype, torch.float32)  # softmax, loss and gradient sums
        low = compute_dtype if compute_dtype.itemsize < 4 else None  # matmuls under autocast
        # each row's share of d(mean loss)/d(logits); ignored rows get 0
        inverse_n_valid = 1 / n_valid.clamp_min(1).to(wide)
        row_scale = (valid.to(wide) * inverse_n_valid).unsqueeze(1)
        want_hidden_grad, want_weight_grad = want_grads
        grad_hidden = torch.empty_like(hidden, dtype=wide) if want_hidden_grad else None
        grad_weight = torch.empty_like(weight, dtype=wide) if want_weight_grad else None
        scaled_hidden = hidden.to(wide) * row_scale if want_weight_grad else None
        weight_wide = weight.to(wide)  # the one-hot terms: in full precision, on (rows, n_embd) tensors
        # reused by every chunk: no allocation (nor page zeroing) per chunk
        block = hidden.new_empty(min(chunk_rows, n_rows), weight.size(0), dtype=wide)
        target_log_prob = hidden.new_empty(n_rows, dtype=wide)
        if low is None:
            mm_hidden, mm_weight = hidden.to(wide), weight_wide
        else:  # cast once; the chunk's products land in low_block, the weight gradient's in low_grad_weight
            mm_hidden, mm_weight = hidden.to(low), weight.to(low)
            low_block = torch.empty_like(block, dtype=low)
            masked_hidden = (hidden * valid.unsqueeze(1)).to(low) if want_weight_grad else None
            low_grad_weight = torch.empty_like(weight, dtype=low) if want_weight_grad else None
        # soft-capping with gradients: tanh(raw / c) of the chunk, and each row's 1 - t_target^2
        capped_grads = softcap is not None and (want_hidden_grad or want_weight_grad)
        tanh_block = torch.empty_like(block) if capped_grads else None
        target_factor = hidden.new_empty(n_rows, dtype=wide) if capped_grads else None
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            n = min(chunk_rows, n_rows - start)
            if low is None:
                z = torch.mm(mm_hidden[rows], mm_weight.t(), out=block[:n])
            else:  # the low-precision product, widened
                z = block[:n].copy_(torch.mm(mm_hidden[rows], mm_weight.t(), out=low_block[:n]))
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
            if low is not None and (grad_hidden is not None or grad_weight is not None):
                p = low_block[:n].copy_(p)
            if grad_hidden is not None:
                grad_hidden[rows] = matmul(p, mm_weight)
            if grad_weight is None:
                continue
            if low is not None:  # P^T @ (masked hidden) in low precision, scaled and summed in float32
                part = torch.mm(p.t(), masked_hidden[rows], out=low_grad_weight)
                if start == 0:
                    torch.mul(part, inverse_n_valid, out=grad_weight)
                else:
                    grad_weight.addcmul_(part, inverse_n_valid)
            elif start == 0:
                torch.mm(p.t(), scaled_hidden[rows], out=grad_weight)
            else:
                grad_weight.addmm_(p.t(), scaled_hidden[rows])
        if capped_grads:  # the one-hot terms carry the target's factor 1 - t_target^2
            target_factor = target_factor.unsqueeze(1)
            if grad_hidden is not None:
                grad_hidden.sub_(weight_wide[targets].mul_(target_factor)).mul_(row_scale)
            if grad_weight is not None:
                grad_weight.index_add_(0, targets, scaled_hidden * target_factor, alpha=-1)
        else:
            if grad_hidden is not None:
                grad_hidden.sub_(weight_wide[targets]).mul_(row_scale)  # scale * (P - Y) @ W
            if grad_weight is not None:
                grad_weight.index_add_(0, targets, scaled_hidden, alpha=-1)  # - Y^T @ (scale * hidden)
        ctx.save_for_backward(grad_hidden if grad_hidden is None else grad_hidden.to(hidden.dtype),
                              grad_weight if grad_weight is None else grad_weight.to(weight.dtype))
        # mean over valid rows; no valid row gives nan, like F.cross_entropy
        return -target_log_prob.masked_fill_(~valid, 0.0).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        # out of place: a graph kept with retain_graph=True (gradcheck does so) can be backpropagated again
        return *(g * grad_loss if g is not None else None for g in ctx.saved_tensors), None, None, None, None, None


def fused_linear_cross_entropy(hidden, weight, targets, chunk_rows: int | None = None,
                               softcap: float | None = None):
    """Same value and gradients as F.cross_entropy(hidden @ weight.T, targets, ignore_index=-1), or with
    softcap=c as F.cross_entropy(c * tanh(hidden @ weight.T / c), ...).

    hidden: (N, C), weight: (V, C), targets: (N,) int64 with -1 for rows to ignore. chunk_rows: rows per
    chunk, by default default_chunk_rows. Under autocast the matmuls run in autocast's precision (see above).
    """
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")
    grad_on = torch.is_grad_enabled()
    want_grads = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    device_type = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else torch.promote_types(hidden.dtype, weight.dtype))
    bytes_per_logit = chunk_buffer_bytes(compute_dtype, softcap is not None and any(want_grads))
    chunk_rows = chunk_rows or default_chunk_rows(hidden.size(0), weight.size(0), bytes_per_logit)
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, want_grads, softcap, compute_dtype)
