"""TensorFlow, kept off the GPUs.

TensorFlow grabs (nearly) all GPU memory when it first touches a GPU. The data pipelines (`datasets.py`) and
the Inception network (`evaluation.py`) run on the CPU and leave every byte of GPU memory to PyTorch, so both
import TensorFlow through `import_tensorflow`, which hides the GPUs before any TF op runs. Importing this module
does not import TensorFlow (the GPU machine has none: models, losses and benchmarks must import without it).
"""

import logging

_TF_GPUS_HIDDEN = False


def import_tensorflow():
  """Imports TensorFlow with every GPU hidden from it, and returns the module.

  The first call does the hiding; later calls only return the module.

  Returns:
    The `tensorflow` module.
  """
  global _TF_GPUS_HIDDEN
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (lazy: TensorFlow takes seconds to import)
  if not _TF_GPUS_HIDDEN:
    try:
      tf.config.set_visible_devices([], 'GPU')
    except RuntimeError as e:
      # TF raises once its devices are initialized (someone ran a TF op before us); nothing can be hidden now.
      logging.warning('Could not hide GPUs from TensorFlow (already initialized): %s', e)
    _TF_GPUS_HIDDEN = True
  return tf
