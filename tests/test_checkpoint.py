"""Checkpoint I/O (utils.save_checkpoint / utils.restore_checkpoint): Score SDE's format, safe, strict, atomic."""

import errno
import gc
import io
import logging
import os
import re
import sys
import zipfile

import numpy as np
import pytest
import torch

import checkpoints
import utils
from models.ema import ExponentialMovingAverage as EMA
from tests import full_disk


class _RunsCode:
  """A pickle payload that runs a shell command when unpickled (the attack `weights_only` prevents)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


def _net(width=4, extra=False):
  layers = [torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.GroupNorm(2, width), torch.nn.Conv2d(width, 3, 1)]
  if extra:
    layers.append(torch.nn.Conv2d(3, 3, 1))
  return torch.nn.DataParallel(torch.nn.Sequential(*layers))  # keys carry 'module.', as Score SDE's


def _state(seed, width=4, extra=False, trained=True):
  """A Score SDE training state; `trained` takes one Adam step with Score SDE's numpy float64 learning rate."""
  torch.manual_seed(seed)
  model = _net(width, extra)
  optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
  ema = EMA(model.parameters(), decay=0.999)
  state = dict(optimizer=optimizer, model=model, ema=ema, step=0)
  if trained:
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    step = 7
    for g in optimizer.param_groups:  # as Score SDE's optimization_manager: lr * np.minimum(step / warmup, 1.)
      g['lr'] = 2e-4 * np.minimum(step / 5000, 1.0)
    optimizer.step()
    ema.num_updates = 3
    ema.shadow_params = [p.detach().clone() + 0.5 for p in model.parameters()]
    state['step'] = step
  return state


def _assert_same_state(a, b):
  for (ka, va), (kb, vb) in zip(a['model'].state_dict().items(), b['model'].state_dict().items()):
    assert ka == kb and torch.equal(va, vb)
  sa, sb = a['optimizer'].state_dict(), b['optimizer'].state_dict()
  assert sa['param_groups'] == sb['param_groups']
  assert sa['state'].keys() == sb['state'].keys()
  for k in sa['state']:
    for name in sa['state'][k]:
      assert torch.equal(sa['state'][k][name], sb['state'][k][name])
  ea, eb = a['ema'].state_dict(), b['ema'].state_dict()
  assert ea['decay'] == eb['decay'] and ea['num_updates'] == eb['num_updates']
  assert len(ea['shadow_params']) == len(eb['shadow_params'])
  assert all(torch.equal(x, y) for x, y in zip(ea['shadow_params'], eb['shadow_params']))
  assert a['step'] == b['step']


def _params(state):
  return [p.detach().clone() for p in state['model'].parameters()]


def test_round_trip_restores_identical_state(tmp_path):
  path = tmp_path / 'checkpoints' / 'checkpoint_1.pth'
  saved = _state(0)
  assert isinstance(saved['optimizer'].param_groups[0]['lr'], np.float64)
  utils.save_checkpoint(str(path), saved)

  fresh = _state(1, trained=False)
  assert not torch.equal(_params(fresh)[0], _params(saved)[0])
  restored = utils.restore_checkpoint(str(path), fresh, device='cpu')
  assert restored is fresh
  _assert_same_state(saved, restored)
  lr = restored['optimizer'].param_groups[0]['lr']
  assert isinstance(lr, np.float64) and lr == 2e-4 * 7 / 5000
  # Score SDE's format: exactly the four entries, the model's keys carrying DataParallel's prefix.
  raw = checkpoints.load_checkpoint_file(path)
  assert sorted(raw) == sorted(checkpoints.CHECKPOINT_KEYS)
  assert all(k.startswith('module.') for k in raw['model'])


def test_checkpoint_needs_only_the_allow_listed_globals(tmp_path):
  path = tmp_path / 'ckpt.pth'
  utils.save_checkpoint(str(path), _state(0))
  needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
  # numpy < 2 (pinned here) pickles the float64 learning rate under numpy 1.x's name.
  scalar_name = 'numpy.core.multiarray.scalar' if np.__version__.startswith('1.') else 'numpy._core.multiarray.scalar'
  assert needed == {'numpy.dtype', scalar_name}


def test_allow_list_is_minimal_and_covers_both_numpy_names():
  names = set()
  for entry in checkpoints.checkpoint_safe_globals():
    obj, name = entry if isinstance(entry, tuple) else (entry, f'{entry.__module__}.{entry.__name__}')
    names.add(name)
  # The dtype classes of numpy's integer and float scalars (a float64 learning rate, an integer step), no more.
  dtype_classes = {type(np.dtype(t)) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                               np.uint64, np.float16, np.float32, np.float64)}
  expected = {'numpy.dtype', 'numpy.core.multiarray.scalar', *(f'{c.__module__}.{c.__name__}' for c in dtype_classes)}
  try:
    import numpy._core.multiarray  # noqa: F401  (numpy 2.x, and numpy 1.26's alias)
    expected.add('numpy._core.multiarray.scalar')
  except ImportError:
    pass
  assert names == expected


def _rename_numpy_scalar(src, dst, old, new):
  """Rewrites the GLOBAL that names numpy's scalar reconstructor in a checkpoint's pickle."""
  buf = io.BytesIO()
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(buf, 'w', zipfile.ZIP_STORED) as zout:
    for info in zin.infolist():
      data = zin.read(info.filename)
      if info.filename.endswith('/data.pkl'):
        assert old in data
        data = data.replace(old, new)
      zout.writestr(info.filename, data)
  dst.write_bytes(buf.getvalue())


@pytest.mark.parametrize('module', ['numpy.core.multiarray', 'numpy._core.multiarray'])
def test_loads_numpy_scalar_under_numpy1_and_numpy2_names(tmp_path, module):
  if module == 'numpy._core.multiarray':
    pytest.importorskip('numpy._core.multiarray')
  src = tmp_path / 'saved.pth'
  saved = _state(0)
  torch.save({'optimizer': saved['optimizer'].state_dict(), 'model': saved['model'].state_dict(),
              'ema': saved['ema'].state_dict(), 'step': saved['step']}, src)
  dst = tmp_path / 'renamed.pth'
  current = next(n for n in torch.serialization.get_unsafe_globals_in_checkpoint(str(src)) if 'scalar' in n)
  _rename_numpy_scalar(src, dst, ('c' + current.replace('.scalar', '\nscalar')).encode(),
                       ('c' + module + '\nscalar').encode())
  assert f'{module}.scalar' in torch.serialization.get_unsafe_globals_in_checkpoint(str(dst))
  restored = utils.restore_checkpoint(str(dst), _state(1, trained=False), 'cpu')
  _assert_same_state(saved, restored)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'evil.pth'
  good = _state(0)
  torch.save({'optimizer': good['optimizer'].state_dict(), 'model': good['model'].state_dict(),
              'ema': good['ema'].state_dict(), 'step': _RunsCode(marker)}, path)
  fresh = _state(1, trained=False)
  before = _params(fresh)
  with pytest.raises(checkpoints.CheckpointError, match='Refusing to load checkpoint') as info:
    utils.restore_checkpoint(str(path), fresh, 'cpu')
  assert str(path) in str(info.value)
  assert 'system' in str(info.value)  # torch's reason names the refused global
  assert not marker.exists()
  assert all(torch.equal(a, b) for a, b in zip(before, _params(fresh)))
  assert fresh['step'] == 0


def test_atomic_save_keeps_previous_checkpoint_on_failure(tmp_path, monkeypatch):
  path = tmp_path / 'checkpoint.pth'
  first = _state(0)
  utils.save_checkpoint(str(path), first)
  original_bytes = path.read_bytes()

  real_save = torch.save

  def save_then_crash(obj, f, *args, **kwargs):
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    f.write(buf.getvalue()[:100])  # a partial write, then the process "dies"
    raise KeyboardInterrupt('killed during save')

  monkeypatch.setattr(torch, 'save', save_then_crash)
  second = _state(5)
  second['step'] = 99
  with pytest.raises(KeyboardInterrupt):
    utils.save_checkpoint(str(path), second)
  monkeypatch.undo()

  assert sorted(os.listdir(tmp_path)) == ['checkpoint.pth']  # no temporary file left behind
  assert path.read_bytes() == original_bytes
  restored = utils.restore_checkpoint(str(path), _state(1, trained=False), 'cpu')
  _assert_same_state(first, restored)


def test_save_replaces_existing_checkpoint(tmp_path):
  path = tmp_path / 'checkpoint.pth'
  utils.save_checkpoint(str(path), _state(0))
  newer = _state(3)
  newer['step'] = 11
  utils.save_checkpoint(str(path), newer)
  assert sorted(os.listdir(tmp_path)) == ['checkpoint.pth']
  _assert_same_state(newer, utils.restore_checkpoint(str(path), _state(1, trained=False), 'cpu'))


def test_strict_load_lists_missing_unexpected_and_mismatched_keys(tmp_path):
  path = tmp_path / 'ckpt.pth'
  utils.save_checkpoint(str(path), _state(0, width=4))
  # Wider first layers (shape mismatches) and an extra final layer (missing keys).
  other = _state(1, width=6, extra=True, trained=False)
  before = _params(other)
  with pytest.raises(checkpoints.CheckpointError) as info:
    utils.restore_checkpoint(str(path), other, 'cpu')
  msg = str(info.value)
  assert str(path) in msg
  assert '2 missing keys: module.3.weight, module.3.bias' in msg
  assert 'module.0.weight: checkpoint (4, 3, 3, 3) vs model (6, 3, 3, 3)' in msg
  assert 'module.2.weight: checkpoint (3, 4, 1, 1) vs model (3, 6, 1, 1)' in msg
  assert 'unexpected' not in msg
  assert all(torch.equal(a, b) for a, b in zip(before, _params(other)))  # nothing changed

  # The reverse: the checkpoint has a layer the model lacks.
  path2 = tmp_path / 'ckpt2.pth'
  utils.save_checkpoint(str(path2), _state(0, extra=True))
  with pytest.raises(checkpoints.CheckpointError, match=r'2 unexpected keys: module\.3\.weight, module\.3\.bias'):
    utils.restore_checkpoint(str(path2), _state(1, trained=False), 'cpu')


def test_strict_load_explains_dataparallel_prefix(tmp_path):
  path = tmp_path / 'ckpt.pth'
  state = _state(0)
  state['model'] = state['model'].module  # saved without nn.DataParallel
  utils.save_checkpoint(str(path), state)
  with pytest.raises(checkpoints.CheckpointError, match="'module.' prefix"):
    utils.restore_checkpoint(str(path), _state(1, trained=False), 'cpu')


@pytest.mark.parametrize('entry', checkpoints.CHECKPOINT_KEYS)
def test_missing_entry_is_named(tmp_path, entry):
  path = tmp_path / 'ckpt.pth'
  good = _state(0)
  saved = {'optimizer': good['optimizer'].state_dict(), 'model': good['model'].state_dict(),
           'ema': good['ema'].state_dict(), 'step': good['step']}
  del saved[entry]
  torch.save(saved, path)
  with pytest.raises(checkpoints.CheckpointError, match=f"lacks the entry '{entry}'"):
    utils.restore_checkpoint(str(path), _state(1, trained=False), 'cpu')


def test_ema_must_fit_the_model(tmp_path):
  good = _state(0)
  base = {'optimizer': good['optimizer'].state_dict(), 'model': good['model'].state_dict(), 'step': 1}
  ema = good['ema'].state_dict()

  fewer = dict(base, ema=dict(ema, shadow_params=ema['shadow_params'][:-1]))
  torch.save(fewer, tmp_path / 'fewer.pth')
  n = len(ema['shadow_params'])
  with pytest.raises(checkpoints.CheckpointError, match=f'{n - 1} shadow parameters, the model {n} trainable'):
    utils.restore_checkpoint(str(tmp_path / 'fewer.pth'), _state(1, trained=False), 'cpu')

  reshaped = [p.reshape(-1) if p.dim() > 1 else p for p in ema['shadow_params']]
  torch.save(dict(base, ema=dict(ema, shadow_params=reshaped)), tmp_path / 'shape.pth')
  with pytest.raises(checkpoints.CheckpointError, match=r'#0: checkpoint \(108,\) vs model \(4, 3, 3, 3\)'):
    utils.restore_checkpoint(str(tmp_path / 'shape.pth'), _state(1, trained=False), 'cpu')


def test_optimizer_must_fit(tmp_path):
  path = tmp_path / 'ckpt.pth'
  good = _state(0)
  saved = {'optimizer': good['optimizer'].state_dict(), 'model': good['model'].state_dict(),
           'ema': good['ema'].state_dict(), 'step': 1}
  saved['optimizer']['param_groups'][0]['params'] = saved['optimizer']['param_groups'][0]['params'][:-1]
  torch.save(saved, path)
  fresh = _state(1, trained=False)
  before = _params(fresh)
  with pytest.raises(checkpoints.CheckpointError, match="'optimizer' has parameter groups of sizes"):
    utils.restore_checkpoint(str(path), fresh, 'cpu')
  assert all(torch.equal(a, b) for a, b in zip(before, _params(fresh)))


def _drop(key):
  return lambda entry: {k: v for k, v in entry.items() if k != key}


@pytest.mark.parametrize('entry, corrupt, message', [
    ('model', lambda m: dict(m, **{next(iter(m)): 0.5}), "'model' has values that are not tensors"),
    ('ema', _drop('decay'), "'ema' is not a dict with 'decay'"),
    ('ema', lambda e: dict(e, decay='0.999'), "'ema' decay is '0.999'"),
    ('ema', lambda e: dict(e, num_updates=1.5), "'ema' num_updates is 1.5"),
    ('ema', lambda e: dict(e, shadow_params=[0.] * len(e['shadow_params'])), "shadow_params is not a list of "
                                                                            'tensors'),
    ('optimizer', _drop('state'), "'optimizer' is not an optimizer state dict"),
    ('optimizer', lambda o: dict(o, param_groups=[{}]), "'optimizer' is not an optimizer state dict"),
    ('step', lambda step: 'seven', "'step' is 'seven', not an integer"),
    ('step', lambda step: -1, "'step' is -1"),
])
def test_malformed_entry_is_refused_and_state_unchanged(tmp_path, entry, corrupt, message):
  path = tmp_path / 'ckpt.pth'
  good = _state(0)
  saved = {'optimizer': good['optimizer'].state_dict(), 'model': good['model'].state_dict(),
           'ema': good['ema'].state_dict(), 'step': good['step']}
  saved[entry] = corrupt(saved[entry])
  torch.save(saved, path)
  fresh = _state(1)
  reference = _state(1)
  with pytest.raises(checkpoints.CheckpointError, match=message):
    utils.restore_checkpoint(str(path), fresh, 'cpu')
  # Nothing was loaded: not the model, the EMA, the optimizer or the step.
  _assert_same_state(fresh, reference)


def test_missing_file_warns_and_returns_state_unchanged(tmp_path, caplog):
  path = tmp_path / 'checkpoints-meta' / 'checkpoint.pth'
  state = _state(0)
  before = _params(state)
  with caplog.at_level(logging.WARNING):
    out = utils.restore_checkpoint(str(path), state, 'cpu')
  assert out is state and state['step'] == 7
  assert all(torch.equal(a, b) for a, b in zip(before, _params(state)))
  assert any('No checkpoint found' in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
  assert path.parent.is_dir() and not path.exists()


def _damaged(tmp_path, kind):
  """A checkpoint file damaged as real files get damaged."""
  good = tmp_path / 'good.pth'
  utils.save_checkpoint(str(good), _state(0))
  data = good.read_bytes()
  path = tmp_path / f'{kind}.pth'
  if kind == 'truncated':
    path.write_bytes(data[:len(data) // 2])
  elif kind == 'cut_early':
    path.write_bytes(data[:100])
  elif kind == 'empty':
    path.write_bytes(b'')
  elif kind == 'random':
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
  elif kind == 'text':
    path.write_text('model weights go here\n' * 50)
  elif kind == 'legacy_truncated':
    legacy = tmp_path / 'legacy.pth'
    torch.save({'step': 1, 'model': {}}, legacy, _use_new_zipfile_serialization=False)
    path.write_bytes(legacy.read_bytes()[:40])
  elif kind == 'corrupt_zip':
    # Flip bytes inside the archive's data, leaving its directory intact.
    middle = len(data) // 3
    path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 200]) + data[middle + 200:])
  elif kind == 'directory':
    path.mkdir()
  elif kind == 'dangling_link':
    path.symlink_to(tmp_path / 'moved_away.pth')
  return path


@pytest.mark.parametrize('kind, problem', [
    ('truncated', 'is truncated: a PyTorch zip archive without its end'),
    ('cut_early', 'is truncated: a PyTorch zip archive without its end'),
    ('empty', r'is empty \(0 bytes\)'),
    ('random', 'is not a PyTorch checkpoint: neither a zip archive nor a legacy PyTorch file'),
    ('text', 'is not a PyTorch checkpoint'),
    ('legacy_truncated', 'is truncated or corrupt: a legacy-format PyTorch file'),
    ('corrupt_zip', 'is (corrupt|truncated)'),
    ('directory', 'is a directory, not a checkpoint file'),
    ('dangling_link', r"is a symbolic link to '.*moved_away.pth', which does not exist"),
])
def test_damaged_checkpoint_is_one_line_naming_the_file_and_the_problem(tmp_path, kind, problem):
  path = _damaged(tmp_path, kind)
  fresh = _state(1)
  reference = _state(1)
  with pytest.raises(checkpoints.CheckpointError) as info:
    utils.restore_checkpoint(str(path), fresh, 'cpu')
  message = str(info.value)
  assert '\n' not in message and message.startswith(f'Checkpoint {str(path)!r} ')
  assert re.search(problem, message), message
  assert 'could run code' not in message  # only said of a file whose pickle asks for code
  _assert_same_state(fresh, reference)


def test_non_finite_weights_are_refused_naming_the_file_and_tensors(tmp_path):
  path = tmp_path / 'diverged.pth'
  state = _state(0)
  with torch.no_grad():
    next(state['model'].parameters())[0] = float('nan')
  state['ema'].shadow_params[2][0] = float('inf')
  utils.save_checkpoint(str(path), state)
  fresh = _state(1)
  reference = _state(1)
  with pytest.raises(checkpoints.CheckpointError, match=rf"Checkpoint '{path}' holds non-finite values \(NaN or inf\) in "
                                                  r'2 tensor\(s\): model module.0.weight, ema shadow #2') as info:
    utils.restore_checkpoint(str(path), fresh, 'cpu')
  assert '\n' not in str(info.value)
  _assert_same_state(fresh, reference)
  # The raw loader still reads it (tools that inspect a diverged run).
  assert checkpoints.non_finite_entries(checkpoints.load_checkpoint_file(path)) == ['model module.0.weight', 'ema shadow #2']


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path):
  keep = ['checkpoint.pth', '.hidden', 'x.tmp', '.checkpoint.pth.notahexnumber.tmp']
  for name in keep:
    (tmp_path / name).write_bytes(b'k')
  stale = tmp_path / f'.checkpoint.pth.{"ab" * 16}.tmp'
  stale.write_bytes(b'12345')
  fresh = tmp_path / f'.ckpt_1_loss.npz.{"cd" * 16}.tmp'
  fresh.write_bytes(b'1')
  assert checkpoints.remove_stale_temp_files(str(tmp_path), min_age_seconds=3600) == []
  os.utime(stale, (0, 0))
  assert checkpoints.remove_stale_temp_files(str(tmp_path), min_age_seconds=3600) == [(str(stale), 5)]
  assert checkpoints.remove_stale_temp_files(str(tmp_path)) == [(str(fresh), 1)]
  assert sorted(os.listdir(tmp_path)) == sorted(keep)


def _ncsnpp_state(**model_fields):
  import run_lib  # pylint: disable=g-import-not-at-top  (builds the models; heavier than this file's toy nets)
  from tests import configs_tiny  # pylint: disable=g-import-not-at-top
  config = configs_tiny.get_config()
  for name, value in model_fields.items():
    setattr(config.model, name, value)
  torch.manual_seed(0)
  return run_lib.build_state(config)


def _mismatch_message(tmp_path, saved_fields, model_fields):
  """The one-line error of restoring a tiny NCSN++ checkpoint built with `saved_fields` into one with
  `model_fields`."""
  path = str(tmp_path / 'other.pth')
  utils.save_checkpoint(path, _ncsnpp_state(**saved_fields))
  with pytest.raises(checkpoints.CheckpointError) as info:
    utils.restore_checkpoint(path, _ncsnpp_state(**model_fields), 'cpu')
  message = str(info.value)
  assert '\n' not in message
  return message


def test_a_wider_checkpoint_names_model_nf_in_one_short_line(tmp_path):
  message = _mismatch_message(tmp_path, dict(nf=16), dict(nf=8))
  assert 'shape mismatches' in message and 'more' in message
  assert "every differing size is 2 times the model's" in message and 'model.nf 2 times' in message
  assert len(message) < 1000


def test_a_deeper_checkpoint_names_the_shape_fields(tmp_path):
  message = _mismatch_message(tmp_path, dict(num_res_blocks=2), dict(num_res_blocks=1))
  assert 'another architecture or size' in message and 'model.num_res_blocks' in message and 'model.nf' in message
  assert len(message) < 2000  # the 216-key mismatch of the issue was 16,160 characters


def _saved(state):
  return {'optimizer': state['optimizer'].state_dict(), 'model': state['model'].state_dict(),
          'ema': state['ema'].state_dict(), 'step': state['step']}


def _set(path, value):
  """Sets `value` at `path` (a tuple of keys and indices) of a nested checkpoint dict, in place."""
  return lambda saved: _set_in(saved, path, value)


def _set_in(node, path, value):
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = value


@pytest.mark.parametrize('damage, message', [
    (_set(('optimizer', 'state', 0, 'exp_avg'), torch.zeros(7)),
     r'optimizer state\[0\]\.exp_avg has shape \(7,\), its parameter \(4, 3, 3, 3\)'),
    (_set(('optimizer', 'state', 1, 'exp_avg_sq'), torch.zeros(4, dtype=torch.long)),
     r'optimizer state\[1\]\.exp_avg_sq is of dtype torch\.int64, not a floating-point type'),
    (_set(('optimizer', 'state', 0, 'step'), torch.tensor(float('nan'))),
     r'optimizer state\[0\]\.step is tensor\(nan\)'),
    (_set(('optimizer', 'state', 0, 'step'), -3), r'optimizer state\[0\]\.step is -3, not a finite number >= 0'),
    (_set(('optimizer', 'state', 99), {'step': torch.tensor(1.)}), r'state\[99\] belongs to no parameter'),
    (_set(('optimizer', 'state', 0), [1, 2]), r'state\[0\] is a list, not a dict'),
    (_set(('optimizer', 'param_groups', 0, 'eps'), float('nan')), r'optimizer param_groups\[0\]\.eps is nan'),
    (_set(('optimizer', 'param_groups', 0, 'betas'), (float('nan'), 0.999)),
     r'param_groups\[0\]\.betas is \(nan, 0\.999\) \(allowed: two finite numbers in \[0, 1\)\)'),
    (_set(('optimizer', 'param_groups', 0, 'betas'), (0.9, 1.0)), r'param_groups\[0\]\.betas is \(0\.9, 1\.0\)'),
    (_set(('optimizer', 'param_groups', 0, 'weight_decay'), float('inf')),
     r'param_groups\[0\]\.weight_decay is inf \(allowed: a finite number >= 0\)'),
    (_set(('optimizer', 'param_groups', 0, 'lr'), np.float64('inf')), r'param_groups\[0\]\.lr is .*inf'),
    (_set(('optimizer', 'param_groups', 0, 'lr'), -1.), r'param_groups\[0\]\.lr is -1\.0'),
    (_set(('optimizer', 'param_groups', 0, 'eps'), 'small'), r"param_groups\[0\]\.eps is 'small'"),
    (_set(('optimizer', 'param_groups', 0, 'params'), [0, 0, 2, 3, 4, 5]), 'list a parameter id more than once'),
])
def test_optimizer_state_that_does_not_fit_is_refused_naming_the_file_and_field(tmp_path, damage, message):
  path = tmp_path / 'ckpt.pth'
  saved = _saved(_state(0))
  damage(saved)
  torch.save(saved, path)
  fresh, reference = _state(1), _state(1)
  with pytest.raises(checkpoints.CheckpointError) as info:
    utils.restore_checkpoint(str(path), fresh, 'cpu')
  text = str(info.value)
  assert text.startswith(f"Checkpoint '{path}' has an optimizer state that does not fit") and '\n' not in text
  assert re.search(message, text), text
  _assert_same_state(fresh, reference)  # nothing was loaded


@pytest.mark.parametrize('step', [np.int64(7), np.int32(7), np.uint16(7), torch.tensor(7),
                                  torch.tensor(7, dtype=torch.int32)],
                         ids=['np.int64', 'np.int32', 'np.uint16', 'tensor int64', 'tensor int32'])
def test_an_integer_step_of_any_numeric_type_restores_as_an_int(tmp_path, step):
  path = tmp_path / 'ckpt.pth'
  saved = _saved(_state(0))
  saved['step'] = step
  torch.save(saved, path)
  restored = utils.restore_checkpoint(str(path), _state(1, trained=False), 'cpu')
  assert restored['step'] == 7 and type(restored['step']) is int  # saved again as Score SDE saves it
  utils.save_checkpoint(str(path), restored)
  assert type(checkpoints.load_checkpoint_file(path)['step']) is int


@pytest.mark.parametrize('step', [torch.tensor(7.), torch.tensor([7]), np.float64(7.), torch.tensor(True)])
def test_a_step_that_is_not_an_integer_is_refused(tmp_path, step):
  path = tmp_path / 'ckpt.pth'
  saved = _saved(_state(0))
  saved['step'] = step
  torch.save(saved, path)
  with pytest.raises(checkpoints.CheckpointError, match=r"entry 'step' is .*, not an integer >= 0"):
    utils.restore_checkpoint(str(path), _state(1, trained=False), 'cpu')


# A checkpoint of `_state(0)` is about 11 KB: a disk full from the start fails at the first write under Python's
# 8 KiB buffer, one full after 9000 bytes in the middle of torch.save (its RuntimeError wraps the OSError).
@pytest.mark.parametrize('limit', [0, 9000])
def test_a_full_disk_is_one_line_naming_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch, limit):
  path = tmp_path / 'checkpoints' / 'checkpoint_3.pth'
  utils.save_checkpoint(str(path), _state(0))
  before = path.read_bytes()
  full_disk.install(monkeypatch, limit)
  with pytest.raises(OSError) as info:
    utils.save_checkpoint(str(path), _state(5))
  monkeypatch.undo()
  assert isinstance(info.value, checkpoints.WriteError) and info.value.errno == errno.ENOSPC
  assert str(info.value) == f'Cannot write checkpoint {path}: [Errno 28] No space left on device'
  assert info.value.filename == str(path)
  assert path.read_bytes() == before and os.listdir(path.parent) == ['checkpoint_3.pth']  # no temporary file


@pytest.mark.parametrize('writer', [np.savez, np.savez_compressed])
def test_a_full_disk_while_writing_an_npz_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, writer):
  path = tmp_path / 'eval' / 'ckpt_1_loss.npz'
  unraisable = []
  monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
  full_disk.install(monkeypatch, 20000)
  with pytest.raises(checkpoints.WriteError) as info:
    with checkpoints.atomic_write(path) as f:
      writer(f, all_losses=np.random.default_rng(0).random(100000))
  assert str(info.value) == f'Cannot write {path}: [Errno 28] No space left on device'
  assert os.listdir(path.parent) == []
  # np.savez leaves its ZipFile behind in the failed frame: freed, it must not print 'Exception ignored ... seek of
  # closed file' under the one-line error.
  del info
  gc.collect()
  assert not unraisable, [str(u.exc_value) for u in unraisable]


def test_errors_that_no_os_error_caused_pass_unchanged(tmp_path):
  with pytest.raises(TypeError, match='not picklable'):
    with checkpoints.atomic_write(tmp_path / 'x.pth') as f:
      raise TypeError('not picklable')
  assert os.listdir(tmp_path) == []
