"""Output layer + cross-entropy fused, in row chunks: the full (rows x vocab) logits never exist.

With a 50k vocabulary the logits of a small model dwarf everything else it computes. Here each
chunk of rows makes its logits, turns them into the loss and, when gradients are wanted, straight
into the gradients of the hidden states and of the output weight, then drops them. The backward
pass only scales those stored gradients. Plain PyTorch ops: runs on cpu, mps and cuda.
"""

import torch

DEFAULT_CHUNK_ROWS = 64


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, want_grads):
        valid = targets != -1
        n_valid = valid.sum()
        safe_targets = targets.clamp_min(0).unsqueeze(1)
        want_hidden_grad, want_weight_grad = want_grads
        grad_hidden = torch.empty_like(hidden) if want_hidden_grad else None
        grad_weight = torch.zeros_like(weight) if want_weight_grad else None
        loss_sum = hidden.new_zeros(())
        # each row's share of d(mean loss)/d(logits); ignored rows get 0
        row_scale = valid.to(hidden.dtype) / n_valid.clamp_min(1)
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows]
            logits = h @ weight.t()
            lse = torch.logsumexp(logits, dim=1)
            target_logit = logits.gather(1, safe_targets[rows]).squeeze(1)
            loss_sum += ((lse - target_logit) * valid[rows]).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # softmax - one_hot(target), scaled per row, all in the logits' own buffer
            grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()
            grad_logits.scatter_add_(1, safe_targets[rows], grad_logits.new_full(safe_targets[rows].shape, -1.0))
            grad_logits.mul_(row_scale[rows].unsqueeze(1))
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        # mean over valid rows; no valid row gives nan, like F.cross_entropy
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss if grad_hidden is not None else None,
            grad_weight * grad_loss if grad_weight is not None else None,
            None,
            None,
            None,
        )


def fused_linear_cross_entropy(hidden, weight, targets, chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """Same value and gradients as F.cross_entropy(hidden @ weight.T, targets, ignore_index=-1).

    hidden: (N, C), weight: (V, C), targets: (N,) int64 with -1 for rows to ignore.
    """
    grad_on = torch.is_grad_enabled()
    want_grads = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, want_grads)
