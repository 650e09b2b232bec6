"""Measures the score-FPE vector term R_vec with dropout on, for `training.fp_dropout_masks` 'shared' and
'independent', and with dropout off: the scale difference against the released code (docs/score_fpe.md).

A small version of a `configs/fp/` config (NCSN++ architecture, random init with every weight perturbed by
`--perturb` Gaussian noise, the same for every setting), the model in training mode, the paper's estimator
(finite difference, one Gaussian Hutchinson probe). For each setting it evaluates the loss's per-sample `fp_vector` on `--repeats` batches of uniform images and prints the
mean of the batch means with its standard error. 'independent' divides the difference of two dropout draws by
the finite difference's step (~1e-3); 'shared' differentiates one network.

Usage:
  python bench/measure_dropout_scale.py                   # about a minute on 2 CPU cores
  python bench/measure_dropout_scale.py --config ve_ncsnpp --repeats 20
"""

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losses  # noqa: E402
import sde_lib  # noqa: E402
from configs.fp import cifar10_ve_ncsnpp_continuous, cifar10_vp_ddpmpp_continuous  # noqa: E402
from models import utils as mutils  # noqa: E402

CONFIGS = {
    'vp_ddpmpp': cifar10_vp_ddpmpp_continuous.get_config,
    've_ncsnpp': cifar10_ve_ncsnpp_continuous.get_config,
}
# (label, model.dropout, training.fp_dropout_masks)
SETTINGS = (
    ('dropout {p}, masks shared (default)', None, 'shared'),
    ('dropout {p}, masks independent (released)', None, 'independent'),
    ('dropout off', 0., 'shared'),
)


def tiny_config(name, args, dropout, masks):
  config = CONFIGS[name]()
  config.device = torch.device('cpu')
  config.data.image_size = args.image_size
  model = config.model
  model.nf = args.nf
  if not args.full_depth:
    model.ch_mult, model.num_res_blocks, model.attn_resolutions = (1, 2), 1, (args.image_size // 2,)
  model.dropout = args.dropout if dropout is None else dropout
  config.training.fp_dropout_masks = masks
  return config


def measure(config, args):
  """Mean and standard error over `args.repeats` batches of the batch mean of `fp_vector`."""
  torch.manual_seed(args.seed)
  model = mutils.create_model(config)
  # Score SDE zero-initializes the output convolutions (the score would be ~0 whatever dropout does): perturb
  # every weight, identically for every setting.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(args.perturb * torch.randn(p.shape, generator=torch.Generator().manual_seed(args.seed + p.numel())))
  sde = sde_lib.sde_from_config(config)
  loss = losses.loss_from_config(config, sde)
  shape = (args.batch, config.data.num_channels, config.data.image_size, config.data.image_size)
  generator = torch.Generator().manual_seed(args.seed + 1)
  means = []
  for _ in range(args.repeats):
    batch = torch.rand(shape, generator=generator)
    noise = loss.draw_noise(shape, batch.device, generator=generator)
    terms = loss(model, batch, train=True, noise=noise)  # train: the model is in training mode (dropout on)
    means.append(terms['fp_vector'].detach().mean().item())
  mean = statistics.fmean(means)
  stderr = statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else float('nan')
  return mean, stderr


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', choices=sorted(CONFIGS), default='vp_ddpmpp')
  parser.add_argument('--dropout', type=float, default=0.1)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--image_size', type=int, default=16)
  parser.add_argument('--nf', type=int, default=16)
  parser.add_argument('--full_depth', action='store_true',
                      help="keep the config's ch_mult, num_res_blocks and attention (needs --image_size 32)")
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--perturb', type=float, default=0.05, help='std of the noise added to every weight')
  parser.add_argument('--threads', type=int, default=1)
  args = parser.parse_args(argv)
  torch.set_num_threads(args.threads)
  depth = 'full depth' if args.full_depth else 'ch_mult (1, 2), 1 block'
  print(f'R_vec (batch mean of fp_vector) of a small {args.config} (nf {args.nf}, {depth}, {args.image_size}x'
        f'{args.image_size}, batch {args.batch}) in training mode, {args.repeats} batches: mean +- standard error')
  print(f'| {"setting":<45} | {"R_vec":>24} |')
  print(f'| {"-" * 45} | {"-" * 24} |')
  for label, dropout, masks in SETTINGS:
    mean, stderr = measure(tiny_config(args.config, args, dropout, masks), args)
    print(f'| {label.format(p=args.dropout):<45} | {f"{mean:.4g} +- {stderr:.2g}":>24} |', flush=True)


if __name__ == '__main__':
  main()
