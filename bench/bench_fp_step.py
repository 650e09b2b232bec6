"""Times the training step, DSM only vs DSM + the score-FPE term, every step or lazily; reports peak GPU memory.

Benchmarks NCSN++ VE (configs/ve/cifar10_ncsnpp_continuous.py) and DDPM++ VP
(configs/vp/cifar10_ddpmpp_continuous.py) at batch 48, random init, with the paper's FP setting
(scalar_fp 'both', alpha 0.15, beta 0.01, finite difference, one Gaussian Hutchinson probe), the FP term on
the whole batch and on a quarter of it, and the exact (forward-mode AD) time derivative; each FP variant for
every `--fp_every` (lazy regularization, `training.fp_every`: the FP terms on one step in k). The step is
`trainer.Trainer.train_step` with Score SDE's numerics (float32, one process, the global generator), so a
row with fp_every = k reports the amortized time per step: the median over cycles of k steps (one FP step,
k - 1 DSM-only steps) of the cycle's time / k. On a machine without CUDA, `--batch`, `--nf` and
`--num_res_blocks` shrink the problem so it runs in reasonable time.

Usage:
  python bench/bench_fp_step.py                        # full size on CUDA
  python bench/bench_fp_step.py --batch 4 --nf 32 --num_res_blocks 1 --steps 3 --profile
  python bench/bench_fp_step.py --variants 'dsm,dsm+fp,dsm+fp (1/4 batch)' --fp_every 1,2,4,8
"""

import argparse
import copy
import gc
import logging
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losses  # noqa: E402
import score_fpe  # noqa: E402
import sde_lib  # noqa: E402
import trainer as trainer_lib  # noqa: E402
from configs.ve import cifar10_ncsnpp_continuous  # noqa: E402
from configs.vp import cifar10_ddpmpp_continuous  # noqa: E402
from models import utils as mutils  # noqa: E402
from models.ema import ExponentialMovingAverage  # noqa: E402

CONFIGS = {
    've_ncsnpp': cifar10_ncsnpp_continuous.get_config,
    'vp_ddpmpp': cifar10_ddpmpp_continuous.get_config,
}

PAPER_FP = dict(scalar_fp='both', fp_wgt_type='ll', alpha=0.15, beta=0.01, m=2, fp_dist='pert')
VARIANTS = {
    'dsm': dict(alpha=0., beta=0.),
    'dsm+fp': dict(PAPER_FP),
    'dsm+fp (1/4 batch)': dict(PAPER_FP, fp_batch_fraction=0.25),
    'dsm+fp (forward AD)': dict(PAPER_FP, fp_time_derivative='forward_ad'),
}


def build(name, args, device):
  config = CONFIGS[name]()
  config.device = device
  config.training.batch_size = args.batch
  config.training.likelihood_weighting = True
  if args.nf is not None:
    config.model.nf = args.nf
  if args.num_res_blocks is not None:
    config.model.num_res_blocks = args.num_res_blocks
  # The reference weights stay on the CPU, so that they do not count in any variant's peak GPU memory.
  model = mutils.create_model(config).cpu()
  return config, model


def time_variant(config, model, variant, fp_every, args, device):
  """Amortized wall time of a training step (median over cycles of `fp_every` steps of the cycle's time /
  `fp_every`), the peak GPU memory (GiB; None on CPU) and the last step's terms.

  Each cycle starts at a step that is a multiple of `fp_every`: one FP step, then `fp_every - 1` DSM-only
  steps. `--warmup` cycles are not timed; `--steps` steps at least are (whole cycles). Everything the variant
  allocates is local, so it is freed before the next variant is measured. With `--profile`, one more DSM + FP
  step is profiled.
  """
  sde = sde_lib.sde_from_config(config)
  model = copy.deepcopy(model).to(device)
  optimizer = losses.get_optimizer(config, model.parameters())
  state = dict(model=model, optimizer=optimizer, ema=ExponentialMovingAverage(model.parameters(), decay=0.999),
               step=0)
  training = config.training
  regularizer = score_fpe.ScoreFPERegularizer.from_options(sde, continuous=True, **VARIANTS[variant])
  loss = losses.build_loss(sde, training.reduce_mean, True, True, (regularizer,))
  # noise_seed None: the noise from torch's global generator, as Score SDE's step (`losses.get_step_fn`).
  trainer = trainer_lib.Trainer(loss, losses.optimization_manager(config), fp_every=fp_every)
  shape = (args.batch, config.data.num_channels, config.data.image_size, config.data.image_size)
  batch = torch.rand(shape, device=device) * 2 - 1
  times = []
  if device.type == 'cuda':
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
  for i in range(args.warmup + math.ceil(args.steps / fp_every)):
    start = time.perf_counter()
    for _ in range(fp_every):
      terms = trainer.train_step(state, batch)
    if device.type == 'cuda':
      torch.cuda.synchronize()
    if i >= args.warmup:
      times.append((time.perf_counter() - start) / fp_every)
  peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None
  if args.profile and variant == 'dsm+fp' and fp_every == 1:
    profile(trainer.train_step, state, batch, device, args.profile_rows)
  return statistics.median(times), peak, {k: float(v) for k, v in terms.items()}


def profile(step_fn, state, batch, device, rows):
  activities = [torch.profiler.ProfilerActivity.CPU]
  sort = 'self_cpu_time_total'
  if device.type == 'cuda':
    activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort = 'self_cuda_time_total'
  with torch.profiler.profile(activities=activities) as prof:
    step_fn(state, batch)
    if device.type == 'cuda':
      torch.cuda.synchronize()
  print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default=','.join(CONFIGS), help=f'comma-separated subset of {list(CONFIGS)}')
  parser.add_argument('--variants', default=','.join(VARIANTS), help=f'comma-separated subset of {list(VARIANTS)}')
  parser.add_argument('--batch', type=int, default=48)
  parser.add_argument('--nf', type=int, default=None, help='override model.nf (reduced size on CPU)')
  parser.add_argument('--num_res_blocks', type=int, default=None, help='override model.num_res_blocks')
  parser.add_argument('--fp_every', default='1,2,4,8',
                      help='comma-separated training.fp_every values, each timed for every FP variant')
  parser.add_argument('--steps', type=int, default=10,
                      help='timed steps, at least (whole cycles of fp_every steps; median per cycle reported)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed cycles of fp_every steps first')
  parser.add_argument('--profile', action='store_true', help='profile one DSM+FP step per model')
  parser.add_argument('--profile_rows', type=int, default=15)
  parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  if args.threads:
    torch.set_num_threads(args.threads)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  torch.manual_seed(0)
  variants = args.variants.split(',')
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    parser.error(f'unknown variants {unknown}; choose from {list(VARIANTS)}')
  try:
    intervals = [int(k) for k in args.fp_every.split(',')]
  except ValueError:
    intervals = [0]
  if min(intervals) < 1:
    parser.error(f'--fp_every={args.fp_every!r}: comma-separated integers >= 1 (training.fp_every values)')
  print(f'device: {torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}, '
        f'torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, nf {args.nf}, '
        f'num_res_blocks {args.num_res_blocks}, amortized step: median over cycles of fp_every steps (at least '
        f'{args.steps} steps) after {args.warmup} cycle(s)')
  print('| model | variant | fp_every | step (s) | ratio to DSM | peak GPU memory (GiB) | loss |')
  print('| --- | --- | --- | --- | --- | --- | --- |')
  # DSM first, so every other row has its ratio.
  variants.sort(key=lambda v: v != 'dsm')
  for name in args.models.split(','):
    config, model = build(name, args, device)
    base = None
    for variant in variants:
      # DSM has no FP terms to schedule: one row.
      for fp_every in [1] if variant == 'dsm' else intervals:
        seconds, peak, terms = time_variant(config, model, variant, fp_every, args, device)
        gc.collect()
        if device.type == 'cuda':
          torch.cuda.empty_cache()
        base = seconds if variant == 'dsm' else base
        ratio = f'{seconds / base:.2f}x' if base else '-'
        peak_text = f'{peak:.2f}' if peak is not None else 'n/a (CPU)'
        every = '-' if variant == 'dsm' else fp_every
        print(f'| {name} | {variant} | {every} | {seconds:.3f} | {ratio} | {peak_text} | {terms["loss"]:.4g} |',
              flush=True)


if __name__ == '__main__':
  main()
