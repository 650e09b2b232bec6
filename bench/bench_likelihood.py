"""Times the bits/dim of one batch (probability-flow ODE) with both ODE backends, and projects the test set.

For each model and backend ('scipy': Score SDE's solve_ivp on the CPU; 'torch': torchdiffeq on the model's
device; see ode_backends.py), at the same tolerance, with the same data and Hutchinson probe: seconds per
batch, the number of function evaluations (NFE), seconds per evaluation, the bits/dim difference to the scipy
backend, and the time projected for the CIFAR-10 test set (10,000 images, per pass and for `--passes` passes,
the FP configs' eval.bpd_num_repeats) on this device.

On CUDA (default there): the CIFAR-10 NCSN++ VE (configs/ve/cifar10_ncsnpp_continuous.py) and DDPM++ VP
(configs/vp/cifar10_ddpmpp_continuous.py) at batch 128. On CPU (default without CUDA): the same configs shrunk
by `--tiny` (nf 16, channel multipliers (1, 2), one residual block, 16x16 images, batch 8). Weights are
random: Score SDE's initialization plus noise of std `--weight_noise` on every parameter. Score SDE
zero-initializes its output layers (init_scale = 0), which makes the score about 1e-5 / std(t) and the flow
trivial (about 26 evaluations); with the noise, std(t) * score has an RMS of 0.3 (tiny) to 1.2 (full size),
the scale of a trained model's. Random networks are still not trained ones: their NFE at a given tolerance
differs from a trained model's, so compare the backends by seconds per evaluation as well as per batch, and
scale the projection by a trained model's NFE where known.

Usage:
  python bench/bench_likelihood.py                                   # CUDA: full models, batch 128
  python bench/bench_likelihood.py --threads 2                       # CPU: tiny NCSN++, batch 8
  python bench/bench_likelihood.py --device cpu --tiny --batch 2 --rtol 1e-2 --atol 1e-2   # seconds
"""

import argparse
import logging
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
import likelihood  # noqa: E402
import ode_backends  # noqa: E402
import sde_lib  # noqa: E402
from configs.ve import cifar10_ncsnpp_continuous  # noqa: E402
from configs.vp import cifar10_ddpmpp_continuous  # noqa: E402
from models import utils as mutils  # noqa: E402

CONFIGS = {
    've_ncsnpp': cifar10_ncsnpp_continuous.get_config,
    'vp_ddpmpp': cifar10_ddpmpp_continuous.get_config,
}
TEST_SET_IMAGES = 10000  # CIFAR-10's test split


def build(name, args, device):
  """The config, the model with random weights (see the module docstring), its SDE and the data scalers."""
  config = CONFIGS[name]()
  config.device = device
  if args.tiny:
    config.model.nf = 16
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.data.image_size = 16
    config.model.attn_resolutions = (8,)
  torch.manual_seed(args.seed)
  model = mutils.create_model(config)
  model.eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(args.weight_noise * torch.randn_like(p))
  return config, model, sde_lib.sde_from_config(config)


def time_backend(config, model, sde, backend, args, device):
  """Seconds, NFE and bits/dim of one batch: uniform 8-bit-like data in [0, 1], the config's scaling."""
  shape = (args.batch, config.data.num_channels, config.data.image_size, config.data.image_size)
  generator = torch.Generator().manual_seed(args.seed)
  data = datasets.get_data_scaler(config)(torch.rand(shape, generator=generator)).to(device)
  fn = likelihood.get_likelihood_fn(sde, datasets.get_data_inverse_scaler(config), rtol=args.rtol,
                                    atol=args.atol, eps=args.eps, backend=backend)
  torch.manual_seed(args.seed)  # the same Rademacher probe for every backend
  _sync(device)
  start = time.perf_counter()
  bpd, _, nfe = fn(model, data)
  _sync(device)
  return time.perf_counter() - start, nfe, bpd.double().cpu()


def warm_up(config, model, sde, args, device):
  """One forward and backward pass, so that no backend pays for first-call set-up (allocator, cuDNN)."""
  shape = (args.batch, config.data.num_channels, config.data.image_size, config.data.image_size)
  x = torch.rand(shape, device=device).requires_grad_(True)
  score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
  torch.autograd.grad(score_fn(x, torch.full((args.batch,), 0.5, device=device)).sum(), x)
  _sync(device)


def _sync(device):
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default=None,
                      help=f'comma-separated subset of {list(CONFIGS)} (default: both on CUDA, ve_ncsnpp on CPU)')
  parser.add_argument('--backends', default=','.join(ode_backends.BACKENDS))
  parser.add_argument('--device', default=None, help='default: cuda if available, else cpu')
  parser.add_argument('--tiny', action='store_true', default=None, help='shrunk models (default on CPU)')
  parser.add_argument('--full', dest='tiny', action='store_false', help='full-size models (default on CUDA)')
  parser.add_argument('--batch', type=int, default=None, help='default: 128 on CUDA, 8 on CPU')
  parser.add_argument('--rtol', type=float, default=1e-5, help="Score SDE's default")
  parser.add_argument('--atol', type=float, default=1e-5, help="Score SDE's default")
  parser.add_argument('--eps', type=float, default=1e-5, help="Score SDE's default")
  parser.add_argument('--passes', type=int, default=5, help='passes over the test set for the projection')
  parser.add_argument('--weight_noise', type=float, default=0.05)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  if args.threads:
    torch.set_num_threads(args.threads)
  device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
  on_gpu = device.type == 'cuda'
  args.tiny = (not on_gpu) if args.tiny is None else args.tiny
  args.batch = args.batch or (128 if on_gpu else 8)
  models = (args.models or ('ve_ncsnpp,vp_ddpmpp' if on_gpu else 've_ncsnpp')).split(',')
  backends = args.backends.split(',')
  for name, allowed in ((models, CONFIGS), (backends, ode_backends.BACKENDS)):
    unknown = sorted(set(name) - set(allowed))
    if unknown:
      parser.error(f'unknown {unknown}; choose from {list(allowed)}')
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  print(f'device: {torch.cuda.get_device_name(device) if on_gpu else "CPU"}, torch {torch.__version__}, '
        f'threads {torch.get_num_threads()}, load average {load:.2f}, batch {args.batch}, '
        f'{"tiny" if args.tiny else "full-size"} models, rtol {args.rtol:g}, atol {args.atol:g}, eps {args.eps:g}')
  print(f'| model | backend | NFE | s / batch | ms / NFE | vs scipy (s / batch) | max abs bpd diff to scipy | '
        f'mean bpd | test set, 1 pass (h) | test set, {args.passes} passes (h) |')
  print('| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  for name in models:
    config, model, sde = build(name, args, device)
    warm_up(config, model, sde, args, device)
    reference = None
    for backend in backends:
      seconds, nfe, bpd = time_backend(config, model, sde, backend, args, device)
      if backend == 'scipy':
        reference = (seconds, bpd)
      ratio = f'{seconds / reference[0]:.2f}x' if reference else '-'
      diff = f'{float((bpd - reference[1]).abs().max()):.2g}' if reference else '-'
      per_pass = seconds * TEST_SET_IMAGES / args.batch / 3600
      print(f'| {name} | {backend} | {nfe} | {seconds:.2f} | {1000 * seconds / nfe:.1f} | {ratio} | {diff} | '
            f'{float(bpd.mean()):.4f} | {per_pass:.3g} | {per_pass * args.passes:.3g} |', flush=True)
    del model
    if on_gpu:
      torch.cuda.empty_cache()
  print(f'Projection: s / batch x {TEST_SET_IMAGES} / {args.batch} batches, at the NFE measured here'
        f'{" (a tiny model: not CIFAR-10 size)" if args.tiny else ""}.')


if __name__ == '__main__':
  main()
