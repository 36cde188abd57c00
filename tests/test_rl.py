"""The pure RL math (harness/rl.py) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from harness import rl

REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])  # two groups of 4


def test_group_advantages_group_scale_hand_values():
    # group 1: mean .25, unbiased std sqrt(.75/3) = .5; group 2: mean .5, std sqrt(1/3)
    adv = rl.group_advantages(REWARDS, 4, "group", eps=0.0)
    s = 0.5 / math.sqrt(1 / 3)
    expected = [1.5, -0.5, -0.5, -0.5, s, s, -s, -s]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    # the eps sits in the denominator next to the std, as in GRPO/TRL
    adv_eps = rl.group_advantages(REWARDS, 4, "group", eps=1e-4)
    assert adv_eps[0].item() == pytest.approx(0.75 / 0.5001, abs=1e-6)


def test_group_advantages_batch_and_none_scale():
    # batch std over all 8: unbiased var = (3*(5/8)^2 + 5*(3/8)^2)/7 = 120/448
    std = math.sqrt(120 / 448)
    adv = rl.group_advantages(REWARDS, 4, "batch", eps=0.0)
    centred = [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]
    assert adv.tolist() == pytest.approx([c / std for c in centred], abs=1e-6)
    assert rl.group_advantages(REWARDS, 4, "none").tolist() == pytest.approx(centred, abs=1e-7)


def test_group_advantages_constant_group_is_zero_and_bad_input():
    adv = rl.group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2)
    assert adv[:2].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="groups of 3"):
        rl.group_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match="scale"):
        rl.group_advantages(REWARDS, 4, "bogus")  # type: ignore[arg-type]


def test_approx_kl_estimators():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -0.5]])
    mask = torch.tensor([[1, 0]])
    assert rl.approx_kl(logp, ref, mask, "k1")[0].tolist() == pytest.approx([0.5, 0.0])
    assert rl.approx_kl(logp, ref, mask, "k2")[0].tolist() == pytest.approx([0.125, 0.0])
    assert rl.approx_kl(logp, ref, mask, "k3")[0, 0].item() == pytest.approx(math.exp(-0.5) - 0.5, abs=1e-6)


def test_approx_kl_is_clamped_to_ten_as_openrlhf():
    logp, ref = torch.tensor([[-0.1, -20.0, -1.0]]), torch.tensor([[-15.1, -0.5, -1.0]])  # log ratios 15, -19.5, 0
    mask = torch.ones(1, 3)
    assert rl.approx_kl(logp, ref, mask, "k1")[0].tolist() == pytest.approx([10.0, -10.0, 0.0])
    assert rl.approx_kl(logp, ref, mask, "k2")[0].tolist() == pytest.approx([10.0, 10.0, 0.0])  # 112.5, 190 -> 10


MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
KL = torch.tensor([[0.1, 0.2, -0.1, 0.0], [0.3, 0.0, 0.0, 0.0]])


def test_token_rewards_and_returns_hand_values():
    dense = rl.token_rewards(torch.tensor([1.0, 0.0]), KL, MASK, kl_coef=0.5)
    assert dense.tolist()[0] == pytest.approx([-0.05, -0.1, 1.05, 0.0])
    assert dense.tolist()[1] == pytest.approx([-0.15, 0.0, 0.0, 0.0])
    ret = rl.discounted_returns(dense, MASK, gamma=1.0)
    assert ret.tolist()[0] == pytest.approx([0.9, 0.95, 1.05, 0.0])
    assert ret.tolist()[1] == pytest.approx([-0.15, 0.0, 0.0, 0.0])
    ret_half = rl.discounted_returns(dense, MASK, gamma=0.5)
    assert ret_half.tolist()[0] == pytest.approx([0.1625, 0.425, 1.05, 0.0])
    assert rl.last_token_index(MASK).tolist() == [2, 1]


def test_reinforce_pp_advantages_global_whitening():
    adv, ret = rl.reinforce_pp_advantages(torch.tensor([1.0, 0.0]), MASK, KL, kl_coef=0.5)
    # valid returns .9 .95 1.05 -.15 0: mean .55, population var 1.325/5 = .265
    std = math.sqrt(0.265)
    assert adv.tolist()[0] == pytest.approx([0.35 / std, 0.4 / std, 0.5 / std, 0.0], abs=1e-5)
    assert adv.tolist()[1] == pytest.approx([-0.7 / std, -0.55 / std, 0.0, 0.0], abs=1e-5)
    assert rl.masked_mean(adv, MASK).item() == pytest.approx(0.0, abs=1e-6)


def test_tied_rewards_with_kl_give_no_unit_scale_advantages():
    """All rewards tie (1, 1) and the KL is non-zero: the returns differ only by the KL terms. Whitening would blow
    those up to unit size (a full step toward the reference with no task signal); the default only centres them."""
    rewards = torch.tensor([1.0, 1.0])
    # dense: row 0 [-.05, -.1, .05 + 1], row 1 [-.15 + 1, 0]; returns .9 .95 1.05 | .85 1.0, mean .95
    adv, ret = rl.reinforce_pp_advantages(rewards, MASK, KL, kl_coef=0.5)
    assert ret.tolist()[1][:2] == pytest.approx([0.85, 1.0])
    assert adv.tolist()[0] == pytest.approx([-0.05, 0.0, 0.1, 0.0], abs=1e-6)
    assert adv.tolist()[1] == pytest.approx([-0.1, 0.05, 0.0, 0.0], abs=1e-6)
    assert adv.abs().max().item() == pytest.approx(0.1, abs=1e-6)  # the KL penalty's own scale
    # forcing the whitening shows what the old code did: population std sqrt(.025 / 5) -> unit-size advantages
    forced, _ = rl.reinforce_pp_advantages(rewards, MASK, KL, kl_coef=0.5, whiten=True)
    assert forced.tolist()[0][2] == pytest.approx(0.1 / math.sqrt(0.005), abs=1e-4)  # 1.414
    assert forced.abs().max().item() > 1.0
    # a baseline variant whose groups each tie is a tie too (every group-centred reward is 0)
    adv_b, _ = rl.reinforce_pp_advantages(torch.tensor([1.0, 1.0]), MASK, KL, 0.5, group_size=2)
    assert adv_b.abs().max().item() < 0.11
    assert rl.has_spread(torch.tensor([0.0, 1.0])) and not rl.has_spread(torch.tensor([0.5, 0.5]))
    assert not rl.has_spread(torch.tensor([1.0]))


def test_whiten_global_without_scale_only_centres():
    x = torch.tensor([[1.0, 3.0], [5.0, 9.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    out = rl.whiten_global(x, mask, scale=False)  # valid mean (1 + 3 + 5) / 3 = 3
    assert out.flatten().tolist() == pytest.approx([-2.0, 0.0, 2.0, 0.0])


def test_reinforce_pp_baseline_subtracts_group_mean():
    mask = torch.ones(4, 1, dtype=torch.long)
    _, ret = rl.reinforce_pp_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), mask, group_size=2)
    assert ret[:, 0].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    # without a baseline the raw rewards are the returns, whitening then centres them over the batch
    adv, ret = rl.reinforce_pp_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), mask)
    assert ret[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert adv[:, 0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-6)


def test_policy_loss_aggregations_at_ratio_one():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    logp = torch.zeros(2, 4)
    adv = torch.tensor([1.0, -1.0])
    token, _ = rl.policy_loss(logp, logp, adv, mask, aggregation="token")
    seq, _ = rl.policy_loss(logp, logp, adv, mask, aggregation="sequence")
    const, _ = rl.policy_loss(logp, logp, adv, mask, aggregation="constant", max_len=4)
    assert token.item() == pytest.approx(-0.5)  # (-3 + 1) / 4 tokens
    assert seq.item() == pytest.approx(0.0)  # (-1 + 1) / 2 sequences
    assert const.item() == pytest.approx(-0.25)  # (-3 + 1) / (2 * 4)


def test_policy_loss_clipping_and_gradient():
    mask = torch.ones(1, 1)
    up, down = torch.tensor([[0.5]]), torch.tensor([[-0.5]])
    zero = torch.zeros(1, 1)
    loss, stats = rl.policy_loss(up, zero, torch.tensor([1.0]), mask)
    assert loss.item() == pytest.approx(-1.2) and stats["clip_frac"] == 1.0
    loss, stats = rl.policy_loss(down, zero, torch.tensor([1.0]), mask)
    assert loss.item() == pytest.approx(-math.exp(-0.5)) and stats["clip_frac"] == 0.0
    loss, _ = rl.policy_loss(up, zero, torch.tensor([-1.0]), mask)
    assert loss.item() == pytest.approx(math.exp(0.5))  # pessimistic side is the unclipped one
    loss, _ = rl.policy_loss(up, zero, torch.tensor([1.0]), mask, clip_high=0.28)
    assert loss.item() == pytest.approx(-1.28)
    # unclipped gradient of the token-mean loss: d/dlogp = -A * ratio / n_tokens
    logp = torch.zeros(2, 2, requires_grad=True)
    loss, _ = rl.policy_loss(logp, torch.zeros(2, 2), torch.tensor([[2.0, 1.0], [-1.0, 0.5]]), torch.ones(2, 2))
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-0.5, -0.25, 0.25, -0.125])


def _whiten_worker(rank: int, world: int, init_file: str, x: torch.Tensor, mask: torch.Tensor, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        half = x.size(0) // world
        rows = slice(rank * half, (rank + 1) * half)
        torch.save(rl.whiten_global(x[rows], mask[rows]), f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_whitening_uses_global_statistics_across_processes(tmp_path):
    """Two gloo processes each holding half the batch get exactly the single-process whitening of the whole."""
    import torch.multiprocessing as mp

    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [10.0, -1.0, 0.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
    out = str(tmp_path / "adv")
    mp.spawn(_whiten_worker, args=(2, str(tmp_path / "init"), x, mask, out), nprocs=2, join=True)
    got = torch.cat([torch.load(f"{out}.0"), torch.load(f"{out}.1")])
    torch.testing.assert_close(got, rl.whiten_global(x, mask))
    # and it differs from whitening each half on its own, so the all-reduce really happened
    assert not torch.allclose(got[:2], rl.whiten_global(x[:2], mask[:2]))


def test_sparsity_shaped_rewards_hand_values():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])  # median .5: rollouts 0 and 2 are the high-reward set
    decisions = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    # p_bar = mean(2/4, 4/4) = .75; each insertion costs max(0, 1 - .75) = .25
    shaped = rl.sparsity_shaped_rewards(rewards, decisions, mask, group_size=4, lam=0.1)
    assert shaped.tolist() == pytest.approx([1 - 0.1 * 0.5, -0.1 * 0.5, 1 - 0.1 * 1.0, 0.0])
    assert rl.sparsity_shaped_rewards(rewards, decisions, mask, 4, lam=0.0).tolist() == rewards.tolist()
    # groups are independent: group 1's winner never inserts (p_bar 0, the loser's insertion costs 1); group 2's
    # winner always inserts (p_bar 1, insertions cost nothing)
    two = rl.sparsity_shaped_rewards(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([[0], [1], [1], [0]]),
                                     torch.ones(4, 1), group_size=2, lam=1.0)
    assert two.tolist() == pytest.approx([1.0, -1.0, 1.0, 0.0])
