"""Full-size cost model of a training step, measured on the CPU: FLOPs, network evaluations, saved activations.

Builds the CIFAR-10 models of the released configs at full width (NCSN++ VE and DDPM++ VP, and their deep
variants) with the FP-Diffusion fine-tuning setting of `configs/fp/` (`fp_finetuning.fine_tune`: DSM with
likelihood weighting + 0.15 R_vec + 0.01 R_sc, finite difference, one Gaussian Hutchinson probe), and runs one
training step of the project's own trainer (`run_lib.build_state`, `run_lib.make_trainer`: loss, backward,
Adam, EMA) per variant at batch 1 and 2. Per step it measures:

  - FLOPs (`torch.utils.flop_counter.FlopCounterMode`: matmuls and convolutions of the forward pass, of the
    higher-order passes inside the loss, and of the parameter backward; elementwise ops are not counted);
  - network evaluations: calls of the network's forward (a hook), in the loss and recomputed in the backward;
  - the peak over the step of the bytes autograd saves for backward (`torch.autograd.graph.saved_tensors_hooks`,
    live bytes, storages counted once, parameters left out: they are counted in the model's state);
  - the peak of every tensor the CPU allocator hands out from the start of the step to the end of its backward
    (`torch.profiler` memory events): what the saved-tensor count cannot see (temporaries of the backward,
    gradient buffers), measured, on the CPU.

From the per-sample slope (batch 2 minus batch 1) and the intercept it projects, for a GPU step at batch 48
and 128, the FLOPs, the FP/DSM FLOP ratio and the peak memory

  peak(B) = parameters + gradients + Adam (2x) + EMA + c * saved(B),

where c (the overhead factor) stands for everything that is not a saved activation or the state: temporaries
of the backward passes, the double-backward graph's own buffers, cuDNN workspace, the CUDA context and the
caching allocator's fragmentation. c is calibrated on the measured H100 peaks of Score SDE's DSM step at batch
128 (`DSM_ANCHORS_GIB`); c = 1 is printed too. With a fraction f < 1 of the batch in the FP terms, the step at
batch B has k = ceil(f B) FP samples, each costing the fraction-1 variant's slope, and B - k plain ones, each
costing the fraction variant's slope (at batch 1 and 2, k = 1).

Variants (`VARIANTS`): DSM alone; the `configs/fp/` setting; the FP terms on a quarter of the batch; the exact
time derivative by forward-mode AD; and, in the benchmark only, activation checkpointing
(`torch.utils.checkpoint`, non-reentrant) of the network call the FP terms differentiate, either around the
whole network ('ckpt net') or around each of its blocks ('ckpt blocks'), which trades recomputation for
saved bytes.

Usage:
  python bench/cost_model.py --threads 2                  # the four full-size models, every variant (CPU, ~1 h)
  python bench/cost_model.py --models ve_ncsnpp --variants dsm,fp --tiny   # seconds
  python bench/cost_model.py --models ve_ncsnpp_deep --json deep.json     # then, to print runs together:
  python bench/cost_model.py --merge main.json,deep.json
"""

import argparse
import collections
import gc
import json
import logging
import math
import os
import sys
import time

import torch
import torch.utils.checkpoint
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run_lib  # noqa: E402
import sde_lib  # noqa: E402
from configs.fp import cifar10_ve_ncsnpp_continuous  # noqa: E402
from configs.fp import cifar10_vp_ddpmpp_continuous  # noqa: E402
from configs.fp import cifar10_vp_ddpmpp_deep_continuous  # noqa: E402
from configs.fp import fp_finetuning  # noqa: E402
from configs.ve import cifar10_ncsnpp_deep_continuous  # noqa: E402

GIB = 2 ** 30
MIB = 2 ** 20

MODELS = {
    've_ncsnpp': cifar10_ve_ncsnpp_continuous.get_config,
    'vp_ddpmpp': cifar10_vp_ddpmpp_continuous.get_config,
    # configs/fp/ has no deep VE recipe: the same fine-tuning setting on Score SDE's deep NCSN++ VE config.
    've_ncsnpp_deep': lambda: fp_finetuning.fine_tune(cifar10_ncsnpp_deep_continuous.get_config()),
    'vp_ddpmpp_deep': cifar10_vp_ddpmpp_deep_continuous.get_config,
}

# name -> (config.training overrides, checkpointing of the FP path: None, 'net' or 'blocks').
VARIANTS = collections.OrderedDict([
    ('dsm', (dict(alpha=0., beta=0.), None)),
    ('fp', ({}, None)),
    ('fp 1/4', (dict(fp_batch_fraction=0.25), None)),
    ('fp forward_ad', (dict(fp_time_derivative='forward_ad'), None)),
    ('fp forward_ad 1/4', (dict(fp_time_derivative='forward_ad', fp_batch_fraction=0.25), None)),
    ('fp ckpt net', ({}, 'net')),
    ('fp ckpt blocks', ({}, 'blocks')),
])

# Measured peak GPU memory of a training step on an H100 (GiB), quoted by issue 22. Score SDE's DSM step at batch
# 128 calibrates the overhead factor; the released FP-Diffusion code at batch 48 is compared with.
DSM_ANCHORS_GIB = {'ve_ncsnpp': 11.7, 'vp_ddpmpp': 12.1}
DSM_ANCHOR_BATCH = 128
RELEASED_FP_GIB = {'ve_ncsnpp': 57.2, 'vp_ddpmpp': 57.1}
RELEASED_FP_BATCH = 48
PROJECTED_BATCHES = (48, 128)
TARGET_GIB = 24.


class SavedTensorMeter:
  """Live bytes of the tensors autograd saves for backward, storages counted once, and their peak.

  Use `hooks()` as a context manager around the step. A saved tensor is wrapped in a handle that keeps it alive
  exactly as long as autograd keeps the handle; when the last handle of a storage dies, its bytes are released.
  """

  def __init__(self, excluded_storages=()):
    self.excluded = set(excluded_storages)
    self.refcount = collections.Counter()
    self.nbytes = {}
    self.live = 0
    self.peak = 0

  def hooks(self):
    return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

  def _pack(self, tensor):
    try:
      storage = tensor.untyped_storage()
      key, nbytes = (storage.data_ptr(), tensor.device), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # e.g. tensors without storage (functorch wrappers)
      key, nbytes = (id(tensor), tensor.device), tensor.numel() * tensor.element_size()
    if key[0] in self.excluded or nbytes == 0:
      return tensor
    return _SavedHandle(self, key, nbytes, tensor)

  @staticmethod
  def _unpack(packed):
    return packed.tensor if isinstance(packed, _SavedHandle) else packed

  def _acquire(self, key, nbytes):
    if self.refcount[key] == 0:
      self.nbytes[key] = nbytes
      self.live += nbytes
      self.peak = max(self.peak, self.live)
    self.refcount[key] += 1

  def _release(self, key):
    self.refcount[key] -= 1
    if self.refcount[key] == 0:
      self.live -= self.nbytes.pop(key)
      del self.refcount[key]


class _SavedHandle:
  __slots__ = ('meter', 'key', 'tensor')

  def __init__(self, meter, key, nbytes, tensor):
    self.meter, self.key, self.tensor = meter, key, tensor
    meter._acquire(key, nbytes)  # pylint: disable=protected-access

  def __del__(self):
    self.meter._release(self.key)  # pylint: disable=protected-access


class _GlobalOnly:
  """Stands in for FlopCounterMode's module tracker: its multi-grad hooks fail inside `torch.autograd.grad` on a
  leaf (the Hutchinson divergence's x), and only the global total is used here."""

  parents = {'Global'}

  def __enter__(self):
    return self

  def __exit__(self, *args):
    return False


def flop_counter():
  """A `FlopCounterMode` that counts the global total only (see `_GlobalOnly`)."""
  counter = FlopCounterMode(display=False)
  counter.mod_tracker = _GlobalOnly()
  return counter


class _CheckpointedCall(torch.nn.Module):
  """Calls `module` under non-reentrant activation checkpointing: its activations are recomputed when needed."""

  def __init__(self, module):
    super().__init__()
    self.inner = module

  def forward(self, *args):
    return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=False)


def _checkpoint_blocks(network):
  """Makes every residual and attention block of `network` (NCSN++/DDPM++ `all_modules`) run checkpointed, in
  place; returns a function that undoes it. Used by the FP path only (see `build_step`)."""
  patched = []
  for module in network.all_modules:
    if type(module).__name__.startswith(('ResnetBlock', 'AttnBlock')):
      original = module.forward
      module.forward = (lambda f: lambda *args: torch.utils.checkpoint.checkpoint(f, *args, use_reentrant=False))(
          original)
      patched.append(module)
  if not patched:
    raise ValueError(f'{type(network).__name__} has no ResnetBlock/AttnBlock modules to checkpoint.')
  return lambda: [delattr(m, 'forward') for m in patched]


def build_config(name, variant, batch, tiny):
  """The model's `configs/fp/` config with the variant's overrides, on the CPU."""
  config = MODELS[name]()
  config.device = torch.device('cpu')
  config.training.batch_size = batch
  for field, value in VARIANTS[variant][0].items():
    setattr(config.training, field, value)
  if tiny:
    # The tiny size of tests/configs_tiny.py: 8x8 images, nf 8, two resolutions, one block each.
    config.data.image_size = 8
    config.model.nf = 8
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
  return config


def build_step(config, checkpointing):
  """The training state and `Trainer` of `config` (run_lib's), with the FP path's network call checkpointed if
  asked. Returns (state, trainer, network, undo)."""
  state = run_lib.build_state(config)
  sde = sde_lib.sde_from_config(config)
  trainer = run_lib.make_trainer(config, sde, state)
  plain = state['model']
  network = plain.module if isinstance(plain, torch.nn.DataParallel) else plain
  undo = lambda: None
  if checkpointing == 'net':
    # The loss evaluates the FP samples with `state['model']` (the eager model) and the rest of the batch with
    # the trainer's forward model: checkpointing the former leaves the plain DSM forward as it is.
    state['model'] = _CheckpointedCall(plain)
    trainer.forward_model = plain
  elif checkpointing == 'blocks':
    if config.training.fp_batch_fraction < 1:
      raise ValueError("'ckpt blocks' patches the network itself, so it needs fp_batch_fraction = 1.")
    undo = _checkpoint_blocks(network)
  return state, trainer, network, undo


def model_state_bytes(state):
  """Bytes of the parameters; gradients, EMA are as many, Adam's two moments twice as many (float32)."""
  params = sum(p.numel() * p.element_size() for p in state['model'].parameters())
  return dict(params=params, grads=params, adam=2 * params, ema=params, total=5 * params,
              count=sum(p.numel() for p in state['model'].parameters()))


def measure(name, variant, batch, args):
  """One training step of `variant` at `batch`, measured (see the module docstring); a dict."""
  config = build_config(name, variant, batch, args.tiny)
  torch.manual_seed(0)
  state, trainer, network, undo = build_step(config, VARIANTS[variant][1])
  shape = (batch, config.data.num_channels, config.data.image_size, config.data.image_size)
  data = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
  calls = collections.Counter()
  phase = ['loss']
  hook = network.register_forward_pre_hook(lambda module, inputs: calls.update([phase[0]]))
  meter = SavedTensorMeter(p.untyped_storage().data_ptr() for p in state['model'].parameters())
  flops = flop_counter()
  marks = {}
  original_backward = trainer.precision.backward

  def backward(loss):
    # Where the loss's graph (with the higher-order passes' graphs inside it) is complete, and where it is gone.
    phase[0] = 'backward'
    marks['loss_flops'] = flops.get_total_flops()
    marks['saved_at_backward'] = meter.live
    original_backward(loss)
    marks['backward_end_ns'] = time.time_ns()
    phase[0] = 'update'

  trainer.precision.backward = backward
  profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
  gc.collect()
  start = time.perf_counter()
  with profiler, flops, meter.hooks():
    start_ns = time.time_ns()
    terms = trainer.train_step(state, data)
  seconds = time.perf_counter() - start
  hook.remove()
  undo()
  allocated = 0
  alloc_peak = 0
  events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                  if e.name() == '[memory]' and start_ns <= e.start_ns() <= marks['backward_end_ns'])
  for _, nbytes in events:
    allocated += nbytes
    alloc_peak = max(alloc_peak, allocated)
  out = dict(model=name, variant=variant, batch=batch, seconds=seconds, flops=flops.get_total_flops(),
             loss_flops=marks['loss_flops'], evals=calls['loss'], recomputed=calls['backward'],
             saved_peak=meter.peak, saved_at_backward=marks['saved_at_backward'], alloc_peak=alloc_peak,
             loss=float(terms['loss']), grad_norm=float(trainer.last_grad_norm), state=model_state_bytes(state),
             fraction=config.training.fp_batch_fraction, tiny=args.tiny)
  del state, trainer, terms, profiler
  gc.collect()
  return out


def reused(runs, variant, batch):
  """The base variant's run at `batch` where the fraction variant's step is the same one (its fraction of the
  batch rounds up to the whole batch, e.g. a quarter of 1 sample), else None."""
  fraction = VARIANTS[variant][0].get('fp_batch_fraction', 1.)
  base = runs.get(base_variant(variant), {}).get(batch)
  if fraction >= 1 or base is None or math.ceil(fraction * batch) < batch:
    return None
  return dict(base, variant=variant, fraction=fraction)


def base_variant(variant):
  """The fraction-1 variant of a fraction variant (its FP samples cost what the base variant's cost)."""
  return variant.replace(' 1/4', '')


def project(runs, key, variant, batch):
  """Quantity `key` of `variant` at `batch`, from its runs at batch 1 and 2 (see the module docstring)."""
  x1, x2 = runs[variant][1][key], runs[variant][2][key]
  fraction = runs[variant][1]['fraction']
  if fraction >= 1:
    return x1 + (batch - 1) * (x2 - x1)
  base = runs.get(base_variant(variant))
  if base is None:
    return None
  k = math.ceil(fraction * batch)
  return x1 + (k - 1) * (base[2][key] - base[1][key]) + (batch - k) * (x2 - x1)


def calibrate(results, tiny):
  """Overhead factor c per anchored model: (anchor - state) / saved bytes of the DSM step at the anchor's batch.
  Empty at the tiny size (the anchors are full-size steps)."""
  factors = {}
  for name, anchor in DSM_ANCHORS_GIB.items():
    runs = results.get(name, {})
    if 'dsm' in runs and not tiny:
      saved = project(runs, 'saved_peak', 'dsm', DSM_ANCHOR_BATCH)
      factors[name] = (anchor * GIB - runs['dsm'][1]['state']['total']) / saved
  return factors


def projected_peaks(runs, variant, batch, factor):
  """Projected peak GiB at `batch`: state + saved (c = 1), state without gradients + the CPU allocator's peak
  (which holds the gradients), and state + c * saved; None where it cannot be projected."""
  state = next(iter(runs[variant].values()))['state']
  saved = project(runs, 'saved_peak', variant, batch)
  alloc = project(runs, 'alloc_peak', variant, batch)
  if saved is None or alloc is None:
    return None
  return ((state['total'] + saved) / GIB, (state['total'] - state['grads'] + alloc) / GIB,
          (state['total'] + factor * saved) / GIB)


def micro_batches_under_target(runs, variant, batch, factor):
  """The fewest micro-batches (`training.grad_accum_steps`, a divisor of `batch`) whose projected peak (state
  + c x saved) is under `TARGET_GIB`, or None. Each micro-batch has the variant's fraction of FP samples."""
  state = next(iter(runs[variant].values()))['state']['total']
  for k in range(1, batch + 1):
    if batch % k == 0:
      saved = project(runs, 'saved_peak', variant, batch // k)
      if saved is not None and (state + factor * saved) / GIB < TARGET_GIB:
        return k
  return None


def _slope(runs, variant, key):
  by_batch = runs[variant]
  return by_batch[2][key] - by_batch[1][key], 2 * by_batch[1][key] - by_batch[2][key]


def print_tables(results, args):
  """The measured table, the model state and the projections (markdown); returns the overhead factor used."""
  print('\nMeasured (one training step on the CPU; per step, not per sample):\n')
  print('| model | variant | batch | GFLOP | GFLOP in the loss | evals (+ recomputed) | saved peak (MiB) | '
        'alloc peak (MiB) | alloc / (saved + grads) | s | loss | grad norm |')
  print('| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  for name, runs in results.items():
    for variant, by_batch in runs.items():
      for batch, r in sorted(by_batch.items()):
        overhead = r['alloc_peak'] / (r['saved_peak'] + r['state']['grads'])
        print(f"| {name} | {variant} | {batch} | {r['flops'] / 1e9:.4g} | {r['loss_flops'] / 1e9:.4g} | "
              f"{r['evals']} (+{r['recomputed']}) | {r['saved_peak'] / MIB:.4g} | {r['alloc_peak'] / MIB:.4g} | "
              f"{overhead:.2f} | {r['seconds']:.1f} | {r['loss']:.4g} | {r['grad_norm']:.4g} |")

  print('\nModel state (float32; Adam keeps two moments):\n')
  print('| model | parameters | parameters (MiB) | gradients (MiB) | Adam (MiB) | EMA (MiB) | total (GiB) |')
  print('| --- | ---: | ---: | ---: | ---: | ---: | ---: |')
  for name, runs in results.items():
    s = next(iter(next(iter(runs.values())).values()))['state']
    print(f"| {name} | {s['count'] / 1e6:.2f}M | {s['params'] / MIB:.4g} | {s['grads'] / MIB:.4g} | "
          f"{s['adam'] / MIB:.4g} | {s['ema'] / MIB:.4g} | {s['total'] / GIB:.3g} |")

  factors = calibrate(results, args.tiny)
  factor = sum(factors.values()) / len(factors) if factors else 1.
  print(f'\nOverhead factor c from the DSM anchors (batch {DSM_ANCHOR_BATCH}, H100): '
        f'{", ".join(f"{n} {f:.2f}" for n, f in factors.items()) or "none (tiny size or no anchored model)"}; '
        f'used: c = {factor:.2f}')
  print('Peak GiB columns: state + saved (c = 1) / state - gradients + CPU allocator peak / state + c x saved. '
        'Per-sample columns of a 1/4 variant: its non-FP samples (its FP samples cost the base variant\'s).\n')
  batches = ' | '.join(f'peak GiB B = {b}' for b in PROJECTED_BATCHES)
  print(f'| model | variant | GFLOP / sample | FLOP ratio to DSM (B = 48) | saved MiB / sample | saved MiB '
        f'intercept | alloc MiB / sample | {batches} | micro-batches for < {TARGET_GIB:g} GiB at B = 48 | '
        f'known (GiB) |')
  print('| --- | --- |' + ' ---: |' * (6 + len(PROJECTED_BATCHES)) + ' --- |')
  for name, runs in results.items():
    for variant in runs:
      if not {1, 2} <= set(runs[variant]):
        continue
      peaks = [projected_peaks(runs, variant, b, factor) for b in PROJECTED_BATCHES]
      if any(p is None for p in peaks):
        continue
      flops48 = project(runs, 'flops', variant, 48)
      ratio = f"{flops48 / project(runs, 'flops', 'dsm', 48):.2f}x" if 'dsm' in runs else '-'
      saved_slope, saved_intercept = _slope(runs, variant, 'saved_peak')
      alloc_slope, _ = _slope(runs, variant, 'alloc_peak')
      known = ''
      if variant == 'dsm' and name in DSM_ANCHORS_GIB:
        known = f'{DSM_ANCHORS_GIB[name]} at B = {DSM_ANCHOR_BATCH}'
      elif variant == 'fp' and name in RELEASED_FP_GIB:
        known = f'{RELEASED_FP_GIB[name]} at B = {RELEASED_FP_BATCH} (released code)'
      cells = ' | '.join(' / '.join(f'{v:.1f}' for v in p) for p in peaks)
      micro = micro_batches_under_target(runs, variant, 48, factor)
      print(f"| {name} | {variant} | {flops48 / 48 / 1e9:.4g} | {ratio} | {saved_slope / MIB:.4g} | "
            f"{saved_intercept / MIB:.4g} | {alloc_slope / MIB:.4g} | {cells} | {micro or '-'} | {known} |")
  return factor


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--models', default=','.join(MODELS), help=f'comma-separated subset of {list(MODELS)}')
  parser.add_argument('--variants', default=','.join(VARIANTS), help=f'comma-separated subset of {list(VARIANTS)}')
  parser.add_argument('--batches', default='1,2', help='batch sizes; the projection uses 1 and 2')
  parser.add_argument('--tiny', action='store_true', help='the tiny size of tests/configs_tiny.py (seconds)')
  parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
  parser.add_argument('--json', default=None, help='write the measurements to this file')
  parser.add_argument('--merge', default=None,
                      help='comma-separated --json files of earlier runs: print their tables together (runs nothing)')
  args = parser.parse_args(argv)
  if args.merge:
    results = collections.OrderedDict()
    for path in args.merge.split(','):
      with open(path) as f:
        for name, runs in json.load(f, object_pairs_hook=collections.OrderedDict).items():
          for variant, by_batch in runs.items():
            results.setdefault(name, collections.OrderedDict())[variant] = {int(b): r for b, r in by_batch.items()}
    args.tiny = any(r.get('tiny') for runs in results.values() for by_batch in runs.values()
                    for r in by_batch.values())
    print_tables(results, args)
    return results
  logging.basicConfig(level=logging.WARNING)
  if args.threads:
    torch.set_num_threads(args.threads)
  models, variants = args.models.split(','), args.variants.split(',')
  for given, known, what in ((models, MODELS, 'models'), (variants, VARIANTS, 'variants')):
    unknown = sorted(set(given) - set(known))
    if unknown:
      parser.error(f'unknown {what} {unknown}; choose from {list(known)}')
  batches = [int(b) for b in args.batches.split(',')]
  print(f'CPU, torch {torch.__version__}, threads {torch.get_num_threads()}, '
        f'{"tiny" if args.tiny else "full"} size, batches {batches}', flush=True)
  results = collections.OrderedDict()
  for name in models:
    results[name] = collections.OrderedDict()
    for variant in variants:
      results[name][variant] = {}
      for batch in batches:
        r = reused(results[name], variant, batch)
        r = r if r is not None else measure(name, variant, batch, args)
        results[name][variant][batch] = r
        print(f"  {name} | {variant} | batch {batch}: {r['flops'] / 1e9:.1f} GFLOP, {r['evals']} evals "
              f"(+{r['recomputed']}), saved peak {r['saved_peak'] / MIB:.0f} MiB, alloc peak "
              f"{r['alloc_peak'] / MIB:.0f} MiB, {r['seconds']:.1f} s", flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)
  print_tables(results, args)
  return results


if __name__ == '__main__':
  main()
