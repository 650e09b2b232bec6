"""Inpainting, colorization and class-conditional sampling against exact answers.

For Gaussian data with independent coordinates, the conditional law of the unknown coordinates given the known
ones is their marginal, so an inpainter driven by the exact score must keep the known pixels and sample the
others from N(mu, s0^2). Colorization is inpainting after the orthonormal `decouple` map; with isotropic
per-pixel data the two color channels of the decoupled space are again independent of the gray one. For a
two-component Gaussian mixture the noisy classifier p_t(y | x) is exact, and classifier guidance must sample
the chosen component.
"""

import math

import pytest
import torch

import controllable_generation as cg
import sampling
from helpers import ExactScoreModel, GaussianData, make_sde

IDENTITY = lambda v: v


@pytest.mark.parametrize('kind', ['ve', 'vp'])
def test_inpainter_keeps_known_pixels_and_samples_the_rest(kind):
  torch.manual_seed(0)
  sde = make_sde(kind, N=100)
  shape = (1, 2, 2)
  mu = torch.tensor([1.0, -0.5, 0.3, 2.0]).reshape(shape)
  s0 = torch.tensor([0.5, 0.8, 0.6, 0.4]).reshape(shape)
  data = GaussianData(mu, s0)
  B = 4000
  images = data.sample(B).float()
  mask = torch.zeros((B,) + shape)
  mask[:, :, 0, :] = 1.  # the top row is known
  eps = sde.sampling_eps
  inpainter = cg.get_pc_inpainter(sde, sampling.ReverseDiffusionPredictor, sampling.LangevinCorrector,
                                  IDENTITY, snr=0.16, continuous=True, eps=eps)
  out = inpainter(ExactScoreModel(sde, data), images, mask)
  assert out.shape == images.shape and torch.isfinite(out).all()
  # Known pixels: the denoised output is the perturbation kernel's mean at eps, a(eps) * data (= data for VE).
  kernel_mean = sde.marginal_prob(images, torch.full((B,), eps))[0]
  assert torch.equal(out[:, :, 0, :], kernel_mean[:, :, 0, :])
  if kind == 've':
    assert torch.equal(out[:, :, 0, :], images[:, :, 0, :])
  # Unknown pixels: N(mu, s0^2) (plus the tiny std at eps), within sampling and 100-step discretization error.
  unknown = out[:, :, 1, :].double()
  m, v = data.marginal(sde, torch.full((1,), eps, dtype=torch.float64))
  assert torch.all((unknown.mean(0) - m[0, :, 1, :]).abs() < 0.05)
  assert torch.all((unknown.var(0) / v[0, :, 1, :] - 1).abs() < 0.12)
  # The known pixels did not leak into the unknown ones (independent coordinates).
  corr = torch.corrcoef(torch.stack([unknown[:, 0, 0], images[:, 0, 0, 0].double()]))[0, 1]
  assert abs(float(corr)) < 5 / math.sqrt(B)


def test_decouple_is_orthonormal_and_couple_inverts_it():
  x = torch.randn(3, 3, 2, 2, dtype=torch.float64)
  y = cg.decouple(x)
  assert torch.allclose(cg.couple(y), x)
  assert torch.allclose((y ** 2).sum(1), (x ** 2).sum(1), atol=1e-6)  # norm-preserving per pixel
  gray = x.mean(1, keepdim=True).expand(-1, 3, -1, -1)
  assert torch.allclose(cg.decouple(gray)[:, 1:], torch.zeros(3, 2, 2, 2, dtype=torch.float64), atol=1e-6)


def test_colorizer_keeps_the_gray_channel_and_samples_the_colors():
  torch.manual_seed(1)
  sde = make_sde('ve', N=100)
  shape = (3, 1, 2)
  # Isotropic per pixel: decoupled channels stay independent with the same std.
  mu = torch.tensor([[0.8, -0.2], [0.1, 0.5], [-0.6, 0.3]]).reshape(shape)
  s0 = torch.tensor([0.5, 0.7]).reshape(1, 1, 2).expand(shape)
  data = GaussianData(mu, s0)
  B = 4000
  images = data.sample(B).float()
  gray = images.mean(1, keepdim=True).expand(-1, 3, -1, -1).contiguous()
  eps = sde.sampling_eps
  colorizer = cg.get_pc_colorizer(sde, sampling.ReverseDiffusionPredictor, sampling.LangevinCorrector,
                                  IDENTITY, snr=0.16, continuous=True, eps=eps)
  out = colorizer(ExactScoreModel(sde, data), gray)
  assert out.shape == gray.shape and torch.isfinite(out).all()
  # The gray channel of the decoupled output is the gray image's (VE: mean coefficient 1).
  assert torch.allclose(cg.decouple(out)[:, 0], cg.decouple(gray)[:, 0], atol=1e-5)
  # The color channels are N(decouple(mu)[1:], s0^2).
  colors = cg.decouple(out.double())[:, 1:]
  target_mean = cg.decouple(mu[None].double())[0, 1:]
  assert torch.all((colors.mean(0) - target_mean).abs() < 0.05)
  assert torch.all((colors.var(0) / s0[1:].double() ** 2 - 1).abs() < 0.12)
  with pytest.raises(ValueError, match='3, H, W'):
    colorizer(ExactScoreModel(sde, data), torch.zeros(2, 1, 2, 2))


class MixtureData:
  """Two equally likely components N(+mu, s^2 I) and N(-mu, s^2 I), and their exact noisy marginals."""

  def __init__(self, mu, s):
    self.mu = torch.as_tensor(mu, dtype=torch.float64)
    self.s = s

  def component_logps(self, x, a, sigma):
    """log N(x; +/- a mu, (a^2 s^2 + sigma^2) I) up to a shared constant, shape (B, 2)."""
    v = (a ** 2 * self.s ** 2 + sigma ** 2).reshape(-1)
    logps = [-((x.double() - sign * a * self.mu) ** 2).sum(-1) / (2 * v) for sign in (1., -1.)]
    return torch.stack(logps, -1)

  def score(self, sde, x, t):
    mean, sigma = sde.marginal_prob(torch.ones_like(x, dtype=torch.float64), t.double())
    a, sigma = mean[:, :1], sigma[:, None].double()
    w = torch.softmax(self.component_logps(x, a, sigma), -1)
    v = a ** 2 * self.s ** 2 + sigma ** 2
    comp = torch.stack([-(x.double() - sign * a * self.mu) / v for sign in (1., -1.)], 1)
    return (w[..., None] * comp).sum(1).to(x.dtype)


def test_conditional_sampler_with_exact_noisy_classifier():
  torch.manual_seed(2)
  sde = make_sde('ve', N=100)
  data = MixtureData([1.5, 1.0], 0.5)
  seen_scales = []

  def classifier(x, noise_scale):
    # VE: p_t(y | x) from the perturbed components, given the noise scale sigma(t) (mean coefficient 1).
    seen_scales.append(noise_scale)
    return data.component_logps(x, 1., noise_scale[:, None].double())

  B = 4000
  sampler = cg.get_pc_conditional_sampler(sde, classifier, (B, 2), sampling.ReverseDiffusionPredictor,
                                          sampling.LangevinCorrector, IDENTITY, snr=0.16, continuous=True,
                                          eps=sde.sampling_eps, device='cpu')
  labels = torch.cat([torch.zeros(B // 2), torch.ones(B // 2)]).long()
  x = sampler(ExactScoreModel(sde, data), labels).double()
  assert x.shape == (B, 2)
  for label, sign in ((0, 1.), (1, -1.)):
    xs = x[labels == label]
    assert torch.all((xs.mean(0) - sign * data.mu).abs() < 0.05)
    assert torch.all((xs.var(0) / data.s ** 2 - 1).abs() < 0.15)
  # The classifier is conditioned on the kernel's std at t.
  assert torch.allclose(seen_scales[0].double(), torch.full((B,), sde.sigma_max, dtype=torch.float64))


def test_classifier_grad_fn_matches_softmax_formula():
  torch.manual_seed(3)
  W = torch.randn(4, 6, dtype=torch.float64)
  classifier = lambda x, s: x.reshape(x.shape[0], -1) @ W.T * s[:, None]
  x = torch.randn(5, 2, 3, dtype=torch.float64)
  s = torch.rand(5, dtype=torch.float64)
  labels = torch.tensor([0, 3, 1, 2, 3])
  p = torch.softmax(classifier(x, s), -1)
  expected = (s[:, None] * (W[labels] - p @ W)).reshape(x.shape)
  assert torch.allclose(cg.get_classifier_grad_fn(classifier)(x, s, labels), expected)


def test_labels_must_match_the_batch():
  W = torch.randn(3, 2)
  classifier = lambda x, s: x @ W.T  # noqa: E731
  grad_fn = cg.get_classifier_grad_fn(classifier)
  x, s = torch.randn(4, 2), torch.ones(4)
  with pytest.raises(ValueError, match=r'labels have shape \(1,\); expected \(4, num_classes\) and \(4,\)'):
    grad_fn(x, s, torch.tensor([1]))
  sde = make_sde('ve', N=3)
  sampler = cg.get_pc_conditional_sampler(sde, classifier, (4, 2), sampling.ReverseDiffusionPredictor, None,
                                          IDENTITY, 0.16, continuous=True, device='cpu')
  with pytest.raises(ValueError, match=r'labels have shape \(2,\); expected \(4,\)'):
    sampler(ExactScoreModel(sde, GaussianData([0., 0.], [1., 1.])), torch.tensor([0, 1]))


def test_controllable_samplers_refuse_eps_outside_0_T():
  sde = make_sde('ve')
  for build in (lambda: cg.get_pc_inpainter(sde, None, None, IDENTITY, 0.16, eps=2.),
                lambda: cg.get_pc_colorizer(sde, None, None, IDENTITY, 0.16, eps=2.),
                lambda: cg.get_pc_conditional_sampler(sde, None, (2, 2), None, None, IDENTITY, 0.16, eps=2.)):
    with pytest.raises(ValueError, match=r'eps=2.0: .*\(0, T=1\)'):
      build()
