"""FP-Diffusion fine-tuning of a DIGITS checkpoint: `configs/fp/fp_finetuning.fine_tune` at the digits' scale.

The paper's setting (likelihood weighting, vector and scalar score-FPE terms, lambda = g^2, the released
estimators) on top of a pretraining config, with the schedule shrunk: `FINE_TUNING_STEPS` steps past the
pretraining's `training.n_iters`, one checkpoint at the end (the one `eval.begin_ckpt..end_ckpt` evaluates).
Put the pretrained checkpoint at `<workdir>/checkpoints-meta/checkpoint.pth`, as for any fine-tuning. `alpha`
and `beta` are the paper's; docs/study.md (DIGITS section) says how the study chose them for the digits.
"""

from configs.fp.fp_finetuning import fine_tune

FINE_TUNING_STEPS = 200


def digits_fine_tune(config):
  """Sets FP-Diffusion's fine-tuning values on a DIGITS pretraining config, in place; returns `config`."""
  pretrained_iters = config.training.n_iters
  config = fine_tune(config)
  training = config.training
  training.n_iters = pretrained_iters + FINE_TUNING_STEPS
  # One checkpoint, at the end: checkpoint_{n_iters // FINE_TUNING_STEPS}, the range fine_tune's eval reads.
  training.snapshot_freq = FINE_TUNING_STEPS
  training.snapshot_freq_for_preemption = 50
  training.log_freq = 50
  training.eval_freq = FINE_TUNING_STEPS
  # The DSM pretraining's batch (the paper's 48 is its CIFAR-10 batch per step, not a recipe for 8x8 digits).
  training.batch_size = 64
  # The FP terms (a double backward pass, ~8x a DSM step on CPU) on 16 of the 64 samples.
  training.fp_batch_fraction = 0.25
  return config
