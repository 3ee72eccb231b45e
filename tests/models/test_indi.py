"""InDI: network training, the restoration iteration, tiled inference, pair registration, pretrained gain."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio

pytest.importorskip("tensorflow")

from phasestream.metrics import edge_fwhm, edge_points, line_profile, psnr
from phasestream.models.indi import (
    InDINet,
    _predict_tiled,
    choose_steps,
    enhance_image,
    enhance_volume,
    huber_like,
    indi_restore,
    prepare_pair,
    train_indi,
)
from phasestream.models.pairs import split_field
from phasestream.models.registry import ModelRegistry
from phasestream.sim.phantoms import degrade, particle_phantom, phantom_pairs, upscale


def test_tiny_unet_trains_and_its_loss_falls():
    hq, lq = phantom_pairs(2, (96, 96), seed=7)
    result = train_indi(list(hq), [upscale(x) for x in lq], base_filters=4, depth=1, crop=32, batch_size=4,
                        iterations=80, max_learning_rate=3e-3, step_candidates=(1, 2), progress=False)
    first, last = np.mean(result.history[:10]), np.mean(result.history[-10:])
    assert last < 0.8 * first
    assert result.steps in (1, 2) and set(result.metrics["psnr_by_steps"]) == {"1", "2"}
    # validated on bands of the fields never trained on; bicubic's figures against scikit-image
    validation = result.metrics["validation"]
    _, band = split_field((96, 96), crop=32)
    bicubic = [peak_signal_noise_ratio(h[band].astype(np.float64), upscale(x)[band].astype(np.float64),
                                       data_range=float(np.ptp(h[band]))) for h, x in zip(hq, lq, strict=True)]
    assert validation["bicubic"]["psnr_db"] == pytest.approx(np.mean(bicubic), abs=1e-4)
    assert validation["gain_over_bicubic_db"] == pytest.approx(validation["psnr_db"] - np.mean(bicubic), abs=1e-4)
    assert {"ssim", "edge_fwhm_px", "hf_correlation"} <= set(validation["bicubic"])


def test_default_steps_never_pass_a_loss_of_fine_detail():
    by_steps = {"1": {"psnr_db": 25.0, "hf_correlation": 0.90}, "2": {"psnr_db": 25.5, "hf_correlation": 0.91},
                "4": {"psnr_db": 26.0, "hf_correlation": 0.85}, "8": {"psnr_db": 26.5, "hf_correlation": 0.95}}
    assert choose_steps(by_steps) == 2  # 4 loses detail: neither 4 nor 8, despite their PSNR
    by_steps["4"]["hf_correlation"] = 0.92
    assert choose_steps(by_steps) == 8
    assert choose_steps({"1": {"psnr_db": 20.0, "hf_correlation": 0.5},
                         "2": {"psnr_db": 20.03, "hf_correlation": 0.6}}) == 1  # within 0.05 dB: fewer steps


def test_huber_like_loss_values():
    target = np.zeros(4, np.float32)
    pred = np.array([0.2, -0.5, 0.8, -2.0], np.float32)
    expected = np.mean([0.2, 0.5, 0.8**2 + 0.25, 4.0 + 0.25])
    assert float(huber_like(target, pred)) == pytest.approx(expected, rel=1e-6)


def test_restoration_loop_closed_form():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 8)).astype(np.float32), rng.normal(size=(8, 8)).astype(np.float32)
    seen = []

    def perfect(a, t):  # F returns the HQ image: x_t must stay on the line (1 - t) x + t y
        seen.append((t, a.copy()))
        return x

    out = indi_restore(perfect, y, 7)
    np.testing.assert_allclose(out, x, atol=1e-5)
    for t, a in seen:
        np.testing.assert_allclose(a, (1 - t) * x + t * y, atol=1e-5)
    assert [round(t, 6) for t, _ in seen] == [round(1 - i / 7, 6) for i in range(7)]
    np.testing.assert_allclose(indi_restore(lambda a, t: a, y, 5), y, atol=1e-6)  # F = identity on x_t
    with pytest.raises(ValueError):
        indi_restore(perfect, y, 0)


def test_tiled_inference_equals_whole_image_away_from_the_border():
    model = InDINet(base_filters=4, depth=1, dilations=(1, 2)).build_for_inference()
    image = np.random.default_rng(1).normal(size=(160, 160)).astype(np.float32)
    whole = _predict_tiled(model, image, 0.5, tile=512, overlap=0)
    tiled = _predict_tiled(model, image, 0.5, tile=112, overlap=40)  # 25 tiles of 32-pixel cores
    inner = slice(40, -40)
    np.testing.assert_allclose(tiled[inner, inner], whole[inner, inner], atol=1e-4)
    full = enhance_image(model, image[::2, ::2], steps=3, tile=112, overlap=40)
    assert full.shape == (160, 160) and np.isfinite(full).all()


def test_volume_is_enhanced_slice_by_slice_and_interpolated_along_z():
    model = InDINet(base_filters=4, depth=1, dilations=(1,)).build_for_inference()
    volume = np.random.default_rng(2).normal(size=(3, 16, 16)).astype(np.float32)
    out = enhance_volume(model, volume, steps=2)
    assert out.shape == (6, 32, 32)


def test_prepare_pair_finds_the_field_and_recovers_a_subpixel_shift():
    big = particle_phantom((256, 256), seed=11, n_particles=14)
    shift = (1.4, -0.6)
    hq = ndimage.shift(big, shift, order=3, mode="nearest")[48:176, 64:192]
    lq = degrade(big, blur_sigma=1.0, noise=0.002, seed=1)  # the wide, low-resolution scan
    hq_c, lq_c, info = prepare_pair(lq, hq)
    assert np.abs(np.array(info["offset_px"]) - [48, 64]).max() <= 2  # integer search; the rest is sub-pixel
    total = np.array(info["offset_px"]) - [48, 64] - np.array(info["shift_px"])
    np.testing.assert_allclose(total, [-shift[0], -shift[1]], atol=0.1)
    assert hq_c.shape == lq_c.shape and hq_c.shape[0] % 4 == 0
    assert np.corrcoef(hq_c.ravel(), lq_c.ravel())[0, 1] > 0.95


def test_pretrained_indi_beats_bicubic_on_held_out_pairs():
    """Acceptance: >= 2 dB PSNR over bicubic and >= 30% narrower edges, on phantoms never trained on."""
    art, model = ModelRegistry().load("indi-particles-synthetic")
    steps = art.manifest["steps"]
    hq, lq = phantom_pairs(3, (256, 256), seed=999)
    gains, fwhm_bicubic, fwhm_indi = [], [], []
    for h, low in zip(hq, lq, strict=True):
        bicubic = upscale(low)
        enhanced = enhance_image(model, low, steps=steps)
        gains.append(psnr(h, enhanced) - psnr(h, bicubic))
        points, normals = edge_points(h, n=30)
        for p, n in zip(points, normals, strict=True):
            fwhm_bicubic.append(edge_fwhm(line_profile(bicubic, p, n), spacing=0.5))
            fwhm_indi.append(edge_fwhm(line_profile(enhanced, p, n), spacing=0.5))
    reduction = 1 - np.median(fwhm_indi) / np.median(fwhm_bicubic)
    print(f"PSNR gain {np.mean(gains):.2f} dB; edge FWHM {np.median(fwhm_bicubic):.2f} -> "
          f"{np.median(fwhm_indi):.2f} px ({100 * reduction:.0f}% narrower)")
    assert min(gains) >= 2.0
    assert reduction >= 0.30
    assert art.manifest["demo"] is True and art.manifest["metrics"]["gain_over_bicubic_db"] >= 1.0
