"""The typed Config as flagfile lines and back, and choice settings checked by validate, in process."""
import dataclasses

import pytest

from mkdm_jax import config
from mkdm_jax.errors import UserError


def test_flag_lines_read_back_into_an_equal_config(tmp_path):
  cfg = config.config_from_flagfile('experiments/configs/wikiqa_study.flags', workdir='w', student_seed=2,
                                    students=('bert3',), progress=False, alpha_end=0.1, stages=('distill',))
  lines = config.flag_lines(cfg)
  assert '--student_seed=2' in lines and '--progress=False' in lines and '--students=bert3' in lines
  assert not any(line.startswith('--temperature=') for line in lines)  # at its default: not written
  path = tmp_path / 'run.flags'
  path.write_text('\n'.join(lines) + '\n')
  assert config.config_from_flagfile(path) == cfg
  emptied = dataclasses.replace(cfg, students=())
  path.write_text('\n'.join(config.flag_lines(emptied)) + '\n')
  assert config.config_from_flagfile(path).students == ()


@pytest.mark.parametrize('name,value', [('soft_loss', 'l1'), ('lr_decay', 'step'), ('precision', 'fp8'),
                                        ('head_combine', 'max'), ('teacher_weighting', 'random')])
def test_choice_settings_are_checked_once_for_every_caller(name, value):
  """absl enforces the choices for run.py; notebooks and the study library build Configs without absl."""
  with pytest.raises(UserError, match=f'--{name}={value}: choose from'):
    config.validate(config.Config(workdir='w', **{name: value}))


def test_alpha_and_temperature_are_checked_by_the_loss_config_with_flag_names():
  for name, value, message in (('alpha', 1.5, r'--alpha=1.5 must lie in \[0, 1\]'),
                               ('temperature_end', 0.0, '--temperature_end=0.0 must be > 0')):
    with pytest.raises(UserError, match=message):
      config.validate(config.Config(workdir='w', **{name: value}))


def test_sample_weighting_is_refused_with_a_first_stage_and_kept_without_one():
  """CA-MKD's weights need gold labels: a two-stage method's first stage has none."""
  with pytest.raises(UserError, match='--teacher_weighting=sample weighs teachers by the gold label.*tmkd'):
    config.validate(config.Config(workdir='w', methods=('mkdm', 'tmkd'), teacher_weighting='sample'))
  cfg = config.Config(workdir='w', methods=('kd_single', 'mkdm', 'kd_ensemble'), teacher_weighting='sample')
  config.validate(cfg)
  from mkdm_jax import distill
  assert distill.loss_config('mkdm', cfg).weighting == 'sample'
  assert distill.loss_config('kd_single', cfg).weighting == 'uniform'  # one teacher: nothing to weight


def test_extra_eval_entries_are_parsed_or_named():
  assert config.parse_extra_eval('squad:dev:6000') == ('squad', 'dev', 6000)
  assert config.parse_extra_eval('qnli:dev') == ('qnli', 'dev', 0)
  for bad in ('squad', 'nosuch:dev', 'squad:dev:many', 'tsv:dev'):
    with pytest.raises(UserError, match=f"--extra_eval: '{bad}'"):
      config.validate(config.Config(workdir='w', extra_eval=(bad,)))
