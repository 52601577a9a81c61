"""Mixing: exact partial fractions, the reference sampling's share, invariants, Beta draws."""

import math

import pytest
import torch
from scipy import stats

from mixkd.mix import (
    MixSpec,
    cutmix,
    mix_batch,
    mixed_count,
    mixed_mask,
    partial_mixup,
    random_partners,
    reference_mixed_share,
    sample_beta,
)


def _batch(b=64, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 8, 8, generator=g)
    y = torch.nn.functional.one_hot(torch.randint(0, c, (b,), generator=g), c).float()
    return x, y


def _changed_rows(x, x_mixed):
    return (x_mixed != x).flatten(1).any(dim=1)


@pytest.mark.parametrize("b,fraction", [(64, 0.1), (64, 0.5), (10, 0.25), (7, 1.0), (64, 0.0)])
def test_partial_mixup_mixes_exactly_round_fraction_of_the_batch(b, fraction):
    x, y = _batch(b)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        mask = mixed_mask(b, fraction, "exact", g)
        assert int(mask.sum()) == mixed_count(b, fraction) == math.floor(fraction * b + 0.5)
    xm, ym = partial_mixup(x, y, alpha=1.0, fraction=fraction, generator=g)
    assert int(_changed_rows(x, xm).sum()) <= mixed_count(b, fraction)


def test_partial_mixup_unmixed_rows_equal_their_input_and_labels_stay_one_hot():
    x, y = _batch(64)
    g = torch.Generator().manual_seed(3)
    xm, ym = partial_mixup(x, y, 1.0, 0.1, generator=g)
    unchanged = ~_changed_rows(x, xm)
    assert int(unchanged.sum()) >= 64 - 6
    assert torch.equal(xm[unchanged], x[unchanged])
    assert torch.equal(ym[unchanged], y[unchanged])
    mixed = ~unchanged
    assert (ym[mixed] < 1).any(dim=1).all()  # a mixed row spreads its label over two classes (or one)


def test_mixed_labels_are_distributions_and_match_image_weights():
    x, y = _batch(32)
    g = torch.Generator().manual_seed(5)
    for spec in (MixSpec("mixup", 0.4, 1.0), MixSpec("mixup", 1.0, 0.3), MixSpec("cutmix", 1.0, 1.0),
                 MixSpec("cutmix", 1.0, 0.5), MixSpec("mixup", 1.0, 0.1, "reference")):
        xm, ym = mix_batch(x, y, spec, g)
        assert torch.allclose(ym.sum(dim=1), torch.ones(32), atol=1e-6)
        assert (ym >= 0).all() and (ym <= 1).all()
        assert xm.min() >= 0 and xm.max() <= 1


def test_mixup_image_is_convex_combination_with_label_weight():
    b = 16
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 4, 4).clone()
    y = torch.eye(b)
    xm, ym = mix_batch(x, y, MixSpec("mixup", 1.0, 1.0), torch.Generator().manual_seed(0))
    # sample i's own label weight is lambda_i; its pixel is lambda_i * i + (1 - lambda_i) * j(i)
    lam = ym[torch.arange(b), torch.arange(b)]
    partner = (ym - torch.diag(lam)).argmax(dim=1)
    expected = lam * torch.arange(b) + (1 - lam) * partner
    assert torch.allclose(xm[:, 0, 0, 0], expected, atol=1e-5)


def test_partners_are_a_permutation_without_self_pairs():
    g = torch.Generator().manual_seed(0)
    for b in (2, 3, 64):
        p = random_partners(b, g)
        assert sorted(p.tolist()) == list(range(b))
        assert (p != torch.arange(b)).all()


def test_reference_sampling_reproduces_released_codes_mixed_share():
    b, fraction = 64, 0.1
    expected = reference_mixed_share(b, fraction)
    assert expected == pytest.approx((63 / 64) ** 57)
    assert 0.40 < expected < 0.42  # "about 41% mixed at B = 64 for a nominal 10%"
    g = torch.Generator().manual_seed(0)
    shares = torch.stack([mixed_mask(b, fraction, "reference", g).float().mean() for _ in range(4000)])
    assert shares.mean().item() == pytest.approx(expected, abs=0.005)


def test_beta_draws_follow_beta_distribution():
    g = torch.Generator().manual_seed(0)
    for a in (0.2, 0.4, 1.0, 2.0):
        lam = sample_beta(a, 20000, g)
        assert ((lam >= 0) & (lam <= 1)).all() and torch.isfinite(lam).all()
        # chi-square over 20 equiprobable bins (lambda within float32 eps of 1 is exactly 1.0, so no KS test)
        edges = torch.tensor(stats.beta(a, a).ppf([i / 20 for i in range(1, 20)]), dtype=torch.float32)
        counts = torch.bincount(torch.bucketize(lam, edges), minlength=20).numpy()
        assert stats.chisquare(counts).pvalue > 1e-3, (a, counts)


def test_cutmix_label_weight_equals_pasted_area():
    b = 8
    x = torch.zeros(b, 1, 16, 16)
    x += torch.arange(b).view(b, 1, 1, 1)
    y = torch.eye(b)
    xm, ym = cutmix(x, y, 1.0, generator=torch.Generator().manual_seed(2))
    own = (xm == x).flatten(1).float().mean(dim=1)
    assert torch.allclose(ym[torch.arange(b), torch.arange(b)], own, atol=1e-6)


def test_mixing_is_reproducible_with_a_seeded_generator():
    x, y = _batch(16)
    a = mix_batch(x, y, MixSpec("mixup", 1.0, 0.5), torch.Generator().manual_seed(9))
    b = mix_batch(x, y, MixSpec("mixup", 1.0, 0.5), torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_no_mixing_returns_the_batch_unchanged():
    x, y = _batch(8)
    xm, ym = mix_batch(x, y, MixSpec("none"), None)
    assert xm is x and ym is y


@pytest.mark.parametrize("kwargs", [{"alpha": 0.0}, {"alpha": -1.0}, {"fraction": 1.5}, {"fraction": -0.1},
                                    {"method": "mixdown"}, {"sampling": "approx"}])
def test_invalid_mix_specs_are_rejected(kwargs):
    with pytest.raises(ValueError):
        MixSpec(**{"method": "mixup", **kwargs})
