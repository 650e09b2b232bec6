"""The README's commands: every one is checked, and the research recipes are run at tiny size.

Checked (all bash blocks): each command is one this test knows (make, mkdir, cp, python main.py,
python images_to_npz.py, python -c); `make` targets exist; every `python main.py` / `images_to_npz.py` command
parses with the script's own flags, so every `--flag` exists, the `--config` file loads and every
`--config.X.Y=V` override names a real field of that config and has its type; every repository path exists; the
README's links point at files and headings that exist. LICENSE and CITATION.cff are checked too.

Run (in-process, in a temporary folder): every command of the sections `RUN_SECTIONS` (fine-tuning, the step
one-liner, baseline, evaluation, the comparison, FID, own data), in order, through `main.main` and `images_to_npz.convert`,
with `tests/configs_readme.py` (the tiny stand-in of the CIFAR-10 configs) for the CIFAR-10 configs, a tiny NPZ
data set for CIFAR-10, a tiny Inception SavedModel for TF-Hub's, and stand-ins for the downloaded files
(`checkpoint_26.pth`: a tiny checkpoint at step 2; `cifar10_stats.npz`: the tiny data's statistics). Only
checked: Quick start's `make demo` / `make test` (tests/test_demo.py runs the demo's quick mode; the suite is
`make test`) and the two plain commands of "Training and evaluation" (tests/test_main.py runs main.py's train
and eval modes).
"""

import contextlib
import functools
import logging
import os
import re
import shlex
import shutil

import numpy as np
import pytest
import yaml
from absl import flags
from ml_collections import config_flags
from PIL import Image

import checkpoints
import datasets
import evaluation
import images_to_npz
import likelihood
import main
import run_lib
import utils
from tests import configs_readme
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
STAND_IN_CONFIG = os.path.join(ROOT, 'tests', 'configs_readme.py')
# The README's configs -> their tiny stand-ins (configs/ve/... is trained from scratch: the DSM base).
TINY_CONFIGS = {
    'configs/fp/cifar10_vp_ddpmpp_continuous.py': STAND_IN_CONFIG,
    'configs/ve/cifar10_ncsnpp_continuous.py': STAND_IN_CONFIG + ':pretrain',
}
# The one CIFAR-10-sized number in the commands: the last fine-tuned snapshot (n_iters // 5000).
TINY_VALUES = {'280': str(configs_readme.PRETRAIN_STEPS + configs_readme.FINE_TUNING_STEPS), '32': '8'}
# Folders of the repository that a command may name.
REPO_DIRS = ('configs/', 'docs/', 'tests/', 'bench/', 'models/', 'op/')


def readme():
  with open(README) as f:
    return f.read()


def bash_blocks(text):
  """The bash code blocks of a markdown text (fences may be indented, inside list items)."""
  return [re.sub(r'^ {0,4}', '', body, flags=re.M)
          for body in re.findall(r'^ *```bash\n(.*?)^ *```', text, flags=re.M | re.S)]


def commands(block):
  """Each command of a bash block as an argv list: continuation lines joined, comments dropped."""
  commands = []
  for line in block.replace('\\\n', ' ').splitlines():
    argv = shlex.split(line, comments=True)
    if argv:
      commands.append(argv)
  return commands


# The README sections whose commands test_readme_recipes_run_at_tiny_size runs, in order.
RUN_SECTIONS = ('Fine-tune a released Score SDE checkpoint, and compare it with its baseline', 'NLL and FID',
                'Your own data')


def sections(text):
  """{heading: body} of the `## ` sections of a markdown text."""
  return dict(re.findall(r'^## (.*)\n((?:(?!^## ).*\n?)*)', text, flags=re.M))


def readme_commands(names=None):
  """The README's commands (of the given `## ` sections, in that order; of the whole README if None)."""
  if names is None:
    texts = [readme()]
  else:
    found = sections(readme())
    assert set(names) <= set(found), f'README sections missing: {set(names) - set(found)}'
    texts = [found[name] for name in names]
  return [argv for text in texts for block in bash_blocks(text) for argv in commands(block)]


def main_flag_values(argv):
  """A registry with main.py's flags, to parse `argv` as main.py does (config overrides read from `argv`)."""
  assert {f.name for f in flags.FLAGS.get_flags_for_module('main')} == {
      'config', 'workdir', 'mode', 'eval_folder', 'allow_outside_workdir', 'baseline_workdir', 'ckpt', 'baseline_ckpt',
      'traceback'}
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Training configuration.', flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string('workdir', None, '', flag_values=fv)
  flags.DEFINE_enum('mode', None, flags.FLAGS['mode'].parser.enum_values, '', flag_values=fv)
  flags.DEFINE_string('eval_folder', flags.FLAGS['eval_folder'].default, '', flag_values=fv)
  flags.DEFINE_bool('allow_outside_workdir', False, '', flag_values=fv)
  flags.DEFINE_string('baseline_workdir', None, '', flag_values=fv)
  flags.DEFINE_integer('ckpt', None, '', flag_values=fv)
  flags.DEFINE_integer('baseline_ckpt', None, '', flag_values=fv)
  flags.DEFINE_bool('traceback', False, '', flag_values=fv)
  flags.mark_flags_as_required(['workdir', 'config', 'mode'], flag_values=fv)
  return fv


def converter_flag_values():
  fv = flags.FlagValues()
  images_to_npz.define_flags(fv)
  return fv


def parse_python_command(argv):
  """Parses `python SCRIPT ARGS` with SCRIPT's flags; returns (script, parsed FlagValues or the code)."""
  assert argv[0] == 'python', argv
  if argv[1] == '-c':
    return '-c', compile(argv[2], '<README>', 'exec')
  script, args = argv[1], argv[2:]
  assert os.path.isfile(os.path.join(ROOT, script)), f'{script} does not exist'
  fv = {'main.py': main_flag_values, 'images_to_npz.py': lambda argv: converter_flag_values()}[script](argv)
  fv([script] + args)
  return script, fv


def repo_paths(argv):
  """The arguments that name files of the repository (scripts, configs, docs)."""
  paths = []
  for arg in argv:
    value = arg.split('=', 1)[1] if arg.startswith('--') and '=' in arg else arg
    value = value.split(':', 1)[0]
    if value.startswith(REPO_DIRS) or re.fullmatch(r'[\w/.-]+\.(py|md)', value):
      paths.append(value)
  return paths


def test_readme_commands_are_known_and_parse():
  commands = readme_commands()
  assert len(commands) >= 15  # the blocks were found
  with open(os.path.join(ROOT, 'Makefile')) as f:
    targets = set(re.findall(r'^([\w.-]+):', f.read(), flags=re.M))
  overrides = 0
  for argv in commands:
    assert argv[0] in ('make', 'mkdir', 'cp', 'python'), f'a README command this test does not check: {argv}'
    for path in repo_paths(argv):
      assert os.path.exists(os.path.join(ROOT, path)), f'{path} (in {shlex.join(argv)}) does not exist'
    if argv[0] == 'make':
      assert set(argv[1:]) <= targets, argv
    elif argv[0] == 'python':
      script, parsed = parse_python_command(argv)
      if script == 'main.py':
        overrides += sum(a.startswith('--config.') for a in argv)
        assert parsed.config.training.n_iters > 0  # the config loaded
  assert overrides >= 10


def test_quick_start_has_the_two_set_up_commands():
  quick_start = readme().split('## Quick start', 1)[1].split('\n## ', 1)[0]
  assert [argv for block in bash_blocks(quick_start) for argv in commands(block)] == [
      ['make', 'demo'], ['make', 'test']]


def test_the_checks_catch_mistakes():
  with pytest.raises(AttributeError, match='enable_bdp'):
    parse_python_command(shlex.split('python main.py --config configs/fp/cifar10_ve_ncsnpp_continuous.py '
                                     '--workdir W --mode eval --config.eval.enable_bdp=True'))
  with pytest.raises(flags.Error, match='eval_dir'):
    parse_python_command(shlex.split('python main.py --config configs/fp/cifar10_ve_ncsnpp_continuous.py '
                                     '--workdir W --mode eval --eval_dir e'))
  with pytest.raises(flags.Error):  # a field of the wrong type
    parse_python_command(shlex.split('python main.py --config configs/fp/cifar10_ve_ncsnpp_continuous.py '
                                     '--workdir W --mode eval --config.eval.begin_ckpt=last'))
  with pytest.raises(flags.Error, match='test_dir'):
    parse_python_command(shlex.split('python images_to_npz.py --images d --output o.npz --test_dir t'))
  assert repo_paths(['--config', 'configs/fp/nope.py', 'W/x.pth', '--config=tests/configs_tiny.py:toy']) == [
      'configs/fp/nope.py', 'tests/configs_tiny.py']


def github_anchor(heading):
  """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces -> hyphens."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def test_readme_links_and_anchors_exist():
  links = re.findall(r'\]\(([^)\s]+)\)', readme())
  local = [link for link in links if not re.match(r'https?://', link)]
  assert 'docs/workflow.md#4-multi-gpu-torchrun-mixed-precision-gradient-accumulation-compile' in local
  for link in local:
    path, _, anchor = link.partition('#')
    assert os.path.exists(os.path.join(ROOT, path)), link
    if anchor:
      with open(os.path.join(ROOT, path)) as f:
        headings = re.findall(r'^#+ (.*)$', f.read(), flags=re.M)
      assert anchor in {github_anchor(h) for h in headings}, link
  assert github_anchor('3. Evaluate: NLL (bits/dim), FID/IS/KID') == '3-evaluate-nll-bitsdim-fidiskid'


def test_license_and_citation():
  with open(os.path.join(ROOT, 'LICENSE')) as f:
    license_text = f.read()
  assert 'Apache License' in license_text and 'Version 2.0, January 2004' in license_text
  assert 'END OF TERMS AND CONDITIONS' in license_text
  with open(os.path.join(ROOT, 'CITATION.cff')) as f:
    cff = yaml.safe_load(f)
  # CFF 1.2.0's required keys, and the two papers with authors, venue and year.
  assert cff['cff-version'] == '1.2.0' and cff['license'] == 'Apache-2.0'
  assert {'authors', 'message', 'title'} <= set(cff)
  papers = {ref['title'].split(':')[0]: ref for ref in cff['references']}
  assert set(papers) == {'Score-Based Generative Modeling through Stochastic Differential Equations',
                         'FP-Diffusion'}
  score_sde = papers['Score-Based Generative Modeling through Stochastic Differential Equations']
  fp = papers['FP-Diffusion']
  assert (score_sde['year'], fp['year']) == (2021, 2023)
  assert 'ICLR' in score_sde['conference']['name'] and 'ICML' in fp['conference']['name']
  assert score_sde['authors'][0]['family-names'] == 'Song' and fp['authors'][0]['family-names'] == 'Lai'
  for ref in cff['references']:
    assert ref['type'] == 'conference-paper' and len(ref['authors']) == 6
    assert all(set(a) == {'given-names', 'family-names'} for a in ref['authors'])


# ------------------------------------------------------------------------------------------------------------
# The recipes, run.
# ------------------------------------------------------------------------------------------------------------


def _tiny_argv(argv, extra):
  """A README main.py command with the tiny configs and values, plus the overrides that stand in for
  downloads (`extra`, for the fields the command does not set itself)."""
  out = []
  for arg in argv:
    arg = TINY_CONFIGS.get(arg, arg)
    name, eq, value = arg.partition('=')
    out.append(name + eq + TINY_VALUES.get(value, value) if eq else TINY_VALUES.get(arg, arg))
  given = {a.split('=', 1)[0] for a in argv}
  return out + [f'{k}={v}' for k, v in extra.items() if k not in given]


@contextlib.contextmanager
def restored_logging():
  """main.main adds a file handler to the root logger (W/stdout.txt) and never removes it (a process runs one
  command); remove it after each command, as the end of the process would."""
  logger = logging.getLogger()
  handlers, level = list(logger.handlers), logger.level
  try:
    yield
  finally:
    for handler in logger.handlers[:]:
      if handler not in handlers:
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(level)


def _stand_in_overrides(argv, data, inception):
  """What a README main.py command gets besides the tiny config: the Inception module, and, unless it reads
  the user's own data, the stand-ins of CIFAR-10 and of the statistics file copied into assets/stats/ (the
  repository's assets/ is not written by tests)."""
  extra = {'--config.eval.inception_model': inception}
  if not any(a.startswith('--config.data.') for a in argv):
    extra.update({'--config.data.path': data, '--config.eval.stats_path': 'assets/stats/cifar10_stats.npz'})
  return extra


def _run(argv, extra, monkeypatch, capsys):
  """Runs one README command in-process, in the current (temporary) folder."""
  if argv[0] == 'mkdir':
    for folder in argv[1:]:
      if not folder.startswith('-'):
        os.makedirs(folder, exist_ok=True)
  elif argv[0] == 'cp':
    shutil.copy(argv[1], argv[2])
  elif argv[1] == '-c':
    capsys.readouterr()
    exec(compile(argv[2], '<README>', 'exec'), {})  # pylint: disable=exec-used
    return capsys.readouterr().out
  elif argv[1] == 'images_to_npz.py':
    fv = converter_flag_values()
    fv(['images_to_npz.py'] + _tiny_argv(argv[2:], {}))
    images_to_npz.convert(fv)
  else:
    tiny = _tiny_argv(argv, extra)
    fv = main_flag_values(tiny)
    fv(['main.py'] + tiny[2:])
    monkeypatch.setattr(main, 'FLAGS', fv)
    with restored_logging():
      main.main(['main.py'])
  return None


def _stand_ins(tmp_path):
  """The downloads, at tiny size: CIFAR-10 (an NPZ file), the Inception module, a released checkpoint (the tiny
  base config's state, saved at step 2), Score SDE's statistics file, and a folder of the user's images."""
  data = helpers.write_npz(tmp_path / 'tiny_cifar10.npz')
  inception = helpers.save_tiny_inception(str(tmp_path / 'inception'))
  config = configs_readme.get_config('pretrain')
  config.data.path = data
  config.eval.inception_model = inception
  # The released checkpoint: Score SDE's format at a step of its own (its weights do not matter here).
  state = run_lib.build_state(config)  # pylint: disable=protected-access
  state['step'] = configs_readme.PRETRAIN_STEPS
  utils.save_checkpoint('checkpoint_26.pth', state)
  datasets.compute_dataset_stats(config, 'cifar10_stats.npz')
  rng = np.random.default_rng(0)
  os.makedirs('my_images')
  for i in range(20):
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(f'my_images/{i}.png')
  return data, inception


def _eval_files(folder, ckpt):
  """The result files of one checkpoint's evaluation, with the checkpoint number replaced by K."""
  names = [n for n in os.listdir(folder) if not n.startswith('compare_')]  # the comparison's, not evaluate's
  return sorted(re.sub(rf'(?<![0-9]){ckpt}(?![0-9])', 'K', n) for n in names
                if re.search(rf'(?<![0-9]){ckpt}(?![0-9])', n))


def test_readme_recipes_run_at_tiny_size(tmp_path, monkeypatch, capsys, caplog):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(checkpoints, 'CHECKPOINT_WAIT_LIMIT_SECONDS', 0.)
  # The probability-flow ODE of bits/dim to 1e-2 instead of Score SDE's 1e-5: tens of network passes fewer. The
  # recipes' plumbing is under test here, the NLL's accuracy in tests/test_likelihood.py.
  monkeypatch.setattr(likelihood, 'get_likelihood_fn',
                      functools.partial(likelihood.get_likelihood_fn, rtol=1e-2, atol=1e-2))
  caplog.set_level(logging.INFO)
  data, inception = _stand_ins(tmp_path)
  printed = []
  for argv in readme_commands(RUN_SECTIONS):
    if argv[0] == 'cp' and argv[2].startswith('assets/'):
      # Score SDE's statistics file goes into the repository's assets/stats/; here, into the temporary folder.
      assert argv[2] == os.path.relpath(evaluation.default_stats_path(configs_readme_cifar10()), ROOT)
    printed.append(_run(argv, _stand_in_overrides(argv, data, inception), monkeypatch, capsys))

  first, last = configs_readme.PRETRAIN_STEPS + 1, configs_readme.PRETRAIN_STEPS + configs_readme.FINE_TUNING_STEPS
  # The step one-liner printed the released checkpoint's step.
  assert [p for p in printed if p is not None] == [f'{configs_readme.PRETRAIN_STEPS}\n']
  # Fine-tuning resumed from the released checkpoint and wrote the fine-tuned snapshots.
  assert f'Resuming from W/checkpoints-meta/checkpoint.pth at step {configs_readme.PRETRAIN_STEPS}' in caplog.text
  for k in range(first, last + 1):
    assert int(checkpoints.load_checkpoint_file(f'W/checkpoints/checkpoint_{k}.pth')['step']) == k
  # The baseline and the fine-tuned snapshots went through the same evaluation: the same result files.
  baseline = _eval_files('B/eval', 26)
  assert baseline == ['ckpt_K_fp_residual.npz', 'ckpt_K_loss.npz', 'test_ckpt_K_bpd_0.npz']
  for k in range(first, last + 1):
    assert _eval_files('W/eval', k) == baseline
  assert 'ckpt: 26 (step 2) loaded from B/checkpoints/checkpoint_26.pth' in caplog.text
  # The comparison of W's last evaluated snapshot with the baseline, paired batch by batch.
  with open(f'W/eval/compare_{last}_vs_26.txt') as f:
    table = f.read()
  assert 'test bits/dim' in table and '(paired, ' in table and 'residual (mean over t)' in table
  assert os.path.exists(f'W/eval/compare_{last}_vs_26.png')
  with np.load('B/eval/test_ckpt_26_bpd_0.npz') as f:
    assert np.all(np.isfinite(f['arr_0']))
  # FID of the last snapshot, against the statistics file copied into assets/stats/.
  with np.load(f'W/eval_fid/report_{last}.npz') as report:
    assert np.isfinite(report['fid']) and report['fid'] > 0
  assert sorted(os.listdir('W/eval_fid')) == [f'ckpt_{last}', f'report_{last}.npz']
  # Own data: converted, trained on, and its statistics written beside it.
  with np.load('my_data.npz') as f:
    assert f['train'].shape == (18, 8, 8, 3) and f['test'].shape == (2, 8, 8, 3)
  assert int(checkpoints.load_checkpoint_file(f'OWN/checkpoints/checkpoint_{configs_readme.PRETRAIN_STEPS}.pth')[
      'step']) == configs_readme.PRETRAIN_STEPS
  with np.load('my_data_stats.npz') as f:
    assert f['pool_3'].shape == (18, 4)


def configs_readme_cifar10():
  """The CIFAR-10 config of the README's FID command (for its statistics file's default name)."""
  from configs.fp import cifar10_vp_ddpmpp_continuous  # pylint: disable=g-import-not-at-top
  return cifar10_vp_ddpmpp_continuous.get_config()


def test_n_iters_at_the_checkpoint_step_trains_nothing(tmp_path, monkeypatch, caplog):
  """The README's rule: training.n_iters must exceed the checkpoint's step."""
  monkeypatch.chdir(tmp_path)
  caplog.set_level(logging.INFO)
  state = run_lib.build_state(configs_readme.get_config('pretrain'))  # pylint: disable=protected-access
  state['step'] = configs_readme.PRETRAIN_STEPS
  utils.save_checkpoint('W/checkpoints-meta/checkpoint.pth', state)
  config = configs_readme.get_config()
  config.data.path = helpers.write_npz(tmp_path / 'd.npz')
  config.training.n_iters = configs_readme.PRETRAIN_STEPS
  run_lib.train(config, 'W')
  assert 'at or past training.n_iters=2: nothing to train' in caplog.text
  assert not os.path.exists('W/checkpoints/checkpoint_3.pth')
