r"""Self-configuring training: a fingerprint of the data set, then a plan made by rules.

    fp = planning.fingerprint(data)      # data = input_pipeline.open(...); cached
    p = planning.plan(fp, memory_budget='2GiB', time_budget=300, step_time=0.4)
    print(planning.format_table(p))      # field, value, who set it, reason
    config = planning.apply(config, p)   # the config with the plan's values

or, from the shell, without training:

    python -m unet_jax.planning --root=/path/to/my_data [--config=3d]

After nnU-Net (Isensee et al., 2021). The modules, each importing only those
before it (and models and data; never train):

* `fingerprint.py`: `Fingerprint`, read from a data set's raw train examples and
  cached beside the built data set; `resampled_shape` and `resampled`, the cases
  at another voxel spacing.
* `topology.py`: pooling windows and kernels per axis and level.
* `rules.py`: the rules that turn a fingerprint into config choices (target
  spacing, input or patch size, batch, normalisation, augmentation, loss, steps),
  documented there, once.
* `plan.py`: `Plan`, `plan`, `apply`, the table and plan.json.
* `__main__.py`: the command line.

Training plans through `unet_jax.train.setup.plan_run`, which also measures the
step time and checks the planned config.

The functions `fingerprint`, `topology` and `plan` share their names with the
modules that hold them: `planning.plan` is the function. To reach a module, import
from it by its full name (`from unet_jax.planning.plan import ...`).
"""

from unet_jax.planning.fingerprint import Fingerprint
from unet_jax.planning.fingerprint import fingerprint
from unet_jax.planning.fingerprint import fingerprint_examples
from unet_jax.planning.fingerprint import FORMAT_VERSION
from unet_jax.planning.fingerprint import resampled
from unet_jax.planning.fingerprint import resampled_shape
from unet_jax.planning.fingerprint import SAMPLES_PER_CASE
from unet_jax.planning.plan import apply
from unet_jax.planning.plan import fixed_fields
from unet_jax.planning.plan import format_fingerprint
from unet_jax.planning.plan import format_table
from unet_jax.planning.plan import has_field
from unet_jax.planning.plan import NETWORK_FIELDS
from unet_jax.planning.plan import Plan
from unet_jax.planning.plan import plan
from unet_jax.planning.plan import PLAN_FILE
from unet_jax.planning.plan import read_plan
from unet_jax.planning.plan import reused
from unet_jax.planning.plan import write_plan
from unet_jax.planning.rules import ANISOTROPY
from unet_jax.planning.rules import Choice
from unet_jax.planning.rules import CT_MIN_VALUE
from unet_jax.planning.rules import MIN_FEATURES
from unet_jax.planning.rules import MIN_PATCH_SIDE
from unet_jax.planning.rules import MIN_STEPS
from unet_jax.planning.rules import RARE_CLASS
from unet_jax.planning.topology import MAX_DEPTH
from unet_jax.planning.topology import MIN_POOL_SIZE
from unet_jax.planning.topology import topology

__all__ = [
  'ANISOTROPY',
  'apply',
  'Choice',
  'CT_MIN_VALUE',
  'fingerprint',
  'fingerprint_examples',
  'Fingerprint',
  'fixed_fields',
  'FORMAT_VERSION',
  'format_fingerprint',
  'format_table',
  'has_field',
  'MAX_DEPTH',
  'MIN_FEATURES',
  'MIN_PATCH_SIDE',
  'MIN_POOL_SIZE',
  'MIN_STEPS',
  'NETWORK_FIELDS',
  'plan',
  'Plan',
  'PLAN_FILE',
  'RARE_CLASS',
  'read_plan',
  'reused',
  'resampled',
  'resampled_shape',
  'SAMPLES_PER_CASE',
  'topology',
  'write_plan',
]
