"""Output layer + cross-entropy fused, in row chunks: the full (rows x vocab) logits never exist.

With a 50k vocabulary the logits of a small model dwarf everything else it computes. Here each
chunk of rows makes its logits, turns them into the loss and, when gradients are wanted, straight
into the gradients of the hidden states and of the output weight, then drops them. The backward
pass only scales those stored gradients. Plain PyTorch ops: runs on cpu, mps and cuda.

Per chunk the (rows x vocab) block is touched by five kernels only: the logits matmul, a row max,
a softmax, and the two gradient matmuls. Everything else (the loss, the one-hot, the 1/N scale) is
done on (rows,) or (rows, n_embd) tensors: d(loss)/d(hidden) = scale * (P - Y) @ W and
d(loss)/d(W) = (P - Y)^T @ (scale * hidden), with P the softmax and Y the one-hot targets.
"""

import torch

# rows per chunk, timed on a shared 2-core CPU (GPT-2 vocabulary, n_embd 64, 512 rows): 32 and 64 lose
# to 128 and 256, and far more when another process takes a core (each chunk's kernels wait for it);
# 256 keeps the two (rows x vocab) buffers at a quarter of the full logits each
DEFAULT_CHUNK_ROWS = 256


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, want_grads):
        n_rows = hidden.size(0)
        valid = targets != -1
        n_valid = valid.sum()
        targets = targets.clamp_min(0).unsqueeze(1)
        # each row's share of d(mean loss)/d(logits); ignored rows get 0
        row_scale = (valid.to(hidden.dtype) / n_valid.clamp_min(1)).unsqueeze(1)
        want_hidden_grad, want_weight_grad = want_grads
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.empty_like(weight) if want_weight_grad else None
        scaled_hidden = hidden * row_scale if want_weight_grad else None
        minus_one = hidden.new_full((min(chunk_rows, n_rows), 1), -1.0)
        # reused by every chunk: no allocation (nor page zeroing) per chunk
        logits = hidden.new_empty(min(chunk_rows, n_rows), weight.size(0))
        probs = torch.empty_like(logits)
        row_loss = hidden.new_empty(n_rows, 1)
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            n = min(chunk_rows, n_rows - start)
            z = torch.mm(hidden[rows], weight.t(), out=logits[:n])
            top = z.amax(dim=1, keepdim=True)
            p = torch.softmax(z, dim=1, out=probs[:n])
            # the softmax's row max is exp(max - lse) = 1 / sum(exp(z - max)) >= 1 / vocab, so its log
            # is exact: log-sum-exp without a separate exp pass over the block
            log_sum_exp = top - p.amax(dim=1, keepdim=True).log()
            torch.sub(log_sum_exp, z.gather(1, targets[rows]), out=row_loss[rows])
            if grad_hidden is None and grad_weight is None:
                continue
            p.scatter_add_(1, targets[rows], minus_one[:n])  # P - Y
            if grad_hidden is not None:
                torch.mm(p, weight, out=grad_hidden[rows]).mul_(row_scale[rows])
            if grad_weight is None:
                continue
            if start == 0:
                torch.mm(p.t(), scaled_hidden[rows], out=grad_weight)
            else:
                grad_weight.addmm_(p.t(), scaled_hidden[rows])
        ctx.save_for_backward(grad_hidden, grad_weight)
        # mean over valid rows; no valid row gives nan, like F.cross_entropy
        return row_loss.squeeze(1).masked_fill_(~valid, 0.0).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        # out of place: a graph kept with retain_graph=True can be backpropagated again
        return *(g * grad_loss if g is not None else None for g in ctx.saved_tensors), None, None, None


def fused_linear_cross_entropy(hidden, weight, targets, chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """Same value and gradients as F.cross_entropy(hidden @ weight.T, targets, ignore_index=-1).

    hidden: (N, C), weight: (V, C), targets: (N,) int64 with -1 for rows to ignore.
    """
    grad_on = torch.is_grad_enabled()
    want_grads = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, want_grads)
