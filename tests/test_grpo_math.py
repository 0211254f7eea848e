"""GRPO's arithmetic (gptlab.alignment.grpo) against computations written out by hand, element by element
with Python floats (no torch reduction shared with the code under test)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from gptlab.alignment.grpo import GRPO_RULES, group_advantages, group_reward_std, grpo_loss, grpo_relations
from gptlab.checks import check_node

REWARDS = [1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 3.0, 1.0, 0.0, 0.0]  # three groups of G = 4


def _hand_advantages(rewards, G, scale):
    out = []
    batch_std = statistics.stdev(rewards)
    for g in range(0, len(rewards), G):
        group = rewards[g:g + G]
        mean = sum(group) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (G - 1))
        for r in group:
            div = {"group": std + 1e-4, "batch": batch_std + 1e-4, "none": 1.0}[scale]
            out.append((r - mean) / div)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_are_reward_minus_group_mean_over_std(scale):
    got = group_advantages(torch.tensor(REWARDS), 4, scale)
    assert got.tolist() == pytest.approx(_hand_advantages(REWARDS, 4, scale), abs=1e-6)
    assert got[4:8].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards: no signal


def test_first_group_by_hand():
    # [1, 0, 0, 0]: mean 0.25, Bessel std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    got = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    assert got.tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001])


def test_group_reward_std_and_a_batch_that_does_not_split_into_groups():
    assert group_reward_std(torch.tensor(REWARDS), 4).tolist() == pytest.approx([0.5, 0.0, statistics.stdev([3, 1, 0, 0])])
    with pytest.raises(ValueError, match="do not split into groups of num_generations=4"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), 4)


# two completions, R = 3; the second has 2 real tokens
LOGPS = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]]
OLD = [[-1.4, -1.5, -0.5], [-0.6, -0.9, -9.0]]
REF = [[-0.9, -2.2, -0.7], [-0.5, -1.0, -9.0]]
MASK = [[True, True, True], [True, True, False]]
ADV = [1.5, -0.5]


def _hand_per_token(level, eps_low, eps_high, beta):
    rows = []
    for i in range(2):
        real = [t for t in range(3) if MASK[i][t]]
        seq = sum(LOGPS[i][t] - OLD[i][t] for t in real) / len(real)
        row = []
        for t in range(3):
            rho = math.exp(seq if level == "sequence" else LOGPS[i][t] - OLD[i][t])
            clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
            loss = -min(rho * ADV[i], clipped * ADV[i])
            d = REF[i][t] - LOGPS[i][t]
            kl = math.exp(d) - d - 1
            row.append((loss + beta * kl, rho, kl))
        rows.append(row)
    return rows


def _hand_loss(loss_type, rows, max_len=None):
    if loss_type == "grpo":
        per_seq = [sum(rows[i][t][0] for t in range(3) if MASK[i][t]) / sum(MASK[i]) for i in range(2)]
        return sum(per_seq) / 2
    total = sum(rows[i][t][0] for i in range(2) for t in range(3) if MASK[i][t])
    if loss_type in ("bnpo", "dapo"):
        return total / 5
    return total / (2 * (max_len or 3))


def _call(**kw):
    return grpo_loss(torch.tensor(LOGPS), torch.tensor(OLD), torch.tensor(ADV), torch.tensor(MASK),
                     ref_logps=torch.tensor(REF), **kw)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_matches_the_hand_computation(loss_type, level):
    rows = _hand_per_token(level, 0.2, 0.28, beta=0.0)
    loss, metrics = _call(loss_type=loss_type, epsilon_high=0.28, importance_sampling_level=level)
    assert float(loss) == pytest.approx(_hand_loss(loss_type, rows), rel=1e-6)
    assert "kl" not in metrics


def test_dr_grpo_divides_by_the_configured_max_completion_length():
    rows = _hand_per_token("token", 0.2, 0.2, beta=0.0)
    loss, _ = _call(loss_type="dr_grpo", max_completion_length=8)
    assert float(loss) == pytest.approx(_hand_loss("dr_grpo", rows, max_len=8), rel=1e-6)


def test_beta_adds_k3_per_token_and_reports_its_masked_mean():
    rows = _hand_per_token("token", 0.2, 0.2, beta=0.04)
    loss, metrics = _call(beta=0.04, loss_type="bnpo")
    assert float(loss) == pytest.approx(_hand_loss("bnpo", rows), rel=1e-6)
    kls = [rows[i][t][2] for i in range(2) for t in range(3) if MASK[i][t]]
    assert float(metrics["kl"]) == pytest.approx(sum(kls) / 5, rel=1e-6)


def test_clip_ratio_metrics_count_the_tokens_clipped_on_each_side():
    rows = _hand_per_token("token", 0.2, 0.2, beta=0.0)
    low = high = 0
    for i in range(2):
        for t in range(3):
            if MASK[i][t]:
                rho = rows[i][t][1]
                low += rho < 0.8 and ADV[i] < 0
                high += rho > 1.2 and ADV[i] > 0
    _, metrics = _call()
    # row 0 token 0: rho = e^0.4 > 1.2 with A > 0; row 1 token 1: e^-0.3 < 0.8 with A < 0; row 0 token 1 (e^-0.5,
    # A > 0) and row 1 token 0 (e^0.3, A < 0) are outside the bounds on the side that does not clip
    assert high == 1 and low == 1
    assert float(metrics["clip_ratio/high_mean"]) == pytest.approx(high / 5)
    assert float(metrics["clip_ratio/low_mean"]) == pytest.approx(low / 5)
    assert float(metrics["clip_ratio/region_mean"]) == pytest.approx((low + high) / 5)


def test_one_iteration_gradient_is_minus_advantage_over_token_count():
    logps = torch.tensor(LOGPS, requires_grad=True)
    loss, _ = grpo_loss(logps, logps.detach(), torch.tensor(ADV), torch.tensor(MASK), loss_type="dapo")
    loss.backward()
    expected = [[-ADV[i] / 5 if MASK[i][t] else 0.0 for t in range(3)] for i in range(2)]
    assert logps.grad.tolist() == [pytest.approx(r) for r in expected]


def test_beta_without_reference_and_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2, dtype=torch.bool), beta=0.1)
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
        _call(loss_type="ppo")
    problems = check_node({"num_generations": 1, "loss_type": "drgrpo"}, GRPO_RULES)
    assert "group of one has no baseline" in str(problems[0]) and "valid choices" in str(problems[1])
    assert "epsilon_high=0.1 must be >= epsilon=0.2" in str(grpo_relations({"epsilon": 0.2, "epsilon_high": 0.1})[0])
