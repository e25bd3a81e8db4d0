"""Tests for unet_jax.config: each section read once, one default per field."""

import importlib
import json

import ml_collections
import numpy as np
import pytest

from unet_jax import config as config_lib

SECTIONS = {
  'data': config_lib.DataOptions,
  'augment': config_lib.AugmentOptions,
  'optimizer': config_lib.OptimizerOptions,
  'loss': config_lib.LossOptions,
}


def _default():
  return importlib.import_module('configs.default').get_config()


@pytest.mark.parametrize('section', sorted(SECTIONS))
def test_the_default_config_holds_every_field_at_its_options_default(section):
  cls = SECTIONS[section]
  config = _default()
  assert config[section].to_dict() == cls().to_config().to_dict()
  assert cls.from_config(config[section]) == cls()


@pytest.mark.parametrize('section', sorted(SECTIONS))
def test_a_missing_field_gets_the_documented_default(section):
  cls = SECTIONS[section]
  documented = _default()[section]
  for field in documented.keys():
    partial = ml_collections.ConfigDict(documented.to_dict())
    del partial[field]
    assert cls.from_config(partial) == cls.from_config(documented), field


def test_missing_flip_rot90_and_foreground_fraction_take_the_config_defaults():
  augment = config_lib.AugmentOptions.from_config({'scale': (1.0, 1.0)})
  assert augment.flip and augment.rot90
  data = config_lib.DataOptions.from_config({'name': 'synthetic_volumes'})
  assert data.foreground_fraction == pytest.approx(1 / 3)
  assert data.size_policy == 'pad' and data.ignore_index is None
  run = config_lib.RunOptions.from_config({'data': {'name': 'synthetic_shapes'}})
  assert run.augment.flip and run.data.foreground_fraction == pytest.approx(1 / 3)


@pytest.mark.parametrize('section', sorted(SECTIONS))
def test_unknown_fields_are_refused_naming_them(section):
  cls = SECTIONS[section]
  config = _default()[section]
  config.unknown_b = 1
  config.unknown_a = 2
  with pytest.raises(
    ValueError,
    match=rf"config.{section} has unknown field\(s\) \['unknown_a', 'unknown_b'\]",
  ):
    cls.from_config(config)


def test_unknown_fields_of_a_run_section_are_refused():
  config = _default()
  config.augment.flips = True
  with pytest.raises(
    ValueError, match=r"config.augment has unknown field\(s\) \['flips'\]"
  ):
    config_lib.RunOptions.from_config(config)


def test_one_normalisation_mode_per_channel():
  data = config_lib.DataOptions.from_config(
    {
      'normalization': 'ct, none',
      'intensity_low': (-100, 5),  # The 'none' channel's values are not used:
      'intensity_high': (300, 1),  # high below low there is no error.
      'intensity_mean': (40, 0),
      'intensity_std': (80, 0),
    }
  )
  assert data.normalization_modes() == ('ct', 'none')
  assert config_lib.DataOptions(normalization='minmax').normalization_modes() == ('minmax',)


def test_the_config_form_is_parsed_once():
  data = config_lib.DataOptions.from_config(
    {
      'ignore_index': 255,
      'image_size': [64, 48],
      'patch_size': 32,
      'mask_colors': [[0, 0, 0], [255, 0, 0]],
      'normalization': 'ct',
      'intensity_low': -100,
      'intensity_high': [300],
      'intensity_mean': 40.0,
      'intensity_std': 80.0,
    }
  )
  assert data.ignore_index == 255
  assert data.image_shape(2) == (64, 48) and data.patch_shape(3) == (32, 32, 32)
  assert data.mask_colors == ((0, 0, 0), (255, 0, 0))
  assert data.intensity_low == (-100.0,) and data.intensity_high == (300.0,)
  np.testing.assert_array_equal(data.intensity_values('std'), [80.0])
  unset = config_lib.DataOptions.from_config({'ignore_index': -1, 'image_size': 0})
  assert unset.ignore_index is None and unset.image_shape(2) is None
  # Back to the config's own form: -1 for no ignore value.
  assert unset.to_config().ignore_index == -1
  assert config_lib.DataOptions.from_config(data.to_config()) == data


@pytest.mark.parametrize(
  'cls, values, match',
  [
    (config_lib.DataOptions, {'size_policy': 'stretch'}, 'size_policy must be one of'),
    (config_lib.DataOptions, {'foreground_fraction': 1.5}, 'foreground_fraction'),
    (config_lib.DataOptions, {'normalization': 'bogus'}, "normalization='bogus'"),
    (
      config_lib.DataOptions,
      {'normalization': 'ct,bogus'},
      "normalization='ct,bogus': the entry 'bogus' is not one of",
    ),
    (
      config_lib.DataOptions,
      {'normalization': 'zscore,ct', 'intensity_low': 0, 'intensity_high': 1},
      'needs config.data.intensity_mean',
    ),
    (
      config_lib.DataOptions,
      {
        'normalization': 'ct,none',
        'intensity_low': (0, 0, 0),
        'intensity_high': 1,
        'intensity_mean': 0,
        'intensity_std': 1,
      },
      'intensity_low has 3 values, .* give 1 value or 2',
    ),
    (
      config_lib.DataOptions,
      {
        'normalization': 'none,ct',
        'intensity_low': (0, 5),
        'intensity_high': (1, 1),
        'intensity_mean': 0,
        'intensity_std': 1,
      },
      'must be above',
    ),
    (config_lib.DataOptions, {'normalization': 'ct'}, 'needs config.data.intensity_low'),
    (
      config_lib.DataOptions,
      {'normalization': 'rescale', 'intensity_low': 1, 'intensity_high': 0},
      'must be above',
    ),
    (config_lib.AugmentOptions, {'scale': (1.2, 0.8)}, 'scale must be'),
    (config_lib.AugmentOptions, {'elastic': -1.0}, 'elastic must be >= 0'),
    (config_lib.AugmentOptions, {'elastic_grid': 1}, 'elastic_grid'),
    (config_lib.AugmentOptions, {'flip_axes': (3,)}, 'flip_axes'),
    (config_lib.OptimizerOptions, {'name': 'lamb'}, r"optimizer.name='lamb'.*adam"),
    (config_lib.OptimizerOptions, {'schedule': 'step'}, 'optimizer.schedule'),
    (config_lib.OptimizerOptions, {'learning_rate': 0.0}, 'learning_rate'),
    (config_lib.LossOptions, {'kwargs': {'ignore_index': 3}}, 'data.ignore_index'),
    (config_lib.RunOptions, {'parallelism': 'pjit'}, 'parallelism'),
    (config_lib.RunOptions, {'best_mode': 'median'}, 'best_mode'),
    (config_lib.RunOptions, {'eval_batch_size': 0}, 'eval_batch_size must be positive'),
  ],
)
def test_bad_values_raise_naming_the_field(cls, values, match):
  with pytest.raises(ValueError, match=match):
    cls.from_config(values)


def test_a_missing_eval_field_gets_the_documented_default():
  documented = _default().evals.eval
  for field in ('split', 'batch_size', 'patch_size', 'overlap', 'samples'):
    partial = ml_collections.ConfigDict(documented.to_dict())
    del partial[field]
    assert config_lib.EvalOptions.from_config(
      partial
    ) == config_lib.EvalOptions.from_config(documented), field


def test_eval_options_keep_the_type_specific_extras():
  config = _default()
  options = config_lib.EvalOptions.from_config(config.evals.eval, name='eval')
  assert options.type == 'confusion' and options.samples == 4 and options.extras == {}
  assert options.every_steps == config.eval_every_steps  # A reference, resolved.
  assert options.split == '' and options.batch_size == 0 and options.overlap == 0.5
  boundary = config_lib.EvalOptions.from_config(
    {'type': 'boundary', 'every_steps': 5, 'tolerance': 2.0, 'patch_size': [8, 16]},
    name='b',
  )
  assert boundary.extras == {'tolerance': 2.0} and boundary.patch_size == (8, 16)
  assert boundary.to_config().to_dict() == {
    'type': 'boundary',
    'split': '',
    'every_steps': 5,
    'batch_size': 0,
    'patch_size': (8, 16),
    'overlap': 0.5,
    'samples': 4,
    'tolerance': 2.0,
  }
  with pytest.raises(ValueError, match='config.evals.b.every_steps must be positive'):
    config_lib.EvalOptions.from_config({'type': 'boundary', 'every_steps': 0}, name='b')


@pytest.mark.parametrize(
  'value, ndim, expected',
  [(4, 2, (4, 4)), ((2, 4, 8), 3, (2, 4, 8)), (np.int64(3), 1, (3,))],
)
def test_per_axis(value, ndim, expected):
  assert config_lib.per_axis(value, ndim, 'x') == expected


@pytest.mark.parametrize(
  'value, match',
  [
    ((8, 8, 8), r'x=\(8, 8, 8\) has 3 entries, but the image has 2 spatial axes'),
    (0, 'must hold positive integers'),
    ((4, True), 'must hold positive integers'),
    (None, 'must be an int or 2 ints'),
  ],
)
def test_per_axis_refuses(value, match):
  with pytest.raises(ValueError, match=match):
    config_lib.per_axis(value, 2, 'x', of='the image')


def test_a_record_written_before_the_options_reads_back():
  """A checkpoint's config record (today's fields, JSON) gives the same options."""
  config = _default()
  record = json.loads(config.to_json_best_effort())
  assert config_lib.RunOptions.from_config(record) == config_lib.RunOptions.from_config(
    config
  )
  # A record that predates `normalization` and the intensity fields.
  for field in ('normalization', 'intensity_low', 'intensity_high'):
    del record['data'][field]
  assert config_lib.RunOptions.from_config(record).data.normalization == 'zscore'


def test_command_line_overrides_reach_every_section_field():
  config = _default()
  for section, cls in SECTIONS.items():
    for field in cls().to_config().keys():
      assert field in config[section], (section, field)
  config.augment.flip = False
  config.data.ignore_index = 255
  run = config_lib.RunOptions.from_config(config)
  assert not run.augment.flip and run.data.ignore_index == 255


def test_the_choices_agree_with_the_modules_that_use_them():
  from unet_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from unet_jax.ops import policy  # pylint: disable=g-import-not-at-top
  from unet_jax.train import runner  # pylint: disable=g-import-not-at-top

  assert config_lib.PARALLELISM == runner.MODES
  assert config_lib.KERNELS == policy.NAMES
  assert config_lib.SIZE_POLICIES == pipeline.SIZE_POLICIES
  assert config_lib.NORMALIZATIONS == pipeline.NORMALIZATIONS


def test_kernels_is_a_checked_run_field():
  assert config_lib.RunOptions.from_config(ml_collections.ConfigDict()).kernels == 'auto'
  with pytest.raises(ValueError, match=r"config.kernels='fast' is not one of"):
    config_lib.RunOptions.from_config(ml_collections.ConfigDict({'kernels': 'fast'}))


def test_plan_options_defaults_round_trip_and_checks():
  assert config_lib.PlanOptions.from_config(ml_collections.ConfigDict()) == (
    config_lib.PlanOptions(plan=False, plan_keep=(), plan_time_budget=0.0)
  )
  folder = importlib.import_module('configs.folder').get_config()
  options = config_lib.PlanOptions.from_config(folder)
  assert options.plan and options.plan_memory_budget == '2GiB'
  assert config_lib.PlanOptions.from_config(options.to_config()) == options
  folder.plan_keep = ['batch_size']  # As launch.py sets it, a list.
  assert config_lib.PlanOptions.from_config(folder).plan_keep == ('batch_size',)
  with pytest.raises(ValueError, match=r'config.plan_time_budget must be >= 0, got -1.0'):
    config_lib.PlanOptions.from_config(ml_collections.ConfigDict({'plan_time_budget': -1}))


@pytest.mark.parametrize(
  'field, value, match',
  [
    ('learning_rate', float('nan'), r'learning_rate must be finite and positive, got nan'),
    ('learning_rate', 0.0, r'learning_rate must be finite and positive, got 0.0'),
    ('grad_clip_norm', -1.0, r'grad_clip_norm must be finite and >= 0, got -1.0'),
    ('momentum', float('inf'), r'momentum must be finite and >= 0, got inf'),
    ('weight_decay', float('nan'), r'weight_decay must be finite and >= 0, got nan'),
    ('warmup_steps', -5, r'warmup_steps must be >= 0, got -5'),
  ],
)
def test_optimizer_values_that_would_train_silently_wrong_are_refused(field, value, match):
  # A negative clip norm turns optax.clip_by_global_norm into gradient ascent.
  with pytest.raises(ValueError, match=r'config.optimizer.' + match):
    config_lib.OptimizerOptions.from_config({field: value})


def test_a_zero_clip_norm_still_means_no_clipping():
  assert (
    config_lib.OptimizerOptions.from_config({'grad_clip_norm': 0.0}).grad_clip_norm == 0
  )


@pytest.mark.parametrize(
  'name, kwargs, match',
  [
    ('focal', {'gamma': -1.0}, r'kwargs.gamma must be finite and >= 0, got -1.0'),
    (
      'focal_dice',
      {'gamma': float('nan')},
      r'kwargs.gamma must be finite and >= 0, got nan',
    ),
    ('focal', {'alpha': 1.5}, r'kwargs.alpha must be finite and in \[0, 1\], got 1.5'),
    (
      'focal',
      {'alpha': [1.0, -0.5]},
      r'kwargs.alpha must be finite and >= 0, got \[1.0, -0.5\]',
    ),
    (
      'focal_dice',
      {'alpha': [0.5, 2.0], 'activation': 'sigmoid'},
      r'kwargs.alpha must be finite and in \[0, 1\], got \[0.5, 2.0\]',
    ),
    ('tversky', {'alpha': -0.5}, r'kwargs.alpha must be finite and >= 0, got -0.5'),
    ('tversky', {'beta': float('inf')}, r'kwargs.beta must be finite and >= 0, got inf'),
    (
      'tversky',
      {'alpha': 0.0, 'beta': 0.0},
      r'kwargs.alpha \+ beta must be > 0 .* got alpha=0.0, beta=0.0',
    ),
    ('dice_ce', {'lambda_ce': -1.0}, r'kwargs.lambda_ce must be finite and >= 0, got -1.0'),
    ('dice_bce', {'lambda_dice': float('nan')}, r'kwargs.lambda_dice must be .* got nan'),
    ('focal_dice', {'lambda_focal': -0.1}, r'kwargs.lambda_focal must be .* got -0.1'),
    ('dice', {'smooth_dr': -1e-5}, r'kwargs.smooth_dr must be finite and >= 0, got -1e-05'),
    (
      'dice_ce',
      {'class_weights': [1.0, -2.0]},
      r'kwargs.class_weights .* got \[1.0, -2.0\]',
    ),
    ('ce', {'label_smoothing': 1.5}, r'kwargs.label_smoothing .* in \[0, 1\], got 1.5'),
    ('dice', {'smooth_nr': 'small'}, r"kwargs.smooth_nr must be a number .* got 'small'"),
  ],
)
def test_loss_option_values_out_of_range_are_refused_naming_them(name, kwargs, match):
  # Each was accepted without a word before: a negative gamma or weight trains on
  # a wrong (or unbounded) loss.
  with pytest.raises(ValueError, match=r'config.loss.' + match):
    config_lib.LossOptions.from_config(
      ml_collections.ConfigDict({'name': name, 'kwargs': kwargs})
    )


@pytest.mark.parametrize(
  'name, kwargs',
  [
    ('focal', {'gamma': 0.0, 'alpha': 0.25}),
    ('focal', {'alpha': [0.5, 2.0]}),  # Softmax class factors may exceed 1.
    ('tversky', {'alpha': 2.0}),  # The false positives' weight, not a probability.
    ('tversky', {'alpha': 0.0, 'beta': 1.0}),
    ('dice_ce', {'lambda_dice': 0.0, 'class_weights': [0.0, 1.0], 'label_smoothing': 1.0}),
  ],
)
def test_loss_option_values_at_their_bounds_are_accepted(name, kwargs):
  options = config_lib.LossOptions.from_config({'name': name, 'kwargs': kwargs})
  assert options.kwargs == kwargs
