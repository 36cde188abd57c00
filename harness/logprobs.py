"""Log-probabilities of chosen tokens without a full-vocabulary fp32 tensor for the whole batch.

RL losses need log p(y_t) of the sampled tokens only. ``log_softmax(lm_head(h).float())`` materialises an (N, V)
fp32 tensor (8 rollouts x 1024 tokens x 150k vocabulary = 5 GB) and autograd keeps it for the backward pass.
``token_logprobs`` goes over the rows in chunks: per chunk the logits, their logsumexp and the chosen logit; with
gradients each chunk runs under activation checkpointing, so only the (chunk, d) hidden states are kept and the
chunk's logits are recomputed in the backward pass. The values equal the full computation up to float rounding
(same fp32 arithmetic per row; tested to 1e-5).

Written by hand: neither transformers nor TRL exposes a chunked selected-token log-prob for an arbitrary head
(TRL's ``selective_log_softmax`` loops over rows but still takes the full logits as input).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    temperature: float) -> torch.Tensor:
    logits = nn.functional.linear(hidden, weight, bias).float() / temperature  # (n, V)
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)  # (n,)


def token_logprobs(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, temperature: float = 1.0,
                   chunk_size: int = 512) -> torch.Tensor:
    """log softmax(head(hidden) / temperature)[targets] (N,) for hidden (N, d) and targets (N,), chunk by chunk."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros((0,), dtype=torch.float32)
    out = []
    grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    for s in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[s : s + chunk_size], targets[s : s + chunk_size]
        if grad:  # keep (chunk, d), not (chunk, V): the logits are recomputed in the backward pass
            out.append(checkpoint(_chunk_logprobs, h, y, head.weight, head.bias, temperature, use_reentrant=False))
        else:
            out.append(_chunk_logprobs(h, y, head.weight, head.bias, temperature))
    return torch.cat(out)
