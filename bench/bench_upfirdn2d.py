"""Times `op.upfirdn2d` (grouped conv formulation) against the per-channel formulation of Score SDE's native
fallback, forward and forward+backward, at CIFAR-like shapes, on CPU (and CUDA when present).

Usage: python bench/bench_upfirdn2d.py [--repeats 20] [--threads 2]
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from op.upfirdn2d import upfirdn2d, upfirdn2d_per_channel  # noqa: E402

# NCSN++'s FIR kernel (1, 3, 3, 1), normalized as up_or_down_sampling.setup_kernel does.
_K1 = torch.tensor([1., 3., 3., 1.])
FIR = torch.outer(_K1, _K1) / 64.

# (name, up, down, pad): upsample_2d and downsample_2d with the 4-tap FIR, as NCSN++ calls them.
OPS = (('up2', 2, 1, (2, 1)), ('down2', 1, 2, (1, 1)))
SHAPES = ((8, 128, 32, 32), (16, 128, 32, 32), (8, 256, 16, 16), (16, 256, 16, 16))


def _time(fn, device, repeats):
  fn()  # warm-up
  if device.type == 'cuda':
    torch.cuda.synchronize()
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  if device.type == 'cuda':
    torch.cuda.synchronize()
  return (time.perf_counter() - start) / repeats


def bench(device, repeats):
  """Returns table rows (op, shape, mode, ms per-channel, ms grouped, speed-up)."""
  rows = []
  k = FIR.to(device)
  for name, up, down, pad in OPS:
    for shape in SHAPES:
      x = torch.randn(*shape, device=device, requires_grad=True)
      for mode in ('fwd', 'fwd+bwd'):
        times = []
        for impl in (upfirdn2d_per_channel, upfirdn2d):
          if mode == 'fwd':
            def fn(impl=impl):
              with torch.no_grad():
                impl(x, k, up=up, down=down, pad=pad)
          else:
            def fn(impl=impl):
              impl(x, k, up=up, down=down, pad=pad).square().sum().backward()
          times.append(_time(fn, device, repeats) * 1e3)
        rows.append((name, 'x'.join(map(str, shape)), mode, times[0], times[1], times[0] / times[1]))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--threads', type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  devices = [torch.device('cpu')] + ([torch.device('cuda')] if torch.cuda.is_available() else [])
  for device in devices:
    print(f'\n{device.type} (torch {torch.__version__}, {torch.get_num_threads()} threads)')
    print('| op | shape (NxCxHxW) | pass | per-channel (ms) | grouped (ms) | speed-up |')
    print('| --- | --- | --- | ---: | ---: | ---: |')
    for op, shape, mode, t_ref, t_new, ratio in bench(device, args.repeats):
      print(f'| {op} | {shape} | {mode} | {t_ref:.2f} | {t_new:.2f} | {ratio:.2f}x |')


if __name__ == '__main__':
  main()
