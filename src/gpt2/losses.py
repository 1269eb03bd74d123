"""Chunked, fused lm_head + cross-entropy: the loss of `GPT.loss` without materialising (B*T, vocab) logits.

Why: with GPT-2's 50257-token vocabulary, a small model spends most of a CPU training step on the output
projection and the softmax over its logits (8 x 128 tokens give a 200 MB logits tensor, read and written
several times: too big for any cache). Here the rows are processed in chunks: each chunk's logits are
computed, turned into the loss and, since the loss is a scalar, straight into its gradients (softmax - one
hot), which are multiplied back into dL/dh and accumulated into dL/dW while still in cache. Backward then
only scales the stored gradients. Same FLOPs, far less memory traffic (the Liger-kernel idea, in PyTorch).

Used by pretraining and fine-tuning on CPU, and by every evaluation (`gpt2.evaluate.val_loss`, forward only),
which is why it sits below both `gpt2.train` and `gpt2.evaluate`. In CUDA training the plain `GPT.loss` under
torch.compile is used instead (the compiler fuses the softmax, and bf16 logits need no chunking to fit).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: a target that is not trained on


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
        # h: (N, C) hidden states, w: (V, C) output embedding, y: (N,) targets (IGNORE_INDEX = skip)
        h32, w32 = h.float(), w.float()
        valid = y != IGNORE_INDEX
        n = valid.sum().clamp(min=1)
        grad_h = torch.zeros_like(h32)
        grad_w = torch.zeros_like(w32)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.size(0), chunk):
            hc, yc, vc = h32[s:s + chunk], y[s:s + chunk], valid[s:s + chunk]
            rows = torch.arange(len(yc), device=h.device)
            target = yc.clamp(min=0)
            logits = hc @ w32.t()  # (c, V)
            target_logit = logits[rows, target]  # (c,)
            # softmax with a single exp pass over the chunk, in place: e = exp(logits - max)
            top = logits.amax(dim=1, keepdim=True)  # (c, 1)
            e = logits.sub_(top).exp_()  # (c, V)
            denom = e.sum(dim=1, keepdim=True)  # (c, 1)
            lse = (top + denom.log()).squeeze(1)  # (c,)
            total += ((lse - target_logit) * vc).sum()
            scale = (vc.float() / n)[:, None]  # mean over valid targets; ignored rows get no gradient
            grad = e.mul_(scale / denom)  # softmax * scale: (c, V)
            grad[rows, target] -= scale.squeeze(1)
            grad_h[s:s + chunk] = grad @ w32
            grad_w.addmm_(grad.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, w.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out).to(ctx.dtypes[0]), (grad_w * grad_out).to(ctx.dtypes[1]), None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 128) -> torch.Tensor:
    """mean cross_entropy(h @ weight.T, targets), ignore_index=-100, in float32, in row chunks.
    h: (..., C), weight: (V, C), targets: (...). Without autograd (evaluation) only the loss is computed. Rows
    whose target is ignored are dropped first on a CPU (their gradient is zero): fine-tuning's prompts cost no
    logits."""
    h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    # Masked targets (fine-tuning: the answer only) need no logits at all. Only on a CPU: on a GPU, testing
    # for them and the data-dependent gather each wait for the device, which costs more than the rows.
    if h.device.type == "cpu":
        valid = targets != IGNORE_INDEX
        if not bool(valid.all()):
            h, targets = h[valid], targets[valid]
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        return _linear_cross_entropy_value(h, weight, targets, chunk)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk)


@torch.no_grad()
def _linear_cross_entropy_value(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """The loss alone, chunk by chunk (evaluation: a batch of 32 x 1024 never holds its 6.6 GB of float32
    logits at once). Each chunk's logits are computed as `GPT.loss` computes them (in the autocast dtype
    when autocast is on), the cross-entropy in float32."""
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.size(0), chunk):
        logits = F.linear(h[s:s + chunk], w)  # (c, V)
        total += F.cross_entropy(logits.float(), y[s:s + chunk], ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (y != IGNORE_INDEX).sum().clamp(min=1)


def gpt_loss_chunked(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """The same value and gradients as `model.loss(idx, targets)` for a `GPT`, computed chunk-wise."""
    h = model.hidden_states(idx)  # (B, T, C)
    weight = model.lm_head.weight[: model.config.vocab_size]  # drop the vocab padding rows: (V, C)
    return linear_cross_entropy(h, weight, targets, chunk)
