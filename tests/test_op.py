"""op/: upfirdn2d against the per-channel formulation and exact resampling identities; gradients of
upfirdn2d and fused_leaky_relu checked to second order (gradcheck / gradgradcheck, float64)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from models import up_or_down_sampling as uds
from op import FusedLeakyReLU, fused_bias_act, fused_leaky_relu, upfirdn2d
from op.upfirdn2d import upfirdn2d_per_channel


def test_upfirdn2d_matches_per_channel_formulation():
  gen = torch.Generator().manual_seed(0)
  checked = 0
  for up, down, p0, p1, kh, kw in itertools.product([1, 2, 3], [1, 2], [-1, 2], [0, 1], [1, 4], [2, 3]):
    x = torch.randn(2, 3, 5, 6, generator=gen, dtype=torch.float64)
    k = torch.randn(kh, kw, generator=gen, dtype=torch.float64)  # asymmetric: catches a missing flip
    if 5 * up + p0 + p1 < kh:
      continue  # empty output
    expected = upfirdn2d_per_channel(x, k, up=up, down=down, pad=(p0, p1))
    out = upfirdn2d(x, k, up=up, down=down, pad=(p0, p1))
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    checked += 1
  assert checked > 80


def test_upfirdn2d_hand_computed():
  # 1-D along the width: up=2 inserts a zero after each sample; the FIR [1, 2] is a true convolution.
  x = torch.tensor([[[[1., 2., 3.]]]], dtype=torch.float64)
  k = torch.tensor([[1., 2.]], dtype=torch.float64)
  out = upfirdn2d(x, k, up=1, pad=(0, 0))
  # k is 1x2 but pad applies to both dims: height 1 - 1 + 1 = 1 row.
  torch.testing.assert_close(out, torch.tensor([[[[1 * 2 + 2 * 1, 2 * 2 + 3 * 1]]]], dtype=torch.float64))
  k2 = torch.tensor([[1.]], dtype=torch.float64)
  out = upfirdn2d(x, k2, up=2)
  assert out.shape == (1, 1, 2, 6)
  torch.testing.assert_close(out[0, 0, 0], torch.tensor([1., 0., 2., 0., 3., 0.], dtype=torch.float64))
  assert torch.all(out[0, 0, 1] == 0)
  out = upfirdn2d(torch.arange(16.).reshape(1, 1, 4, 4), torch.ones(1, 1), down=2)
  torch.testing.assert_close(out, torch.tensor([[[[0., 2.], [8., 10.]]]]))


def test_box_filter_resampling_is_nearest_and_average_pooling():
  x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
  torch.testing.assert_close(uds.upsample_2d(x, [1, 1]), uds.naive_upsample_2d(x))
  torch.testing.assert_close(uds.downsample_2d(x, [1, 1]), uds.naive_downsample_2d(x))
  torch.testing.assert_close(uds.downsample_2d(x, [1, 1]), F.avg_pool2d(x, 2))
  # The FIR kernel is normalized: constants stay constant away from the border.
  ones = torch.ones(1, 2, 8, 8, dtype=torch.float64)
  torch.testing.assert_close(uds.upsample_2d(ones, (1, 3, 3, 1))[..., 2:-2, 2:-2],
                             torch.ones(1, 2, 12, 12, dtype=torch.float64))
  torch.testing.assert_close(uds.downsample_2d(ones, (1, 3, 3, 1))[..., 1:-1, 1:-1],
                             torch.ones(1, 2, 2, 2, dtype=torch.float64))


@pytest.mark.parametrize('k', [(1, 3, 3, 1), (1, 2, 1)])
def test_fused_conv_resampling_equals_unfused_in_the_interior(k):
  # The fused ops only differ from "resample then conv" (or "conv then resample") in where the zero
  # padding enters, i.e. at the border. An asymmetric conv weight catches a wrong flip.
  gen = torch.Generator().manual_seed(1)
  x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
  w = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
  up = uds.upsample_conv_2d(x, w, k)
  assert up.shape == (2, 5, 16, 16)
  torch.testing.assert_close(up[..., 2:-2, 2:-2], F.conv2d(uds.upsample_2d(x, k), w, padding=1)[..., 2:-2, 2:-2])
  down = uds.conv_downsample_2d(x, w, k)
  assert down.shape == (2, 5, 4, 4)
  torch.testing.assert_close(down[..., 1:-1, 1:-1],
                             uds.downsample_2d(F.conv2d(x, w, padding=1), k)[..., 1:-1, 1:-1])
  # The Conv2d layer with fused resampling uses the same ops.
  layer = uds.Conv2d(4, 5, 3, up=True, resample_kernel=k).double()
  with torch.no_grad():
    layer.weight.copy_(w)
    layer.bias.fill_(0.5)
  torch.testing.assert_close(layer(x), up + 0.5)


FIR = uds.setup_kernel((1, 3, 3, 1))


@pytest.mark.parametrize('up,down,pad', [(2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (1, 2)), (1, 1, (-1, 2))])
def test_upfirdn2d_gradcheck_and_gradgradcheck(up, down, pad):
  gen = torch.Generator().manual_seed(2)
  x = torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
  k = torch.tensor(FIR, dtype=torch.float64) + 0.1 * torch.randn(4, 4, generator=gen, dtype=torch.float64)
  k.requires_grad_(True)

  def fn(x, k):
    return upfirdn2d(x, k, up=up, down=down, pad=pad)

  assert gradcheck(fn, (x, k))
  # fast_mode checks random projections of the second-order Jacobian (the full one is slow on 2 cores).
  assert gradgradcheck(fn, (x, k), fast_mode=True)


def test_upfirdn2d_third_order():
  # d^3/dx^3 of sum(upfirdn2d(x)^3 * r) is 6 * (A^T (r) ...): compare the third derivative along a
  # direction v (three nested grads) with the closed form 6 * sum(r * (A v)^3), since f(x) = sum(r (Ax)^3).
  gen = torch.Generator().manual_seed(3)
  x = torch.randn(1, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
  v = torch.randn(1, 2, 4, 4, generator=gen, dtype=torch.float64)
  k = torch.tensor(FIR, dtype=torch.float64)
  r = torch.randn(1, 2, 8, 8, generator=gen, dtype=torch.float64)

  def A(z):
    return upfirdn2d(z, k, up=2, pad=(2, 1))

  f = (r * A(x) ** 3).sum()
  g1 = torch.autograd.grad(f, x, create_graph=True)[0]
  g2 = torch.autograd.grad((g1 * v).sum(), x, create_graph=True)[0]
  g3 = torch.autograd.grad((g2 * v).sum(), x)[0]
  torch.testing.assert_close((g3 * v).sum(), 6 * (r * A(v) ** 3).sum())


def test_fused_leaky_relu_values_and_module():
  x = torch.randn(2, 3, 4, 4)
  b = torch.randn(3)
  expected = torch.where(x + b[:, None, None] >= 0, x + b[:, None, None], 0.2 * (x + b[:, None, None])) * 2 ** 0.5
  torch.testing.assert_close(fused_leaky_relu(x, b), expected)
  torch.testing.assert_close(fused_bias_act(x, b), expected)
  torch.testing.assert_close(fused_bias_act(x, b, act='linear'), x + b[:, None, None])
  layer = FusedLeakyReLU(3)
  with torch.no_grad():
    layer.bias.copy_(b)
  torch.testing.assert_close(layer(x), expected)
  assert [n for n, _ in layer.named_parameters()] == ['bias']
  with pytest.raises(ValueError, match='bias of shape'):
    fused_leaky_relu(x, torch.zeros(4))
  with pytest.raises(ValueError, match="act='tanh'"):
    fused_bias_act(x, b, act='tanh')


def test_fused_leaky_relu_gradcheck_and_gradgradcheck():
  gen = torch.Generator().manual_seed(4)
  # Stay away from the kink at 0, where finite differences are meaningless.
  x = torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64)
  x = (x + 0.2 * torch.sign(x)).requires_grad_(True)
  b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
  assert gradcheck(fused_leaky_relu, (x, b))
  assert gradgradcheck(fused_leaky_relu, (x, b))


def test_upfirdn2d_bad_input():
  with pytest.raises(ValueError, match='pad'):
    upfirdn2d(torch.zeros(1, 1, 4, 4), torch.ones(2, 2), pad=(1, 2, 3))
  with pytest.raises(ValueError, match='up and down'):
    upfirdn2d(torch.zeros(1, 1, 4, 4), torch.ones(2, 2), up=0)
  with pytest.raises(ValueError, match='shape'):
    upfirdn2d(torch.zeros(4, 4), torch.ones(2, 2))
