"""Pure reinforcement-learning math shared by the RL baselines (GRPO, REINFORCE++) and MemGen's RL stages.

Everything here is a function of tensors: no models, no trainers. Shapes: ``B`` rollouts (prompts x samples per
prompt, grouped contiguously: rows ``g*G .. g*G+G-1`` share a prompt), ``T`` completion tokens, ``mask`` (B, T) is
1 on the tokens the policy generated (the stop token included) and 0 on padding.

Conventions follow the reference implementations so that results are comparable:
- GRPO advantages as TRL computes them: Bessel-corrected std (``torch.std``), ``eps`` added to the std (1e-4).
- REINFORCE++ as OpenRLHF implements it (``compute_reward``, ``get_cumulative_returns`` and the global advantage
  whitening in ``experience_maker.py``): population variance over the valid tokens, ``rsqrt(clamp(var, 1e-8))``.
"""

from __future__ import annotations

from typing import Literal

import torch

Scale = Literal["group", "batch", "none"]
Aggregation = Literal["token", "sequence", "constant"]
KLEstimator = Literal["k1", "k2", "k3"]


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (one per rollout), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}; use a divisor")
    return rewards.view(-1, group_size)  # (B/G, G)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: Scale = "group", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO advantage per rollout: ``(r - group mean) / (std + eps)``.

    ``scale``: ``group`` divides by each group's std, ``batch`` by the std of all rewards in the batch (PPO-Lite),
    ``none`` only subtracts the group mean (Dr. GRPO). A group whose rewards are all equal gets advantage 0.
    """
    r = rewards.float()  # (B,)
    grouped = _grouped(r, group_size)  # (B/G, G)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # (B,)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if group_size > 1 else torch.zeros_like(r)
    elif scale == "batch":
        std = r.std().expand_as(r) if r.numel() > 1 else torch.zeros_like(r)
    else:
        raise ValueError(f"scale {scale!r} is not valid; use group, batch or none")
    return centred / (std + eps)  # (B,)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of them when ``dim`` is None)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1.0)


def approx_kl(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate from log-probs of the sampled tokens, 0 on padding. (B, T)

    k1 = log p - log p_ref (unbiased, can be negative), k2 = k1^2 / 2, k3 = exp(-k1) - 1 + k1 (Schulman's
    estimators, OpenRLHF's ``compute_approx_kl``), each clamped to [-10, 10] as OpenRLHF does, so one token the
    reference finds near-impossible cannot dominate the reward or the loss."""
    log_ratio = logp.float() - ref_logp.float()  # (B, T)
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = log_ratio.pow(2) / 2
    elif estimator == "k3":
        kl = torch.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"KL estimator {estimator!r} is not valid; use k1, k2 or k3")
    return kl.clamp(min=-10.0, max=10.0) * mask.to(kl.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of ``mask`` (B, T) -> (B,); a row of zeros gives T-1 like OpenRLHF."""
    T = mask.size(1)
    return T - 1 - mask.long().fliplr().argmax(dim=1)


def token_rewards(
    rewards: torch.Tensor, kl: torch.Tensor | None, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Dense per-token reward: ``-kl_coef * kl`` on every token plus the scalar reward on the last token. (B, T)"""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)  # (B, T)
    if kl is not None and kl_coef > 0:
        out = out - kl_coef * kl.float()
    idx = last_token_index(mask).unsqueeze(1)  # (B, 1)
    return out.scatter_add(1, idx, rewards.float().unsqueeze(1))


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go G_t = sum_{s>=t} gamma^(s-t) r_s over the valid tokens. (B, T)"""
    r = rewards.float() * mask.to(torch.float32)  # (B, T)
    if gamma == 1.0:
        # Reverse cumulative sum; identical to the backward loop OpenRLHF runs, one kernel instead of T.
        return r.flip(1).cumsum(1).flip(1)
    out = torch.zeros_like(r)
    running = torch.zeros(r.size(0), dtype=r.dtype, device=r.device)  # (B,)
    for t in reversed(range(r.size(1))):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return out


def whiten_global(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, scale: bool = True) -> torch.Tensor:
    """Normalise ``x`` (B, T) by the mean and std of its valid tokens across the whole global batch.

    Under ``torch.distributed`` the sums are all-reduced so every process uses the same statistics (OpenRLHF's
    global batch normalisation); in a single process this is plain masked whitening. Population variance and
    ``rsqrt(clamp(var, 1e-8))`` as OpenRLHF. ``scale=False`` only subtracts the mean."""
    m = mask.to(torch.float32)
    xf = x.float()
    stats = torch.stack([(xf * m).sum(), m.sum()])  # (2,)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.all_reduce(stats)
    mean = stats[0] / stats[1].clamp(min=1.0)
    if not scale:
        return (xf - mean) * m
    sq = ((xf - mean).pow(2) * m).sum()
    if distributed:
        torch.distributed.all_reduce(sq)
    var = sq / stats[1].clamp(min=1.0)
    out = (xf - mean) * var.clamp(min=1e-8).rsqrt() if shift_mean else xf * var.clamp(min=1e-8).rsqrt()
    return out * m


def reinforce_pp_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    group_size: int | None = None,
    whiten: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ advantages and returns, each (B, T).

    ``rewards`` (B,) scalar task rewards; ``kl`` (B, T) per-token KL estimate (``approx_kl``). With ``group_size``
    (the ``baseline`` variant) each reward first has its group's mean subtracted. The KL penalty enters the
    per-token reward, the scalar reward sits on the last token, returns use ``gamma``, and the returns are whitened
    over the global batch of tokens to give the advantages.

    ``whiten``: None = only when the (baseline-subtracted) rewards take more than one value (``has_spread``);
    otherwise the returns are only centred. When every reward ties, the returns differ only by the KL terms, and
    whitening would blow those tiny differences up to unit-size advantages: a full-strength step back toward the
    reference with no task signal. Centring keeps them at the KL penalty's own scale. Under torch.distributed pass
    ``whiten`` computed from the global batch's rewards."""
    r = rewards.float()  # (B,)
    if group_size is not None:
        g = _grouped(r, group_size)  # (B/G, G)
        r = (g - g.mean(dim=1, keepdim=True)).reshape(-1)
    dense = token_rewards(r, kl, mask, kl_coef)  # (B, T)
    returns = discounted_returns(dense, mask, gamma)  # (B, T)
    scale = has_spread(r) if whiten is None else whiten
    return whiten_global(returns, mask, scale=scale), returns


def has_spread(rewards: torch.Tensor, tol: float = 1e-6) -> bool:
    """True if the rewards (B,) take more than one value (beyond ``tol``): whitening has a task signal to scale."""
    r = rewards.float()
    return r.numel() > 1 and float(r.max() - r.min()) > tol


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    aggregation: Aggregation = "token",
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped policy-gradient loss ``-min(rho A, clip(rho, 1-eps_lo, 1+eps_hi) A)`` and its clip fraction.

    ``advantages`` is (B,) (one per rollout, GRPO) or (B, T) (per token, REINFORCE++). Aggregation: ``token``
    averages over all valid tokens of the batch (DAPO/BNPO, OpenRLHF's token-level loss), ``sequence`` averages each
    sequence then the batch (original GRPO), ``constant`` sums and divides by B * ``max_len`` (Dr. GRPO)."""
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)  # (B, 1) broadcasts over tokens
    ratio = torch.exp(logp.float() - old_logp.float())  # (B, T)
    hi = clip_low if clip_high is None else clip_high
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + hi)  # (B, T)
    per_token = -torch.min(ratio * adv, clipped * adv)  # (B, T)
    m = mask.to(per_token.dtype)
    if aggregation == "token":
        loss = masked_mean(per_token, m)
    elif aggregation == "sequence":
        loss = masked_mean(per_token, m, dim=1).mean()
    elif aggregation == "constant":
        if not max_len:
            raise ValueError("aggregation 'constant' needs max_len (the completion length budget)")
        loss = (per_token * m).sum() / (per_token.size(0) * max_len)
    else:
        raise ValueError(f"aggregation {aggregation!r} is not valid; use token, sequence or constant")
    with torch.no_grad():
        was_clipped = ((ratio * adv) > (clipped * adv)).to(m.dtype)
        clip_frac = float(masked_mean(was_clipped, m))
    return loss, {"clip_frac": clip_frac}


def sparsity_shaped_rewards(
    rewards: torch.Tensor, decisions: torch.Tensor, mask: torch.Tensor, group_size: int, lam: float,
    totals: torch.Tensor | None = None,
) -> torch.Tensor:
    """MemGen trigger reward with the reward-adaptive sparsity penalty (paper Eq. 8-9). (B,)

    ``R_i - lam * sum_j max(0, d_ij - p_bar)``, ``d_ij`` in {0, 1} the trigger's decision at delimiter j of rollout
    i (``decisions`` (B, J), ``mask`` (B, J) marks the delimiters that exist), and ``p_bar`` the mean invocation
    rate ``sum_j d_ij / |tau_i|`` over the rollouts of the group whose reward is at least the group's median (the
    interpolated median, so with an even group it is the mean of the two middle rewards). ``lam`` = 0 gives the
    public code's behaviour (task reward only). ``totals`` (B,): the rollout's length |tau_i| in delimiters (every
    delimiter it generated, also those past the insertion cap where the trigger was not asked, the paper's rate);
    None = the delimiters the trigger was asked at (``mask.sum(1)``)."""
    r = _grouped(rewards.float(), group_size)  # (G_n, G)
    d = decisions.float() * mask.float()  # (B, J)
    length = mask.float().sum(1) if totals is None else torch.maximum(totals.float(), mask.float().sum(1))  # (B,)
    rate = _grouped(d.sum(1) / length.clamp(min=1.0), group_size)  # (G_n, G)
    high = (r >= r.quantile(0.5, dim=1, keepdim=True)).float()  # (G_n, G); never empty: the max is >= median
    p_bar = (rate * high).sum(1, keepdim=True) / high.sum(1, keepdim=True)  # (G_n, 1)
    p_row = p_bar.expand_as(r).reshape(-1, 1)  # (B, 1)
    penalty = ((d - p_row).clamp(min=0.0) * mask.float()).sum(1)  # (B,)
    return rewards.float() - lam * penalty
