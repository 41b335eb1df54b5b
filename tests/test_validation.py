"""pipeline.validate refuses flag combinations without meaning, naming the flags; typed flag conversion."""
import pytest

from mkdm_jax import pipeline
from mkdm_jax.errors import UserError

ONLINE = dict(online_teachers=True, students=('bert3',), methods=('mkdm',), teacher_checkpoints=('random',),
              random_bert=(2, 64, 2, 128))


def validate(**overrides):
  pipeline.validate(pipeline.Config(workdir='w', **overrides))


@pytest.mark.parametrize('overrides,flags', [
    (dict(teacher_weighting='fixed', teacher_weights=(1.0, 1.0, 1.0), methods=('kd_single',)),
     ['--teacher_weighting=fixed', '--methods=kd_single']),
    (dict(teacher_weights=(1.0, 2.0, 3.0)), ['--teacher_weights', '--teacher_weighting']),
    (dict(teacher_weights=(1.0, 2.0, 3.0), teacher_weighting='confidence'),
     ['--teacher_weights', '--teacher_weighting']),
    (dict(teacher_weighting='fixed', teacher_weights=(1.0, 2.0)), ['--teacher_weighting=fixed', '--teacher_weights']),
    (dict(teacher_weighting='fixed'), ['--teacher_weighting=fixed', '--teacher_weights']),
    (dict(teacher_weighting='fixed', teacher_weights=(1.0, -1.0, 1.0)), ['--teacher_weights']),
    (dict(teacher_weighting='fixed', teacher_weights=(0.0, 0.0, 0.0)), ['--teacher_weights']),
    (dict(teacher_weighting='confidence', num_teachers=1), ['--teacher_weighting=confidence', '--num_teachers=1']),
    (dict(ensemble_target='logits', methods=('mkdm', 'kd_single')), ['--ensemble_target=logits', '--methods']),
    (dict(soft_loss='mse', methods=('kd_ensemble',)), ['--soft_loss=mse', '--ensemble_target']),
    (dict(head_combine='learned', methods=('kd_single', 'kd_ensemble')), ['--head_combine=learned', '--methods']),
    (dict(head_combine='learned', methods=('mkdm',), num_teachers=1), ['--head_combine=learned', '--num_teachers']),
    (dict(head_combine='learned', methods=('mkdm',), dev_split='none'), ['--head_combine=learned', '--dev_split']),
    (dict(hidden_weight=0.5, students=('bert3',)), ['--hidden_weight', '--online_teachers']),
    (dict(ONLINE, attention_weight=0.5, student_checkpoint='minilm-l6'), ['--attention_weight']),
])
def test_refused(overrides, flags):
  with pytest.raises(UserError) as error:
    validate(**overrides)
  for flag in flags:
    assert flag in str(error.value), (flag, str(error.value))


@pytest.mark.parametrize('overrides', [
    dict(teacher_weighting='fixed', teacher_weights=(3.0, 1.0, 0.0), methods=('kd_single', 'mkdm')),
    dict(teacher_weighting='confidence', methods=('kd_ensemble',)),
    dict(ensemble_target='logits', methods=('kd_ensemble', 'mkdm')),
    dict(soft_loss='mse', methods=('kd_ensemble',), ensemble_target='logits'),
    dict(soft_loss='mse', methods=('mkdm',)),
    dict(head_combine='learned', methods=('mkdm',), num_teachers=3),
    dict(head_combine='learned', methods=('student_scratch', 'tmkd'), num_teachers=2),
    dict(ONLINE, hidden_weight=0.5, student_checkpoint='random'),
    dict(ONLINE, attention_weight=0.5, student_checkpoint='random'),
])
def test_accepted(overrides):
  validate(**overrides)


def test_attention_head_counts_come_from_the_checkpoints():
  """MiniLM has 12 attention heads; the refusal names both counts before any training."""
  from mkdm_jax.models import resolve_checkpoint
  assert resolve_checkpoint('minilm-l6').exists()
  with pytest.raises(UserError, match=r'\[2\] attention heads and the students 12'):
    validate(**ONLINE, attention_weight=0.5, student_checkpoint='minilm-l6')


def test_config_from_strings_names_the_flag_of_a_non_number():
  with pytest.raises(UserError) as error:
    pipeline.config_from_strings({'workdir': 'w', 'buckets': ['32', 'big']})
  assert 'non-number' in str(error.value) and '--buckets' in str(error.value)


def test_config_from_strings_converts_types():
  cfg = pipeline.config_from_strings({'workdir': 'w', 'teacher_learning_rates': ['1e-5', '2e-5'],
                                      'buckets': ['32', '64'], 'teacher_weights': ['3', '1']})
  assert cfg.teacher_learning_rates == (1e-5, 2e-5)
  assert all(type(v) is float for v in cfg.teacher_learning_rates + cfg.teacher_weights)
  assert cfg.buckets == (32, 64) and all(type(v) is int for v in cfg.buckets)
  assert cfg.teacher_weights == (3.0, 1.0)
