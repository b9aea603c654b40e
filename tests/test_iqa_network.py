"""Shapes and gradients of the MD-IQA network and its ablation variants."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import DeformConv2d

from iqa_helpers import TINY_CONFIG
from qcnode.model.network import MDIQA, MDIQAConfig, preset_config

torch.set_num_threads(1)


def tiny(**kw) -> MDIQAConfig:
    return MDIQAConfig.from_dict({**MDIQAConfig().to_dict(), **TINY_CONFIG, **kw})


@pytest.mark.parametrize("branches", ["dual", "vit", "convnext"])
@pytest.mark.parametrize("head", ["multiscale", "single", "regression"])
def test_output_shapes_and_readout(branches, head):
    torch.manual_seed(0)
    m = MDIQA(tiny(branches=branches, head=head)).eval()
    x = torch.rand(3, 1, 64, 64)
    out = m(x)
    if head == "regression":
        assert out.shape == (3, 1)
    else:
        assert out.shape == (3, 3 if head == "multiscale" else 1, 41)
    s, lo, hi = m.predict(x)
    assert s.shape == lo.shape == hi.shape == (3,)
    assert torch.all((0 <= lo) & (lo <= s) & (s <= hi) & (hi <= 4))


def test_gradients_reach_both_branches_and_the_deformable_offsets():
    torch.manual_seed(0)
    m = MDIQA(tiny()).train()
    assert sum(isinstance(mod, DeformConv2d) for mod in m.modules()) == 2  # two aligned scales
    out = m(torch.rand(2, 1, 64, 64))
    out.logsumexp(-1).sum().backward()
    assert m.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    assert m.cnn.stem_0.weight.grad.abs().sum() > 0
    for align in m.align:
        # offsets start at zero but receive gradient through the deformable sampling
        assert align.offset.weight.grad.abs().sum() > 0
        assert align.deform.weight.grad.abs().sum() > 0


def test_default_config_is_small_and_dual_needs_two_scales():
    m = MDIQA(MDIQAConfig())
    n = sum(p.numel() for p in m.parameters())
    assert n * 4 < 25e6  # fits the 25 MB model budget in float32
    with pytest.raises(ValueError):
        MDIQAConfig(align_stages=(2,))
    with pytest.raises(ValueError):
        MDIQAConfig(head="nope")


def test_config_roundtrip_and_paper_preset_builds():
    cfg = preset_config("default", sigmas=[0.2, 0.4], input_size=96)
    assert MDIQAConfig.from_dict(cfg.to_dict()) == cfg
    paper = preset_config("paper")
    assert paper.vit_name == "vit_small_patch16_224" and paper.convnext_name == "convnext_tiny"
    m = MDIQA(paper)
    assert m.vit.embed_dim == 384
    assert m.vit.patch_embed.grid_size == (14, 14)


def test_deform_conv3x3_equals_torchvision():
    from torchvision.ops import deform_conv2d

    from qcnode.model.network import deform_conv3x3

    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 9, requires_grad=True)
    off = (torch.randn(2, 18, 7, 9) * 1.5).requires_grad_()  # includes samples outside the map
    w = torch.randn(4, 5, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    ref = deform_conv2d(x, off, w, b, padding=1)
    got = deform_conv3x3(x, off, w, b)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    g_ref = torch.autograd.grad(ref.square().sum(), (x, off, w, b))
    g_got = torch.autograd.grad(got.square().sum(), (x, off, w, b))
    for a, e in zip(g_got, g_ref):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_paper_preset_trains_a_step():
    from qcnode.training.losses import loss_fn

    torch.manual_seed(0)
    m = MDIQA(preset_config("paper")).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    x, y = torch.rand(2, 1, 224, 224), torch.tensor([1.0, 3.0])
    before = m.head.score[2].weight.detach().clone()
    loss = loss_fn(m, m(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, m.head.score[2].weight)


def test_wide_input_mode_channels_and_legacy_checkpoints():
    cfg = tiny(input_mode="wide", window_hu=(-1024.0, 1024.0))
    m = MDIQA(cfg).eval()
    assert m.in_chans == 3
    hu = torch.full((1, 1, 64, 64), -1000.0)
    hu[..., 20:40, 20:40] = 40.0
    x = (hu + 1024.0) / 2048.0
    ch = m.input_channels(x)
    assert ch.shape == (1, 3, 64, 64)
    # soft-tissue view: air -> 0 -> standardised -2; 40 HU -> 0.5 -> 0
    assert float(ch[0, 0, 0, 0]) == pytest.approx(-2.0) and float(ch[0, 0, 30, 30]) == pytest.approx(0.0, abs=1e-5)
    # high-pass in HU / highpass_hu: flat regions 0, a 1040 HU edge saturates at +-4
    assert float(ch[0, 2, 5, 5]) == pytest.approx(0.0, abs=1e-4) and float(ch[0, 2].abs().max()) == 4.0
    legacy = {k: v for k, v in MDIQAConfig().to_dict().items() if k != "input_mode"}
    assert MDIQAConfig.from_dict(legacy).input_mode == "soft"
    with pytest.raises(ValueError):
        MDIQAConfig(input_mode="nope")


@pytest.mark.parametrize("head", ["multiscale", "regression"])
def test_test_time_views_average_the_mirrored_outputs(head):
    torch.manual_seed(0)
    m = MDIQA(tiny(head=head)).eval()
    x = torch.rand(3, 1, 64, 64)
    s1, _, _ = m.predict(x)
    s_mirror, _, _ = m.predict(x.flip(-1))
    assert not torch.allclose(s1, s_mirror)  # the untrained net is not mirror-symmetric: the check can fail
    m.config.test_time_views = 2
    s2, lo2, hi2 = m.predict(x)
    with torch.no_grad():
        both = torch.stack([m(x), m(x.flip(-1))])
    expected = m.readout_outputs(both)
    for got, want in zip((s2, lo2, hi2), expected):
        assert torch.allclose(got, want, atol=1e-5)
    if head == "regression":
        assert torch.allclose(s2, ((s1 + s_mirror) / 2).clamp(0, 4), atol=1e-5)
    else:  # the distributions are averaged before the readout, not the two scores
        probs = torch.softmax(both.float(), -1).mean(0)
        assert torch.allclose(s2, m.readout.score(probs), atol=1e-5)
    # a mirrored slice gets the same score with two views
    s2m, _, _ = m.predict(x.flip(-1))
    assert torch.allclose(s2, s2m, atol=1e-5)


def test_mirrored_views_and_bad_view_counts():
    from qcnode.model.network import mirrored_views
    x = torch.arange(6.0).reshape(1, 1, 2, 3)
    views = mirrored_views(x, 8)
    assert len(views) == 8 and torch.equal(views[0], x) and torch.equal(views[1], x.flip(-1))
    assert views[4].shape == (1, 1, 3, 2)  # transposes (square slices in practice)
    assert len({tuple(v.flatten().tolist()) for v in views[:4]}) == 4
    for bad in (0, 3, 16, 2.0, True, "2"):
        with pytest.raises(ValueError, match="test_time_views"):
            tiny(test_time_views=bad)
    for bad in (0, -1.0, float("nan"), float("inf"), "abc"):
        with pytest.raises(ValueError, match="interval_temperature"):
            tiny(interval_temperature=bad)
