"""Checks shared by the likelihood and ODE sampler tests: a smooth tiny NCSN++, a model that fails at a known
time, and the wrappers that check the torch solve stays on the device and keeps no graph."""

import contextlib
import weakref

import torch

from helpers import ExactScoreModel, label_to_time, tiny_ncsnpp_config


def smooth_tiny_ncsnpp():
  """The tiny VE NCSN++ of `helpers.tiny_ncsnpp_with_sde` with Fourier features of scale 1 instead of 16.

  With scale 16 the random network oscillates in t, so its flow needs hundreds of steps even at rtol 1e-3 and
  solutions converge slowly with the tolerance (0.04 bits/dim apart at 1e-3 and 1e-4); with scale 1 it is as
  smooth in t as a trained model's, and about 100 evaluations reach 1e-3.
  """
  import datasets
  import sde_lib
  from models import utils as mutils
  config = tiny_ncsnpp_config('vesde', True, image_size=8, num_channels=3, num_scales=25, sigma_max=5,
                              fourier_scale=1)
  config.data.centered = True
  torch.manual_seed(0)
  net = mutils.create_model(config)
  with torch.no_grad():
    for p in net.parameters():
      p.add_(0.05 * torch.randn_like(p))  # Score SDE zero-initializes the output layers
  return net, sde_lib.sde_from_config(config), datasets.get_data_inverse_scaler(config)


@contextlib.contextmanager
def no_host_copies(monkeypatch):
  """Makes every numpy conversion and copy to the host raise, as leaving a GPU would cost.

  `Tensor.tolist` stays allowed: torchdiffeq reads its (one-element) grid of step times once, before the first
  step, not the state.
  """

  def refuse(name):
    def fn(*args, **kwargs):
      raise AssertionError(f'{name} called in the solve')
    return fn

  with monkeypatch.context() as m:
    for name in ('numpy', '__array__', 'cpu', 'item'):
      m.setattr(torch.Tensor, name, refuse(f'Tensor.{name}'))
    m.setattr(torch, 'from_numpy', refuse('torch.from_numpy'))
    yield


class DeviceCheckingModel(torch.nn.Module):
  """Checks that the model only ever gets tensors on the data's device and in its dtype."""

  def __init__(self, model, device, dtype):
    super().__init__()
    self.model, self.device, self.dtype = model, torch.device(device), dtype
    self.calls = 0

  def forward(self, x, labels):
    for v in (x, labels):
      assert type(v) is torch.Tensor and v.device == self.device and v.dtype == self.dtype
    self.calls += 1
    return self.model(x, labels)


@contextlib.contextmanager
def count_live_saved_tensors(counts):
  """Records, at each call of `record()`, how many tensors autograd has saved for a backward and still holds."""
  live = weakref.WeakSet()

  class Saved:
    def __init__(self, t):
      self.t = t

  def pack(t):
    s = Saved(t)
    live.add(s)
    return s

  with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s.t):
    yield lambda: counts.append(len(live))


class RecordingModel(torch.nn.Module):
  """Calls `record()` before every evaluation of `model`."""

  def __init__(self, model, record):
    super().__init__()
    self.model, self.record = model, record

  def forward(self, x, labels):
    self.record()
    return self.model(x, labels)


class NaNAfter(ExactScoreModel):
  """The exact score, but NaN for t above `t_bad` (`above=True`) or below it (`above=False`)."""

  def __init__(self, sde, data, t_bad, above):
    super().__init__(sde, data)
    self.t_bad, self.above = t_bad, above

  def forward(self, x, labels):
    out = super().forward(x, labels)
    t = label_to_time(self.sde, labels, True).to(x.dtype)
    bad = t > self.t_bad if self.above else t < self.t_bad
    return torch.where(bad.reshape(-1, *([1] * (x.dim() - 1))), torch.full_like(out, float('nan')), out)
