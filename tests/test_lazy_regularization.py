"""Lazy regularization (`training.fp_every`, losses.LazyRegularization): the FP terms on one step in k at k x
their weight, with the DSM term at every step.

What is pinned: the expected gradient over the k phases is the every-step gradient (float64, fixed batch and
noise); k = 1 is the every-step objective bit for bit; the decision depends on the global step only (so ranks
and micro-batches agree, and a resumed run is the uninterrupted run); evaluation reports the terms at weight 1; the log says which step the FP terms come from; bad
values are refused naming the field. The 2-rank run is in tests/test_distributed.py, the compiled DSM-only
step in tests/test_trainer.py.
"""

import logging
import os

import pytest
import torch

import checkpoints
import losses
import run_lib
import score_fpe
import sde_lib
import trainer as trainer_lib
from models import utils as mutils
from models.ema import ExponentialMovingAverage
from tests import configs_tiny


def _toy_config(**training):
  """The demo's MLP (2-D data, no dropout) with both FP terms on, exact d_t s, the FP terms on half the batch."""
  config = configs_tiny.get_toy_fp_config(**{'beta': 0.2, 'scalar_fp': 'both', 'fp_batch_fraction': 0.5,
                                             **training})
  config.optim.warmup = 0
  return config


def _batch(n, seed=0, dtype=torch.float32):
  return torch.randn((n, 2, 1, 1), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _float64_state(config, step):
  torch.manual_seed(0)
  model = mutils.create_model(config).double()
  return dict(model=model, optimizer=losses.get_optimizer(config, model.parameters()),
              ema=ExponentialMovingAverage(model.parameters(), decay=0.9), step=step)


def _gradient_of_step(trainer, state, batch):
  """The gradient the step's update would use (the update itself is skipped), and the step's logged terms."""
  grads = []

  def recording_optimize_fn(optimizer, params, step, **kwargs):
    grads.append(torch.cat([p.grad.reshape(-1) for p in params]).clone())

  trainer.optimize_fn = recording_optimize_fn
  torch.manual_seed(7)  # noise_seed=None: t, z and the probes from the global generator, the same every call
  terms = trainer.train_step(state, batch)
  return grads[0], terms


@pytest.mark.parametrize('k, grad_accum_steps', [(2, 1), (4, 1), (3, 2)])
def test_expected_gradient_over_the_phases_is_the_every_step_gradient(k, grad_accum_steps):
  config = _toy_config()
  loss = losses.loss_from_config(config, sde_lib.sde_from_config(config))
  batch = _batch(8, dtype=torch.float64)
  every_step = trainer_lib.Trainer(loss, grad_accum_steps=grad_accum_steps)
  expected, expected_terms = _gradient_of_step(every_step, _float64_state(config, 0), batch)
  lazy = trainer_lib.Trainer(loss, grad_accum_steps=grad_accum_steps, fp_every=k)
  phases = [_gradient_of_step(lazy, _float64_state(config, 10 * k + phase), batch) for phase in range(k)]
  mean = sum(grad for grad, _ in phases) / k
  torch.testing.assert_close(mean, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())

  # Phase 0 (a step that is a multiple of k) carries the FP terms at weight 1 in the log, k x in the objective.
  terms = phases[0][1]
  assert set(terms) == {'loss', 'dsm', 'fp_vector', 'fp_scalar'}
  for name in ('dsm', 'fp_vector', 'fp_scalar'):
    torch.testing.assert_close(terms[name], expected_terms[name], rtol=1e-12, atol=0)
  torch.testing.assert_close(terms['loss'], terms['dsm'] + k * (0.5 * terms['fp_vector'] + 0.2 * terms['fp_scalar']),
                             rtol=1e-12, atol=0)
  assert lazy.latest_regularized[0] == 10 * k + 1  # the step it is logged under: after the update
  # The other phases: the DSM term alone, the same value.
  for _, terms in phases[1:]:
    assert set(terms) == {'loss', 'dsm'}
    torch.testing.assert_close(terms['dsm'], expected_terms['dsm'], rtol=1e-12, atol=0)
    torch.testing.assert_close(terms['loss'], terms['dsm'], rtol=0, atol=0)
  # The phases differ: the FP gradient is not negligible here, so the test above measures something.
  assert (phases[0][0] - phases[1][0]).abs().max() > 1e-3 * expected.abs().max()


def test_every_step_is_the_objective_bit_for_bit():
  config = _toy_config()
  loss = losses.loss_from_config(config, sde_lib.sde_from_config(config))
  torch.manual_seed(0)
  state = run_lib.build_state(config)
  torch.manual_seed(3)
  per_sample = loss(state['model'], _batch(8), train=True)
  reduced = loss.reduce(per_sample, 8)
  # The objective before lazy regularization existed: the weighted sum, in the terms' order.
  before = sum(loss.weights[name] * value for name, value in reduced.items())
  assert torch.equal(loss.terms(per_sample, 8)['loss'], before)
  assert torch.equal(loss.terms(per_sample, 8, regularizer_scale=1)['loss'], before)
  one = losses.LazyRegularization(1)
  assert all(one.regularizes(step) for step in range(20)) and one.describe(loss) == ''


def test_fp_every_one_trains_as_the_score_sde_step():
  """fp_every = 1 from the config: the same updates, bit for bit, as Score SDE's `get_step_fn` (every step)."""
  config = _toy_config(fp_every=1)
  sde = sde_lib.sde_from_config(config)
  training = config.training
  torch.manual_seed(0)
  state = run_lib.build_state(config)
  trainer = run_lib.make_trainer(config, sde, state)
  trainer.noise_seed = None  # the global generator, as Score SDE's step
  torch.manual_seed(0)
  reference_state = run_lib.build_state(config)
  step_fn = losses.get_step_fn(sde, train=True, optimize_fn=losses.optimization_manager(config),
                               reduce_mean=training.reduce_mean, likelihood_weighting=training.likelihood_weighting,
                               **score_fpe.fp_options_from_config(config))
  for step in range(3):
    torch.manual_seed(step)
    terms = trainer.train_step(state, _batch(8, seed=step))
    torch.manual_seed(step)
    step_fn(reference_state, _batch(8, seed=step))
    assert set(terms) == {'loss', 'dsm', 'fp_vector', 'fp_scalar'}
  for a, b in zip(state['model'].parameters(), reference_state['model'].parameters()):
    assert torch.equal(a, b)


def test_schedule_is_a_function_of_the_global_step_only():
  lazy = losses.LazyRegularization(4)
  assert [step for step in range(13) if lazy.regularizes(step)] == [0, 4, 8, 12]
  # A tensor step (a restored checkpoint's) decides the same; a fresh object (another rank, a resumed run) too.
  assert [losses.LazyRegularization(4).regularizes(torch.tensor(s)) for s in range(13)] == \
      [lazy.regularizes(s) for s in range(13)]


@pytest.mark.parametrize('value', [0, -2, 1.5, 2.0, True, '4', None])
def test_bad_fp_every_is_refused_naming_the_field(value):
  config = _toy_config(fp_every=value)
  sde = sde_lib.sde_from_config(config)
  state = run_lib.build_state(config)
  with pytest.raises(ValueError, match=r'config\.training\.fp_every'):
    run_lib.make_trainer(config, sde, state)
  with pytest.raises(ValueError, match=r'config\.training\.fp_every'):
    losses.step_fn_from_config(config, sde, train=True, optimize_fn=losses.optimization_manager(config))


def test_score_sde_step_from_config_is_lazy_and_eval_is_not():
  config = _toy_config(fp_every=2)
  sde = sde_lib.sde_from_config(config)
  torch.manual_seed(0)
  state = run_lib.build_state(config)
  step_fn = losses.step_fn_from_config(config, sde, train=True, optimize_fn=losses.optimization_manager(config),
                                       return_terms=True)
  computed = [not torch.isnan(step_fn(state, _batch(8, seed=s))['fp_vector']) for s in range(4)]
  assert computed == [True, False, True, False]
  # Evaluation reports the FP terms at weight 1 at every step, whatever fp_every.
  eval_fn = losses.step_fn_from_config(config, sde, train=False, return_terms=True)
  trainer = run_lib.make_trainer(config, sde, state)
  for terms in (eval_fn(state, _batch(8)), trainer.eval_step(state, _batch(8))):
    torch.testing.assert_close(terms['loss'], terms['dsm'] + 0.5 * terms['fp_vector'] + 0.2 * terms['fp_scalar'],
                               rtol=1e-6, atol=0)


def test_lazy_accumulation_equals_the_lazy_big_batch():
  batches = [_batch(8, seed) for seed in range(3)]
  params = {}
  for k in (1, 2):
    # beta = 0 and the whole batch: the scalar term's norm and the FP fraction are taken per micro-batch.
    config = _toy_config(fp_every=2, grad_accum_steps=k, beta=0., fp_batch_fraction=1.)
    torch.manual_seed(0)
    state = run_lib.build_state(config)
    trainer = run_lib.make_trainer(config, sde_lib.sde_from_config(config), state)
    logged = [trainer.train_step(state, batch) for batch in batches]
    assert [set(terms) for terms in logged] == [{'loss', 'dsm', 'fp_vector'}, {'loss', 'dsm'},
                                                {'loss', 'dsm', 'fp_vector'}]
    params[k] = torch.cat([p.detach().reshape(-1) for p in state['model'].parameters()])
  # As tests/test_trainer.py's accumulation test: float32 rounding of another summation order, through Adam.
  torch.testing.assert_close(params[2], params[1], rtol=0, atol=1e-5)


def test_bf16_lazy_steps_train_float32_weights():
  config = _toy_config(fp_every=2, mixed_precision='bf16')
  torch.manual_seed(0)
  state = run_lib.build_state(config)
  trainer = run_lib.make_trainer(config, sde_lib.sde_from_config(config), state)
  for seed in range(2):
    terms = trainer.train_step(state, _batch(8, seed))
    assert all(torch.isfinite(value) for value in terms.values())
  assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in state['model'].parameters())


def _tensorboard_steps(tb_dir, tag):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(tb_dir)
  acc.Reload()
  return [event.step for event in acc.Scalars(tag)] if tag in acc.Tags()['scalars'] else []


def test_resumed_lazy_run_is_the_uninterrupted_run_and_logs_its_fp_steps(tmp_path, caplog):
  caplog.set_level(logging.INFO)

  def config_with(n_iters):
    return _toy_config(fp_every=2, n_iters=n_iters, log_freq=2, eval_freq=100, snapshot_freq=100,
                       snapshot_sampling=False)

  meta = os.path.join('checkpoints-meta', 'checkpoint.pth')
  whole, resumed = str(tmp_path / 'whole'), str(tmp_path / 'resumed')
  run_lib.train(config_with(5), whole)
  run_lib.train(config_with(3), resumed)  # stops after step 2 (an FP step), mid-phase
  run_lib.train(config_with(5), resumed)
  expected = checkpoints.load_checkpoint_file(os.path.join(whole, meta))
  got = checkpoints.load_checkpoint_file(os.path.join(resumed, meta))
  assert int(got['step']) == int(expected['step']) == 5
  for key, value in expected['model'].items():
    assert torch.equal(got['model'][key], value), key
  for a, b in zip(got['ema']['shadow_params'], expected['ema']['shadow_params']):
    assert torch.equal(a, b)

  # Log steps 2 and 4 are DSM-only steps (state['step'] 1 and 3 before the update): the line shows the FP terms
  # of the latest FP step, and TensorBoard has them at the FP steps' own numbers, once each.
  assert 'Schedule: lazy regularization: fp_vector, fp_scalar on the steps that are multiples of ' \
         'training.fp_every=2, at 2 x their weight' in caplog.text
  whole_line, resumed_line = [r.getMessage() for r in caplog.records
                               if r.getMessage().startswith('step: 4, training_loss')]
  assert 'dsm: ' in whole_line and '; fp_vector: ' in whole_line and 'fp_step: 3' in whole_line
  # The resumed run has computed no FP terms yet (its first FP step is step 5): the line shows none.
  assert resumed_line.split(', 4/5 steps')[0] == whole_line.split(';')[0] + ')'
  tb_dir = os.path.join(whole, 'tensorboard')
  assert _tensorboard_steps(tb_dir, 'training_loss') == [2, 4]
  assert _tensorboard_steps(tb_dir, 'fp_vector') == _tensorboard_steps(tb_dir, 'fp_scalar') == [1, 3]
