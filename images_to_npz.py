"""Converts a folder of images into the `.npz` file of `data.dataset = 'NPZ'` (`datasets.images_to_npz`).

  python images_to_npz.py --images DIR --output data.npz --image_size 32
  python main.py --config configs/fp/cifar10_ve_ncsnpp_continuous.py --workdir W --mode train \
      --config.data.dataset=NPZ --config.data.path=data.npz

The file holds uint8 arrays `train` and `test` (N x H x W x C) and the names of their images. Without
`--test_images`, a random `--test_fraction` of the images (seeded) becomes the test split. Without
`--image_size`, the images must all be square and of one size; with it, each image's central square is
cropped and resized. See the README ("Your own data").
"""

import logging
import sys

from absl import app
from absl import flags

import datasets

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
  """The script's flags; defined only when run as a script (or by a test, on its own `FlagValues`), so that
  importing this module next to main.py does not add them to absl's global registry."""
  flags.DEFINE_string('images', None, 'The folder of images (subfolders included).', flag_values=flag_values)
  flags.DEFINE_string('output', None, 'The .npz file to write (config.data.path).', flag_values=flag_values)
  flags.DEFINE_integer('image_size', None, 'Crop the central square of each image and resize it to this size '
                       '(config.data.image_size). Unset: keep the images as they are (one square size).',
                       flag_values=flag_values)
  flags.DEFINE_string('test_images', None, 'A folder of test images. Unset: hold out --test_fraction of --images.',
                      flag_values=flag_values)
  flags.DEFINE_float('test_fraction', 0.1, 'The share of --images held out as the test split (without '
                     '--test_images).', flag_values=flag_values)
  flags.DEFINE_integer('seed', 0, 'The seed of the held-out draw.', flag_values=flag_values)
  flags.DEFINE_bool('grayscale', False, 'One channel (config.data.num_channels=1) instead of RGB.',
                    flag_values=flag_values)
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --output file.', flag_values=flag_values)
  flags.mark_flags_as_required(['images', 'output'], flag_values=flag_values)


def convert(flag_values=FLAGS):
  """Runs the conversion the parsed flags ask for; returns `datasets.images_to_npz`'s counts."""
  return datasets.images_to_npz(
      flag_values.images, flag_values.output, flag_values.image_size, test_dir=flag_values.test_images,
      test_fraction=flag_values.test_fraction, seed=flag_values.seed, grayscale=flag_values.grayscale,
      overwrite=flag_values.overwrite)


def main(argv):
  del argv
  logging.getLogger().setLevel('INFO')
  try:
    convert(FLAGS)
  except (ValueError, OSError) as e:
    # A bad folder, file or argument: one line naming it (exit status 1), not a traceback.
    sys.exit(f'images_to_npz: {e}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
