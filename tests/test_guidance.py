"""Guidance wrappers against exact class-conditional mixtures."""
import torch

import unifusion as uf
from unifusion.guidance import classifier, classifier_free
from tests.oracles import mixture_2d, noise


def setup(b=32, sigma=1.5):
    gm = mixture_2d(classes=2)
    g = torch.Generator().manual_seed(0)
    x = gm.sample(b, g)[0] + sigma * torch.randn(b, 2, generator=g, dtype=torch.float64)
    return gm, x, torch.full((b,), sigma, dtype=torch.float64), torch.arange(b) % 2


def null_aware(gm):
    """Denoiser taking label -1 as 'no label' (what a CFG-trained network does with its null class)."""
    def D(x, sigma, y):
        cond, uncond = gm.denoise(x, sigma, y.clamp(min=0)), gm.denoise(x, sigma)
        return torch.where((y >= 0)[:, None], cond, uncond)
    return D


def test_cfg_scale_one_is_conditional_and_zero_is_unconditional():
    gm, x, s, y = setup()
    D = null_aware(gm)
    torch.testing.assert_close(classifier_free(D, 1.0, {"y": -torch.ones_like(y)})(x, s, y=y), gm.denoise(x, s, y))
    torch.testing.assert_close(classifier_free(D, 0.0, {"y": -torch.ones_like(y)})(x, s, y=y), gm.denoise(x, s))


def test_cfg_formula_batched_and_unbatched_agree():
    gm, x, s, y = setup()
    D = null_aware(gm)
    w = 3.0
    want = gm.denoise(x, s) + w * (gm.denoise(x, s, y) - gm.denoise(x, s))
    for batched in (True, False):
        got = classifier_free(D, w, {"y": -torch.ones_like(y)}, batched=batched)(x, s, y=y)
        torch.testing.assert_close(got, want)


def test_classifier_guidance_with_exact_classifier_is_the_conditional_score():
    """grad log p(x | y) = grad log p(x) + grad log p(y | x): exact at every noise level."""
    gm, x, s, y = setup(sigma=0.7)
    guided = classifier(lambda x, sigma, y: gm.denoise(x, sigma), gm.class_log_prob, scale=1.0)
    torch.testing.assert_close(guided(x, s, y=y), gm.denoise(x, s, y), rtol=1e-8, atol=1e-8)
    # scale 2 moves further along the classifier gradient than the conditional
    far = classifier(lambda x, sigma, y: gm.denoise(x, sigma), gm.class_log_prob, scale=2.0)(x, s, y=y)
    torch.testing.assert_close(far - gm.denoise(x, s), 2 * (gm.denoise(x, s, y) - gm.denoise(x, s)), rtol=1e-8, atol=1e-8)


def test_guided_sampling_lands_in_the_right_class():
    gm, _, _, _ = setup()
    y = torch.arange(200) % 2
    out = uf.sample(classifier_free(null_aware(gm), 1.0, {"y": -torch.ones_like(y)}), noise(200, 2), "dpmpp_2m",
                    nfe=30, cond={"y": y})
    # the exact classifier at sigma ~ 0 agrees with the requested label for nearly every sample
    acc = (gm.class_log_prob(out, torch.full((200,), 1e-3), y).exp() > 0.5).double().mean()
    assert acc > 0.97
