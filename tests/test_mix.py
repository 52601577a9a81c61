"""Mixing: exact partial fractions, the reference sampling's share, invariants, Beta draws."""

import math

import pytest
import torch
from scipy import stats

from mixkd.config import reference_mixed_share
from mixkd.mix import (
    MixSpec,
    cutmix,
    mix_batch,
    mixed_count,
    mixed_mask,
    partial_mixup,
    random_partners,
    rank_mixed_count,
    sample_beta,
)


def _batch(b=64, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, 8, 8, generator=g)
    y = torch.nn.functional.one_hot(torch.randint(0, c, (b,), generator=g), c).float()
    return x, y


def _changed_rows(x, x_mixed):
    return (x_mixed != x).flatten(1).any(dim=1)


def _labelled_images(b, h=4):
    """Sample i: an image of constant value i / b, label one-hot i. A mixed image's mean pixel is then
    sum_c y_c * c / b (mixup: lambda_i * i + (1 - lambda_i) * j; CutMix: own area * i + pasted area * j)."""
    x = (torch.arange(b, dtype=torch.float32) / b).view(b, 1, 1, 1).expand(b, 3, h, h).clone()
    return x, torch.eye(b)


def _mixed_rows(y_mixed):
    """Rows whose label is spread over more than one class."""
    return (y_mixed < 1).all(dim=1)


def test_mixed_count_rounds_halves_up():
    # round(fraction * B) computed by hand: 6.4 -> 6, 32, 2.5 -> 3, 7, 0, 12.8 -> 13, 0.5 -> 1
    cases = [(64, 0.1, 6), (64, 0.5, 32), (10, 0.25, 3), (7, 1.0, 7), (64, 0.0, 0), (128, 0.1, 13), (5, 0.1, 1)]
    assert [mixed_count(b, f) for b, f, _ in cases] == [n for _, _, n in cases]


def test_partial_mixup_of_a_data_parallel_batch_mixes_round_fraction_of_the_global_batch_whatever_the_world():
    """f = 0.1 of a global batch of 512 is 51 mixed samples (51.2 rounded) on 1, 2, 8, 32 or 64 ranks, each
    rank mixing its deterministic share of its 512/N images through mix_batch (each rank's own
    round(0.1 x 512/N) would give 51, 52, 48, 64, 0)."""
    spec = MixSpec("mixup", 1.0, 0.1)
    for world in (1, 2, 8, 32, 64):
        part = 512 // world
        shares = []
        for rank in range(world):
            x, y = _batch(part, seed=rank)
            xm, _ = mix_batch(x, y, spec, torch.Generator().manual_seed(rank), rank=rank, world=world)
            shares.append(int(_changed_rows(x, xm).sum()))
            assert shares[-1] == rank_mixed_count(part, 0.1, rank, world)
        assert sum(shares) == 51, (world, shares)
        assert max(shares) - min(shares) <= 1  # spread evenly (parts are equal)
    # hand-computed shares: c(p) = round(51 p / 512); 2 ranks: c(256) = 26 (25.5 up), then 51 - 26 = 25
    assert [rank_mixed_count(256, 0.1, r, 2) for r in range(2)] == [26, 25]
    assert [rank_mixed_count(64, 0.1, r, 8) for r in range(8)] == [6, 7, 6, 7, 6, 6, 7, 6]


@pytest.mark.parametrize("b,fraction", [(64, 0.1), (64, 0.5), (10, 0.25), (7, 1.0), (64, 0.0)])
def test_partial_mixup_mixes_exactly_round_fraction_of_the_batch(b, fraction):
    x, y = _batch(b)[0], torch.eye(b)  # one class per sample: a mixed label is never one-hot
    g = torch.Generator().manual_seed(1)
    n = math.floor(fraction * b + 0.5)
    for _ in range(20):
        mask = mixed_mask(b, fraction, "exact", g)
        assert int(mask.sum()) == mixed_count(b, fraction) == n
        xm, ym = partial_mixup(x, y, alpha=1.0, fraction=fraction, generator=g)
        # lambda < 1 and distinct random images: every chosen sample changes, image and label, no other one
        assert int(_changed_rows(x, xm).sum()) == n
        assert torch.equal(_changed_rows(x, xm), _mixed_rows(ym))


def test_partial_mixup_unmixed_rows_equal_their_input_and_labels_stay_one_hot():
    x, y = _batch(64)[0], torch.eye(64)  # one class per sample: a mixed label is never one-hot
    g = torch.Generator().manual_seed(3)
    xm, ym = partial_mixup(x, y, 1.0, 0.1, generator=g)
    unchanged = ~_changed_rows(x, xm)
    assert int(unchanged.sum()) == 64 - 6
    assert torch.equal(xm[unchanged], x[unchanged])
    assert torch.equal(ym[unchanged], y[unchanged])
    mixed = ~unchanged
    assert ((ym[mixed] > 0).sum(dim=1) == 2).all()  # a mixed row spreads its label over two classes
    assert (ym[mixed].max(dim=1).values < 1).all()


@pytest.mark.parametrize("spec,n_mixed", [
    (MixSpec("mixup", 0.4, 1.0), 32), (MixSpec("mixup", 1.0, 0.3), 10), (MixSpec("cutmix", 1.0, 1.0), None),
    (MixSpec("cutmix", 1.0, 0.5), None), (MixSpec("mixup", 1.0, 0.1, "reference"), None)])
def test_mixed_labels_are_distributions_and_match_image_weights(spec, n_mixed):
    """Each label is a distribution over the (at most two) classes whose pixels the image holds, in the
    proportions it holds them. n_mixed: round(fraction * 32) for exact mixup; CutMix's box can be empty."""
    b = 32
    x, y = _labelled_images(b, h=16)
    xm, ym = mix_batch(x, y, spec, torch.Generator().manual_seed(5))
    assert torch.allclose(ym.sum(dim=1), torch.ones(b), atol=1e-6)
    assert (ym >= 0).all() and (ym <= 1).all() and ((ym > 0).sum(dim=1) <= 2).all()
    assert xm.min() >= 0 and xm.max() <= 1
    assert torch.allclose(xm.mean(dim=(1, 2, 3)), ym @ (torch.arange(b) / b), atol=1e-5)
    mixed = _mixed_rows(ym)
    assert torch.equal(mixed, _changed_rows(x, xm))
    if n_mixed is not None:
        assert int(mixed.sum()) == n_mixed
    else:
        assert int(mixed.sum()) >= b * spec.fraction / 4  # most boxes are not empty (half of them here)


def test_mixup_image_is_convex_combination_with_label_weight():
    b = 16
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 4, 4).clone()
    y = torch.eye(b)
    xm, ym = mix_batch(x, y, MixSpec("mixup", 1.0, 1.0), torch.Generator().manual_seed(0))
    # sample i's own label weight is lambda_i < 1; the rest goes to one partner j(i) != i, and its pixel
    # is lambda_i * i + (1 - lambda_i) * j(i)
    lam = ym[torch.arange(b), torch.arange(b)]
    assert ((lam > 0) & (lam < 1)).all()
    partner = (ym - torch.diag(lam)).argmax(dim=1)
    assert (partner != torch.arange(b)).all()
    assert sorted(partner.tolist()) == list(range(b))  # every sample is some sample's partner once
    assert torch.allclose(ym[torch.arange(b), partner], 1 - lam, atol=1e-6)
    expected = lam * torch.arange(b) + (1 - lam) * partner
    assert torch.allclose(xm[:, 0, 0, 0], expected, atol=1e-5)
    assert torch.allclose(xm, expected.view(b, 1, 1, 1).expand(b, 3, 4, 4), atol=1e-5)


def test_mixup_pinned_to_hand_computed_values():
    """Two samples must be each other's partner: x'_0 = l0 x0 + (1 - l0) x1, x'_1 = l1 x1 + (1 - l1) x0,
    with (l0, l1) the generator's Beta(1, 1) draws, which are its first two uniform draws."""
    x = torch.tensor([[2.0, 0.0], [0.0, 4.0]]).view(2, 1, 1, 2)
    y = torch.eye(2)
    l0, l1 = torch.rand(2, generator=torch.Generator().manual_seed(4)).tolist()
    xm, ym = mix_batch(x, y, MixSpec("mixup", 1.0, 1.0), torch.Generator().manual_seed(4))
    assert torch.allclose(xm.view(2, 2), torch.tensor([[2 * l0, 4 * (1 - l0)], [2 * (1 - l1), 4 * l1]]))
    assert torch.allclose(ym, torch.tensor([[l0, 1 - l0], [1 - l1, l1]]))


def test_partners_are_a_permutation_without_self_pairs():
    g = torch.Generator().manual_seed(0)
    for b in (2, 3, 5, 64):
        for _ in range(50):  # a random permutation of 2..64 has a fixed point 37-50% of the time
            p = random_partners(b, g)
            assert sorted(p.tolist()) == list(range(b))
            assert (p != torch.arange(b)).all()
    assert random_partners(2, g).tolist() == [1, 0]


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
    assert int((own < 1).sum()) >= b // 2  # boxes were pasted (an empty box leaves a sample as it was)
    for i in range(b):
        pasted = xm[i][xm[i] != i]
        if pasted.numel():  # one partner j != i, whose label weight is its share of the pixels
            j = int(pasted[0])
            assert j != i and (pasted == j).all()
            assert ym[i, j].item() == pytest.approx(pasted.numel() / 256, abs=1e-6)
            rows, cols = (xm[i, 0] == j).nonzero(as_tuple=True)  # the box is a rectangle
            assert pasted.numel() == (int(rows.max() - rows.min()) + 1) * (int(cols.max() - cols.min()) + 1)


def test_cutmix_label_weight_is_the_clipped_area_not_lambda(monkeypatch):
    """lambda = 0 pastes a whole-image box around a random centre; clipped, it covers less than the
    image, and the label follows the pixels (lambda alone would give the partner weight 1)."""
    import mixkd.mix

    b, h = 4, 8
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 1, h, h).clone()
    monkeypatch.setattr(mixkd.mix, "sample_beta", lambda alpha, n, generator=None, device=None: torch.zeros(n))
    xm, ym = cutmix(x, torch.eye(b), 1.0, generator=torch.Generator().manual_seed(0))
    own = (xm == x).flatten(1).float().mean(dim=1)
    assert (own > 0).any() and (own < 1).all()  # centres off the image's middle: the box is clipped
    assert torch.allclose(ym[torch.arange(b), torch.arange(b)], own)


def test_mixing_is_reproducible_with_a_seeded_generator():
    x, y = _batch(16)
    for spec in (MixSpec("mixup", 1.0, 0.5), MixSpec("cutmix", 1.0, 1.0)):
        a = mix_batch(x, y, spec, torch.Generator().manual_seed(9))
        b = mix_batch(x, y, spec, torch.Generator().manual_seed(9))
        c = mix_batch(x, y, spec, torch.Generator().manual_seed(10))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], x) and not torch.equal(a[1], y)  # it mixed
        assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])  # another seed mixes otherwise


def test_no_mixing_returns_the_batch_unchanged():
    x, y = _batch(8)
    xm, ym = mix_batch(x, y, MixSpec("none"), None)
    assert xm is x and ym is y


@pytest.mark.parametrize("kwargs", [{"alpha": 0.0}, {"alpha": -1.0}, {"fraction": 1.5}, {"fraction": -0.1},
                                    {"method": "mixdown"}, {"sampling": "approx"}])
def test_invalid_mix_specs_are_rejected(kwargs):
    with pytest.raises(ValueError):
        MixSpec(**{"method": "mixup", **kwargs})
