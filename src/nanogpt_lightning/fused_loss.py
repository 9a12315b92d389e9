"""Output layer + cross-entropy fused, in row chunks: the full (rows x vocab) logits of a big batch never exist.

With a 50k vocabulary the logits of a small model dwarf everything else it computes. Here each chunk of
rows makes its logits, turns them into the loss and, when gradients are wanted, straight into the
gradients of the hidden states and of the output weight, then drops them. The backward pass only scales
those stored gradients. PyTorch ops (one matmul through oneDNN on x86 CPUs, see matmul): runs on cpu, mps
and cuda.

Per chunk the (rows x vocab) block lives in one buffer and is touched by the logits matmul, one in-place
softmax (P), two row-max reads (they give the log-sum-exp exactly, see below) and the two gradient
matmuls: a log-softmax then exp pass cost twice the softmax. The one-hot part of P - Y is done once on
(rows, n_embd) tensors: d(loss)/d(hidden) = scale * (P @ W - W[targets]) and
d(loss)/d(W) = P^T @ (scale * hidden), minus scale * hidden added at the target rows of W.

Tried and dropped (timed on a shared 2-core AMD EPYC, GPT-2 vocabulary, n_embd 64, 512 rows): tiling the
vocabulary too, so each block stays in cache (online log-sum-exp over tiles, logits recomputed in a second
pass). On an idle machine it beat the row chunks by ~15%, but it launches ~100 small multi-threaded kernels
per call, and when another process takes a core each one waits for it: 2-3x slower than row chunks then.
"""

import platform

import torch

# bytes of one chunk's (rows x vocab) block at most. Per chunk the 13 MB output weight of a GPT-2 vocabulary
# is read twice and its gradient updated once, so fewer chunks are faster, even where a chunk no longer fits
# in cache: timed as above with huge pages on (see cpu_memory.py), a 512-row micro-batch as 2 chunks of 256 took
# ~5% less time per iteration than 4 of 128, and ~3% more than 1 of 512 (the full logits). Without huge
# pages a block above glibc's 32 MiB mmap ceiling costs page faults on every call, and still 256 beat 128.
CHUNK_BYTES = 64 * 2**20


# PyTorch's float32 matmul on a CPU always calls MKL's sgemm. oneDNN, built into the same PyTorch, computes
# P @ W (a long reduction over the vocabulary into n_embd columns) in ~2/3 of sgemm's time on the AMD EPYC
# above (8.3 vs 12.1 ms per 256-row chunk; 200 vs 167 GFLOP/s on a 2048^2 matmul), in strict float32 too.
# PyTorch reaches it only through the op its compiler (Inductor) emits for linear layers, not a public API:
# used on x86-64 CPUs where it exists, torch.mm elsewhere. (For P^T @ hidden oneDNN needs transposed copies
# that cost more than they save; the logits matmul is as fast either way.)
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if (
    torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")) else None


def onednn_in_use(device: torch.device, dtype: torch.dtype) -> bool:
    return _ONEDNN_LINEAR is not None and device.type == "cpu" and dtype == torch.float32


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b, through oneDNN for float32 on x86-64 CPUs (see _ONEDNN_LINEAR)."""
    if onednn_in_use(a.device, a.dtype):
        return _ONEDNN_LINEAR(a, b.t(), None, "none", [], "")
    return a @ b


def default_chunk_rows(n_rows: int, vocab_size: int, dtype: torch.dtype) -> int:
    """As many rows as fit in CHUNK_BYTES, spread evenly over the chunks that takes (512 -> 2 x 256 for GPT-2)."""
    most = max(1, CHUNK_BYTES // (vocab_size * dtype.itemsize))
    n_chunks = -(-n_rows // most)
    return -(-n_rows // n_chunks)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, want_grads):
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
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            n = min(chunk_rows, n_rows - start)
            z = torch.mm(hidden[rows], weight.t(), out=block[:n])
            target_logit = z.gather(1, targets[rows].unsqueeze(1)).squeeze(1)
            row_max = z.amax(dim=1)
            p = torch.softmax(z, dim=1, out=z)  # row by row: each row is read before it is written
            # log p[target] = z[target] - logsumexp(z), and logsumexp(z) = max(z) - log(max(p)): exact
            # even where p[target] underflows to 0, as max(p) >= 1 / vocab
            torch.sub(target_logit, row_max, out=target_log_prob[rows]).add_(p.amax(dim=1).log_())
            if grad_hidden is not None:
                grad_hidden[rows] = matmul(p, weight)
            if grad_weight is None:
                continue
            if start == 0:
                torch.mm(p.t(), scaled_hidden[rows], out=grad_weight)
            else:
                grad_weight.addmm_(p.t(), scaled_hidden[rows])
        if grad_hidden is not None:
            grad_hidden.sub_(weight[targets]).mul_(row_scale)  # scale * (P - Y) @ W
        if grad_weight is not None:
            grad_weight.index_add_(0, targets, scaled_hidden, alpha=-1)  # - Y^T @ (scale * hidden)
        ctx.save_for_backward(grad_hidden, grad_weight)
        # mean over valid rows; no valid row gives nan, like F.cross_entropy
        return -target_log_prob.masked_fill_(~valid, 0.0).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        # out of place: a graph kept with retain_graph=True (gradcheck does so) can be backpropagated again;
        # scaling in place was ~3% faster per m2_shakespeare iteration but breaks that
        return *(g * grad_loss if g is not None else None for g in ctx.saved_tensors), None, None, None


def fused_linear_cross_entropy(hidden, weight, targets, chunk_rows: int | None = None):
    """Same value and gradients as F.cross_entropy(hidden @ weight.T, targets, ignore_index=-1).

    hidden: (N, C), weight: (V, C), targets: (N,) int64 with -1 for rows to ignore. chunk_rows: rows per
    chunk, by default default_chunk_rows.
    """
    chunk_rows = chunk_rows or default_chunk_rows(hidden.size(0), weight.size(0), weight.dtype)
    grad_on = torch.is_grad_enabled()
    want_grads = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, want_grads)
