"""CMG's pieces on a single device: the class-mixed sampler (Eq. 4), the latent sampler, the 80 %
margin rule, the stage-2 losses against hand-computed values, the CVAE (Eq. 2), the OOD-class scorer."""

from __future__ import annotations

import math

import pytest
import torch

from disttrain.config import ConfigError, FinetuneHeadConfig, SynthesizeConfig, TrainCVAEConfig, build
from disttrain.methods.cmg import CMGEnergy, CMGSoftmax, energy_margins, mixed_conditions, sample_latents
from disttrain.methods.outlier_exposure import energy
from disttrain.models.classifier import attach_head, split_head, widen_head
from disttrain.models.cvae import CVAE, check_cvae_shape, cvae_loss
from disttrain.ood import scorers
from disttrain.ood.scorers import Features


def test_mixed_conditions_mix_two_different_classes_componentwise_half_and_half():
    table = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    mixed = mixed_conditions(table, 30000, torch.Generator().manual_seed(1))
    assert (mixed.class_i != mixed.class_j).all()  # never a class with itself
    # k ~ Bernoulli(0.5) per component: overall and per component close to 1/2, and independent of the pair
    assert set(mixed.mask.unique().tolist()) == {0.0, 1.0}
    assert abs(mixed.mask.mean().item() - 0.5) < 0.005
    assert (mixed.mask.mean(0) - 0.5).abs().max().item() < 0.015
    # c_i uniform over the 6 classes, c_j uniform over the other 5
    assert (torch.bincount(mixed.class_i, minlength=6) / 30000 - 1 / 6).abs().max() < 0.01
    pairs = torch.zeros(6, 6)
    pairs.index_put_((mixed.class_i, mixed.class_j), torch.ones(30000), accumulate=True)
    off_diagonal = pairs[~torch.eye(6, dtype=torch.bool)] / 30000
    assert (off_diagonal - 1 / 30).abs().max() < 0.006
    # every component is exactly c_i's or c_j's, as the mask says
    expected = torch.where(mixed.mask.bool(), table[mixed.class_i], table[mixed.class_j])
    assert torch.equal(mixed.embeddings, expected)
    with pytest.raises(ValueError, match="at least 2 classes"):
        mixed_conditions(table[:1], 4, torch.Generator())


def test_latents_are_wide_gaussians_and_the_filter_removes_the_centre():
    z = sample_latents(20000, 16, 5.0, torch.Generator().manual_seed(0))
    assert abs(z.std().item() - 5.0) < 0.05 and abs(z.mean().item()) < 0.05
    t, sigma = 2.0, 1.0
    kept = sample_latents(20000, 16, sigma, torch.Generator().manual_seed(0), filter_t=t)
    assert kept.abs().min().item() > t
    # the kept part of N(0, 1): P(|z| > 3 | |z| > 2) = (1 - Phi(3)) / (1 - Phi(2))
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    expected = (1 - phi(3.0)) / (1 - phi(2.0))
    assert abs((kept.abs() > 3).float().mean().item() - expected) < 0.01
    assert abs((kept > 0).float().mean().item() - 0.5) < 0.01
    with pytest.raises(ValueError, match="sigma"):
        sample_latents(4, 4, 0.0, torch.Generator())


def test_margins_give_a_non_zero_loss_to_80_percent_of_each_side():
    e_id = torch.arange(100, dtype=torch.float64)[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    e_ood = torch.arange(100, 200, dtype=torch.float64)
    m_ind, m_ood = energy_margins(e_id, e_ood, 0.8)
    assert m_ind == pytest.approx(19.8) and m_ood == pytest.approx(179.2)
    assert (e_id > m_ind).sum().item() == 80  # max(0, E - m_ind) > 0
    assert (e_ood < m_ood).sum().item() == 80  # max(0, m_ood - E) > 0
    with pytest.raises(ValueError, match="fraction"):
        energy_margins(e_id, e_ood, 1.0)


def test_cmg_energy_loss_by_hand():
    # ID logits [0, 0], label 0: CE = log 2, E = -log 2; pseudo-OOD logits [-1, -1]: E = 1 - log 2
    logits_id, labels, logits_ood = torch.zeros(1, 2), torch.tensor([0]), torch.full((1, 2), -1.0)
    assert energy(logits_ood).item() == pytest.approx(1 - math.log(2))
    out = CMGEnergy(m_ind=-1.0, m_ood=1.0, weight=0.1)(logits_id, labels, logits_ood)
    # (max(0, -0.693147 + 1))^2 = 0.094159, (max(0, 1 - 0.306853))^2 = 0.480453
    assert out["energy_margin"].item() == pytest.approx(0.574612, abs=1e-5)
    assert out["loss"].item() == pytest.approx(0.693147 + 0.1 * 0.574612, abs=1e-5)
    # stage 2 without pseudo-OOD data (Fig. 2b): the ID hinge alone
    alone = CMGEnergy(m_ind=-1.0, m_ood=1.0, weight=0.1)(logits_id, labels, None)
    assert alone["loss"].item() == pytest.approx(0.693147 + 0.1 * 0.094159, abs=1e-5)
    # margins the energies already satisfy cost nothing
    assert CMGEnergy(m_ind=0.0, m_ood=0.0)(logits_id, labels, logits_ood)["energy_margin"].item() == 0.0


def test_cmg_softmax_loss_by_hand():
    # ID [0, 0, 0] label 0: CE = log 3; pseudo-OOD [0, 0, log 2] as class 2 (the OOD class): CE = log 2
    out = CMGSoftmax()(torch.zeros(1, 3), torch.tensor([0]), torch.tensor([[0.0, 0.0, math.log(2)]]))
    assert out["loss"].item() == pytest.approx((math.log(3) + math.log(2)) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="pseudo-OOD"):
        CMGSoftmax()(torch.zeros(1, 3), torch.tensor([0]), None)


def test_ood_class_scorer_reads_the_extra_output_only():
    scorer = scorers.get("ood_class")
    assert scorer.reads_extra_outputs and not scorers.get("msp").reads_extra_outputs
    score = scorer.score(Features(logits=torch.tensor([[0.0, 0.0, math.log(2)], [0.0, 0.0, -100.0]])))
    # stored: log p_{N+1} (float64, keeps confident inputs apart); the paper's p_{N+1} is paper_score of it
    assert score.tolist() == pytest.approx([math.log(0.5), -100 - math.log(2)], rel=1e-6)
    assert scorer.paper_score(score).tolist() == pytest.approx([0.5, 0.0], abs=1e-6)  # higher = more OOD


@pytest.mark.parametrize("variant,size,channels", [("resnet18", 32, 3), ("small", 28, 1)])
def test_cvae_shapes_and_eq2(variant, size, channels):
    net = CVAE(num_classes=4, image_size=size, channels=channels, variant=variant, latent_dim=8, embed_dim=6)
    images, labels = torch.rand(3, channels, size, size), torch.tensor([0, 1, 3])
    logits, mean, logvar = net(images, labels)
    assert logits.shape == images.shape and mean.shape == logvar.shape == (3, 8)
    decoded = net.decode(net.class_embedding(labels), torch.zeros(3, 8))
    assert decoded.shape == images.shape and 0 <= decoded.min() and decoded.max() <= 1
    # Eq. 2 by hand: logits 0 -> -log p = log 2 per pixel; q = N(0, I) -> KL 0; q = N(1, e) -> KL per dim
    # -0.5 * (1 + 1 - 1 - e) = 0.5 * (e - 1)
    zero = torch.zeros_like(images)
    terms = cvae_loss(zero, images, torch.zeros(3, 8), torch.zeros(3, 8))
    assert terms["reconstruction"].item() == pytest.approx(channels * size * size * math.log(2), rel=1e-5)
    assert terms["kl"].item() == 0.0
    kl = cvae_loss(zero, images, torch.ones(3, 8), torch.ones(3, 8))["kl"].item()
    assert kl == pytest.approx(8 * 0.5 * (math.e - 1), rel=1e-5)


def test_head_split_widen_and_attach_keep_the_weights():
    import timm

    net = timm.create_model("resnet10t", num_classes=5)
    fc = net.fc.weight.detach().clone()
    extractor, head = split_head(net)
    assert extractor(torch.rand(2, 3, 32, 32)).shape == (2, head.in_features)
    wider = widen_head(head, 1)
    assert wider.out_features == 6 and torch.equal(wider.weight[:5], fc)
    whole = attach_head(extractor, wider)
    assert whole(torch.rand(2, 3, 32, 32)).shape == (2, 6) and whole.get_classifier() is wider


def test_configs_refuse_impossible_values_before_compute():
    with pytest.raises(ConfigError, match="cmg.sigma=0.0 must be > 0"):
        build(SynthesizeConfig, "debug", {"cmg.sigma": 0.0})
    with pytest.raises(ConfigError, match="cmg.sigma=-1.0 must be > 0"):
        build(SynthesizeConfig, "debug", {"cmg.sigma": -1.0})
    with pytest.raises(ConfigError, match="no pseudo-OOD images"):
        build(SynthesizeConfig, "debug", {"cmg.count": 0, "cmg.ratio": 0.0})
    with pytest.raises(ConfigError, match="multiple of 8"):
        build(TrainCVAEConfig, "cifar10", {"data.root": "x", "data.image_size": 28})
    assert check_cvae_shape("small", 28) is None
    with pytest.raises(ConfigError, match="cmg_softmax learns its OOD class"):
        build(FinetuneHeadConfig, "debug", {"method": "cmg_softmax", "pseudo_ood.use": False})
    with pytest.raises(ConfigError, match="classifier="):
        build(FinetuneHeadConfig, "debug", {"classifier": ""})


def test_paper_presets_follow_section_4_3():
    stage1 = build(TrainCVAEConfig, "cifar10", {"data.root": "x"})
    assert (stage1.optim.name, stage1.optim.lr, stage1.batch.global_size, stage1.train.num_epochs) == \
        ("adam", 1e-3, 512, 200)
    assert stage1.cvae.variant == "resnet18" and build(TrainCVAEConfig, "mnist", {"data.root": "x"}).cvae.variant \
        == "small"
    stage2 = build(FinetuneHeadConfig, "cifar10", {"data.root": "x"})
    assert (stage2.optim.lr, stage2.batch.global_size, stage2.pseudo_ood.batch_size, stage2.train.num_epochs) == \
        (1e-4, 128, 128, 10)
    assert stage2.strategy == "frozen" and stage2.cmg_energy.margin_fraction == 0.8
    assert build(SynthesizeConfig, "cifar10").cmg.sigma == 5.0 and build(SynthesizeConfig, "cifar10").cmg.ratio == 1
