"""PPO maths (training/ppo_math.py) against values worked out by hand in each docstring."""

from __future__ import annotations

import math

import pytest
import torch

from training.ppo import response_mask, rule_scorer
from training.ppo_math import AdaptiveKLController, gae, policy_loss, shaped_rewards, value_loss, whiten


def test_shaped_rewards_by_hand() -> None:
    """logp [-1,-2,-3], ref [-1.5,-2,-2], mask [1,1,0], beta 0.5, score 1:
    kl = [0.5, 0, (masked) 0]; rewards = -0.5 * kl = [-0.25, 0, 0]; score on the last real token (index 1)
    -> [-0.25, 1, 0]."""
    rewards, kl = shaped_rewards(torch.tensor([1.0]), torch.tensor([[-1.0, -2.0, -3.0]]),
                                 torch.tensor([[-1.5, -2.0, -2.0]]), torch.tensor([[1.0, 1.0, 0.0]]), beta=0.5)
    assert kl.tolist() == [[0.5, 0.0, 0.0]]
    assert rewards.tolist() == [[-0.25, 1.0, 0.0]]


def test_gae_by_hand() -> None:
    """rewards [0, 1], values [0.5, 0.8], gamma 1, lam 0.5:
    t=1: delta = 1 + 0 - 0.8 = 0.2, A1 = 0.2;  t=0: delta = 0 + 0.8 - 0.5 = 0.3, A0 = 0.3 + 0.5 * 0.2 = 0.4.
    returns = A + V = [0.9, 1.0]."""
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.8]]), torch.ones(1, 2), gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.4, 0.2])
    assert ret[0].tolist() == pytest.approx([0.9, 1.0])


def test_gae_ignores_padding() -> None:
    """mask [1, 0]: the padded step's reward 5 and value 9 are ignored; A0 = 1 + 0 - 0.5 = 0.5, returns [1, 0]."""
    adv, ret = gae(torch.tensor([[1.0, 5.0]]), torch.tensor([[0.5, 9.0]]), torch.tensor([[1.0, 0.0]]), 1.0, 0.95)
    assert adv[0].tolist() == pytest.approx([0.5, 0.0])
    assert ret[0].tolist() == pytest.approx([1.0, 0.0])


def test_gae_discounting() -> None:
    """gamma 0.5, lam 1, values 0, rewards [0, 0, 4]: A = [4 * 0.25, 4 * 0.5, 4] = [1, 2, 4]."""
    adv, _ = gae(torch.tensor([[0.0, 0.0, 4.0]]), torch.zeros(1, 3), torch.ones(1, 3), gamma=0.5, lam=1.0)
    assert adv[0].tolist() == pytest.approx([1.0, 2.0, 4.0])


def test_policy_loss_clipping_by_hand() -> None:
    """clip 0.2, A = +1 on both tokens.
    token 1: ratio 1.5 -> max(-1.5, -1.2) = -1.2 (clipped: no extra credit past 1.2);
    token 2: ratio 0.5 -> max(-0.5, -0.8) = -0.5 (not clipped). Mean = -0.85, clip fraction 0.5."""
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]])
    loss, stats = policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), clip_range=0.2)
    assert loss.item() == pytest.approx(-0.85)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_policy_loss_negative_advantage_is_not_clipped_upward() -> None:
    """A = -1, ratio 1.5: max(1.5, 1.2) = 1.5 -- the pessimistic bound keeps the full penalty."""
    loss, _ = policy_loss(torch.tensor([[math.log(1.5)]]), torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1))
    assert loss.item() == pytest.approx(1.5)


def test_value_loss_by_hand() -> None:
    """V 1.0, V_old 0.5, R 2.0, clip 0.2: clipped V = 0.7; (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> 0.5 * 1.69 = 0.845."""
    loss, stats = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(0.845)
    assert stats["vf_clipfrac"].item() == 1.0


def test_adaptive_kl_controller_by_hand() -> None:
    """beta 0.1, target 1, horizon 10. KL 2 -> error clipped to 0.2, n 5 -> beta = 0.1 * (1 + 0.2 * 0.5) = 0.11;
    then KL 0.9 -> error -0.1 -> 0.11 * (1 - 0.1 * 0.5) = 0.1045."""
    ctl = AdaptiveKLController(beta=0.1, target=1.0, horizon=10)
    assert ctl.update(2.0, 5) == pytest.approx(0.11)
    assert ctl.update(0.9, 5) == pytest.approx(0.1045)


def test_whiten_by_hand() -> None:
    """[1, 2, 3] (+ a padded 100): mean 2, unbiased variance (1 + 0 + 1) / 2 = 1 -> [-1, 0, 1, 0]."""
    out = whiten(torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert out[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)


def test_response_mask_stops_after_first_eos() -> None:
    """eos 2: [5, 2, 2, 2] -> [1, 1, 0, 0] (the end-of-turn token is an action); no eos -> all 1."""
    assert response_mask(torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8]]), eos_id=2).tolist() == [[1, 1, 0, 0], [1] * 4]


def test_rule_rewards() -> None:
    assert rule_scorer("rule:bullets")([[]] * 2, ["Tips:\n- one", "prose only"]) == [1.0, 0.0]
    assert rule_scorer("rule:short")([[]], ["a b c d"]) == [-0.2]
    assert rule_scorer("rule:keyword=Tea")([[]] * 2, ["I like tea", "no"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown rule"):
        rule_scorer("rule:nope")
