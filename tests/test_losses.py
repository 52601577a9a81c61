"""Loss values pinned against numbers computed by hand (plain-Python math, see the comments)."""

import pytest
import torch

from mixkd.losses import KDObjective, kd_loss, soft_cross_entropy, standardize, std_kd_loss, supervised_objective

# Two samples, three classes. Expected values were computed with plain Python `math`:
# softmax, KL(p||q) = sum p log(p/q), unbiased std, averaged over the 2 samples.
S = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
T = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, 4.0]])
Y = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]])

KD_T1 = 0.6193906993480646  # 1^2 * mean_i KL(softmax(t_i) || softmax(s_i))
KD_T4 = 0.7703364776835958  # 4^2 * mean_i KL(softmax(t_i/4) || softmax(s_i/4))
STD_KD = 0.5832815506628678  # mean_i KL(softmax(t_i/std(t_i)) || softmax(s_i/std(s_i)))
CE = 1.1744586305507685  # -mean_i sum_c y_ic log softmax(s_i)_c
CE_STD = 1.2576059644443802  # the same on s_i / std(s_i)


def test_kd_loss_matches_hand_computed_values():
    assert kd_loss(S, T, 1.0).item() == pytest.approx(KD_T1, rel=1e-6)
    assert kd_loss(S, T, 4.0).item() == pytest.approx(KD_T4, rel=1e-6)


def test_std_kd_loss_matches_hand_computed_value_and_has_no_t2_factor():
    assert std_kd_loss(S, T).item() == pytest.approx(STD_KD, rel=1e-6)


def test_soft_cross_entropy_matches_hand_computed_value():
    assert soft_cross_entropy(S, Y).item() == pytest.approx(CE, rel=1e-6)
    onehot = torch.nn.functional.one_hot(torch.tensor([2, 0]), 3).float()
    assert soft_cross_entropy(S, onehot).item() == pytest.approx(
        torch.nn.functional.cross_entropy(S, torch.tensor([2, 0])).item(), rel=1e-6)


def test_standardize_uses_unbiased_std_over_classes():
    z = standardize(S)
    assert torch.allclose(z.std(dim=-1), torch.ones(2))
    assert torch.allclose(z[0], torch.tensor([1.0, 2.0, 3.0]) / 1.0)  # std of 1,2,3 (unbiased) is 1


def test_std_kd_is_invariant_to_logit_scale():
    assert std_kd_loss(3.0 * S, 0.5 * T).item() == pytest.approx(STD_KD, rel=1e-5)


def test_kd_losses_vanish_when_student_equals_teacher():
    assert kd_loss(T, T, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert std_kd_loss(T, T).item() == pytest.approx(0.0, abs=1e-6)


def test_hinton_objective_combines_gamma_ce_and_alpha_kd():
    out = KDObjective("kd", temperature=4.0, ce_weight=0.1, kd_weight=0.9)(S, T, Y)
    assert out["ce"].item() == pytest.approx(CE, rel=1e-6)
    assert out["kd"].item() == pytest.approx(KD_T4, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.1 * CE + 0.9 * KD_T4, rel=1e-6)


def test_standardized_objective_uses_standardized_logits_in_ce():
    out = KDObjective("std", ce_weight=0.1, kd_weight=0.9)(S, T, Y)
    assert out["ce"].item() == pytest.approx(CE_STD, rel=1e-6)
    assert out["kd"].item() == pytest.approx(STD_KD, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.1 * CE_STD + 0.9 * STD_KD, rel=1e-6)
    custom = KDObjective("std", ce_weight=0.5, kd_weight=2.0)(S, T, Y)
    assert custom["loss"].item() == pytest.approx(0.5 * CE_STD + 2.0 * STD_KD, rel=1e-6)


def test_losses_are_float32_for_bf16_logits():
    out = KDObjective("std")(S.bfloat16(), T.bfloat16(), Y)
    assert out["loss"].dtype == torch.float32
    assert supervised_objective(S.bfloat16(), Y)["loss"].dtype == torch.float32


def test_kd_gradient_flows_only_to_student():
    s = S.clone().requires_grad_(True)
    t = T.clone().requires_grad_(True)
    KDObjective("kd")(s, t.detach(), Y)["loss"].backward()
    assert s.grad is not None and t.grad is None
