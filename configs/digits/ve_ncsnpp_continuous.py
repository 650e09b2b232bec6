"""Small NCSN++ on DIGITS, VE SDE, continuous time: Score SDE's `ve/cifar10_ncsnpp_continuous.py` scaled down
(reverse-diffusion predictor + Langevin corrector)."""

from configs.digits.default_digits_configs import digits
from configs.ve.cifar10_ncsnpp_continuous import get_config as get_cifar10_config


def get_config():
  return digits(get_cifar10_config())
