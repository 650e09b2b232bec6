"""docs/workflow.md's "A small run on the CPU", run as written (in-process, in a temporary folder, on a folder of
random images standing in for the user's): the commands parse, train with loss lines, write the checkpoints the
section names and evaluate them with bits/dim."""

import functools
import logging
import os
import re

import numpy as np
from PIL import Image

import checkpoints
import images_to_npz
import likelihood
import main
from tests import test_readme

WORKFLOW = os.path.join(test_readme.ROOT, 'docs', 'workflow.md')
SECTION = 'A small run on the CPU'


def section_commands():
  with open(WORKFLOW) as f:
    text = f.read()
  body = test_readme.sections(text)[SECTION]  # pylint: disable=protected-access
  return [argv for block in test_readme.bash_blocks(body)  # pylint: disable=protected-access
          for argv in test_readme.commands(block)]  # pylint: disable=protected-access


def test_the_section_is_linked_from_the_readme():
  anchor = test_readme.github_anchor(SECTION)  # pylint: disable=protected-access
  assert f'docs/workflow.md#{anchor}' in test_readme.readme()  # pylint: disable=protected-access


def test_small_run_recipe_runs(tmp_path, monkeypatch, caplog):
  monkeypatch.chdir(tmp_path)
  # The ODE of bits/dim to 1e-2: the recipe's plumbing is under test here, the NLL's accuracy in test_likelihood.
  monkeypatch.setattr(likelihood, 'get_likelihood_fn',
                      functools.partial(likelihood.get_likelihood_fn, rtol=1e-2, atol=1e-2))
  caplog.set_level(logging.INFO)
  rng = np.random.default_rng(0)
  os.makedirs('my_images')
  for i in range(80):  # 72 training and 8 test images: the recipe's batch sizes fit
    Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(f'my_images/{i}.png')
  commands = section_commands()
  assert [argv[:2] for argv in commands] == [['python', 'images_to_npz.py']] + [['python', 'main.py']] * 2
  for argv in commands:
    for path in test_readme.repo_paths(argv):  # pylint: disable=protected-access
      assert os.path.exists(os.path.join(test_readme.ROOT, path)), path
    argv = [os.path.join(test_readme.ROOT, a) if a.startswith('configs/') else a for a in argv]
    if argv[1] == 'images_to_npz.py':
      fv = test_readme.converter_flag_values()  # pylint: disable=protected-access
      fv(argv[1:])
      images_to_npz.convert(fv)
      continue
    fv = test_readme.main_flag_values(argv)  # pylint: disable=protected-access
    fv(argv[1:])
    monkeypatch.setattr(main, 'FLAGS', fv)
    with test_readme.restored_logging():  # pylint: disable=protected-access
      main.main(['main.py'])
  # Loss lines every 5 steps; checkpoints k = step // snapshot_freq at steps 10 and 20, as the section says.
  assert [int(s) for s in re.findall(r'step: (\d+), training_loss', caplog.text)] == [5, 10, 15, 20]
  assert sorted(os.listdir('SMALL/checkpoints')) == ['checkpoint_1.pth', 'checkpoint_2.pth']
  assert [int(checkpoints.load_checkpoint_file(f'SMALL/checkpoints/checkpoint_{k}.pth')['step']) for k in (1, 2)] == [
      10, 20]
  # Both evaluated, with two bits/dim passes of the one test batch.
  assert sorted(os.listdir('SMALL/eval')) == ['ckpt_1_loss.npz', 'ckpt_2_loss.npz', 'test_ckpt_1_bpd_0.npz',
                                              'test_ckpt_1_bpd_1.npz', 'test_ckpt_2_bpd_0.npz',
                                              'test_ckpt_2_bpd_1.npz']
  assert 'ckpt: 2, test bits/dim over 2 repeats:' in caplog.text
