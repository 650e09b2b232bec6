"""Score models. Importing the package registers every architecture with `models.utils.register_model`."""

# One import per architecture module; each registers its names on import.
from . import ddpm  # noqa: F401  ('ddpm')
from . import ncsnpp  # noqa: F401  ('ncsnpp': NCSN++ and DDPM++)
from . import ncsnv2  # noqa: F401  ('ncsn', 'ncsnv2_64', 'ncsnv2_128', 'ncsnv2_256')
from . import mlp  # noqa: F401  ('mlp': the 2-D demo's MLP)
