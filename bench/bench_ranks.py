"""Wall time of a training step on 1 vs N ranks (torchrun) at the same global batch.

The parent launches `python -m torch.distributed.run --standalone --nproc_per_node=N` on this script for each
rank count, each rank times `trainer.Trainer.train_step` on its share of the global batch (the real step:
per-step noise for the global batch, forward and backward, gradient all-reduce, Adam, EMA), and rank 0 reports
the median. On the CPU each rank gets `--threads_per_rank` threads (torchrun's default is 1), so that N ranks
and one rank with N threads use the same cores; the model is a reduced NCSN++ unless `--full`.

Usage:
  python bench/bench_ranks.py --ranks 1,2 --batch 16 --steps 5                 # CPU, DSM + FP
  python bench/bench_ranks.py --ranks 1,2,4,8 --batch 128 --full --dsm_only    # GPUs, CIFAR-10 NCSN++
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distributed  # noqa: E402
import run_lib  # noqa: E402
import sde_lib  # noqa: E402
from configs.fp import cifar10_ve_ncsnpp_continuous  # noqa: E402


def build_config(args, device):
  """FP-Diffusion's VE NCSN++ fine-tuning config, reduced unless --full."""
  config = cifar10_ve_ncsnpp_continuous.get_config()
  config.device = device
  config.training.batch_size = args.batch
  config.training.grad_accum_steps = args.grad_accum_steps
  if args.dsm_only:
    config.training.alpha = config.training.beta = 0.
  if not args.full:
    config.data.image_size = 16
    model = config.model
    model.nf, model.ch_mult, model.num_res_blocks, model.attn_resolutions = 16, (1, 2), 1, (8,)
  return config


def worker(args):
  """One rank: times the step; rank 0 writes the median to --out."""
  if args.threads_per_rank:
    torch.set_num_threads(args.threads_per_rank)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  ctx = distributed.init_from_env(device)
  try:
    config = build_config(args, ctx.device)
    torch.manual_seed(0)
    sde = sde_lib.sde_from_config(config)
    state = run_lib.build_state(config)
    trainer = run_lib.make_trainer(config, sde, state)
    local = args.batch // ctx.world_size
    batch = torch.rand((local, 3, config.data.image_size, config.data.image_size), device=ctx.device) * 2 - 1
    times = []
    for i in range(args.warmup + args.steps):
      distributed.barrier()
      start = time.perf_counter()
      trainer.train_step(state, batch)
      if ctx.device.type == 'cuda':
        torch.cuda.synchronize()
      if i >= args.warmup:
        times.append(time.perf_counter() - start)
    if ctx.is_main:
      with open(args.out, 'w') as f:
        json.dump({'median': statistics.median(times), 'threads': torch.get_num_threads()}, f)
  finally:
    distributed.shutdown()


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--ranks', default='1,2', help='comma-separated numbers of ranks')
  parser.add_argument('--batch', type=int, default=16, help='global batch')
  parser.add_argument('--grad_accum_steps', type=int, default=1)
  parser.add_argument('--steps', type=int, default=5, help='timed steps (median reported)')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--threads_per_rank', type=int, default=1, help='CPU threads per rank (0: torch default)')
  parser.add_argument('--full', action='store_true', help='full-size CIFAR-10 NCSN++ (GPU)')
  parser.add_argument('--dsm_only', action='store_true', help='alpha = beta = 0')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--out', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args)
    return
  rows = []
  for n in [int(r) for r in args.ranks.split(',')]:
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, 'result.json')
      passed = [f'--batch={args.batch}', f'--grad_accum_steps={args.grad_accum_steps}', f'--steps={args.steps}',
                f'--warmup={args.warmup}', f'--threads_per_rank={args.threads_per_rank}']
      passed += ['--full'] * args.full + ['--dsm_only'] * args.dsm_only
      cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}', __file__,
             '--worker', f'--out={out}', *passed]
      env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
      subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
      with open(out) as f:
        rows.append((n, json.load(f)))
  device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'
  print(f'device: {device}, torch {torch.__version__}, global batch {args.batch}, '
        f'{"DSM" if args.dsm_only else "DSM + FP (paper settings)"}, {"full" if args.full else "reduced"} '
        f'NCSN++, median of {args.steps} steps after {args.warmup}')
  print('| ranks | threads per rank | step (s) | relative to 1 rank |')
  print('| --- | --- | --- | --- |')
  base = rows[0][1]['median']
  for n, result in rows:
    print(f'| {n} | {result["threads"]} | {result["median"]:.3f} | {result["median"] / base:.2f}x |')


if __name__ == '__main__':
  main()
