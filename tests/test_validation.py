"""config.validate refuses flag combinations without meaning, naming the flags; typed flag conversion."""
import dataclasses
import json

import pytest

from mkdm_jax import config, context, distill, saved_runs
from mkdm_jax.errors import UserError

ONLINE = dict(online_teachers=True, students=('bert3',), methods=('mkdm',), teacher_checkpoints=('random',),
              random_bert=(2, 64, 2, 128))


def validate(**overrides):
  config.validate(config.Config(workdir='w', **overrides))


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
    (dict(ONLINE, attention_weight=0.5, student_checkpoint=('minilm-l6',)), ['--attention_weight']),
    (dict(unlabelled_splits=('qnli:dev',), methods=('mkdm',)), ['--unlabelled_splits=qnli:dev', '--methods']),
    (dict(pretrain_steps=100, methods=('mkdm',)), ['--pretrain_steps=100', '--methods']),
    (dict(pretrain_steps=-1), ['--pretrain_steps=-1']),
    (dict(unlabelled_corpus='c', teacher_checkpoints=('overlap:idf',), methods=('tmkd',)),
     ['--unlabelled_corpus', 'overlap:idf', 'cannot label a prepared corpus']),
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
    dict(ONLINE, hidden_weight=0.5, student_checkpoint=('random',)),
    dict(ONLINE, attention_weight=0.5, student_checkpoint=('random',)),
])
def test_accepted(overrides):
  validate(**overrides)


def test_attention_head_counts_come_from_the_checkpoints():
  """MiniLM has 12 attention heads; the refusal names both counts before any training."""
  from mkdm_jax.models import resolve_checkpoint
  assert resolve_checkpoint('minilm-l6').exists()
  with pytest.raises(UserError, match=r'\[2\] attention heads and the students \[12\]'):
    validate(**ONLINE, attention_weight=0.5, student_checkpoint=('minilm-l6',))


def test_config_from_strings_names_the_flag_of_a_non_number():
  with pytest.raises(UserError) as error:
    config.config_from_strings({'workdir': 'w', 'buckets': ['32', 'big']})
  assert 'non-number' in str(error.value) and '--buckets' in str(error.value)


def test_config_from_strings_converts_types():
  cfg = config.config_from_strings({'workdir': 'w', 'teacher_learning_rates': ['1e-5', '2e-5'],
                                      'buckets': ['32', '64'], 'teacher_weights': ['3', '1']})
  assert cfg.teacher_learning_rates == (1e-5, 2e-5)
  assert all(type(v) is float for v in cfg.teacher_learning_rates + cfg.teacher_weights)
  assert cfg.buckets == (32, 64) and all(type(v) is int for v in cfg.buckets)
  assert cfg.teacher_weights == (3.0, 1.0)


@pytest.mark.slow
def test_every_flagfile_gives_the_same_config_without_absl():
  """config.config_from_flagfile (notebooks, scripts) reads each flagfile as run.py's absl flags do."""
  import json
  import subprocess
  import sys
  from pathlib import Path
  repo = Path(__file__).resolve().parents[1]
  code = '''
import dataclasses, json, sys
import importlib.util
spec = importlib.util.spec_from_file_location('run', 'experiments/run.py')
run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run)
from mkdm_jax import config
out = {}
for path in sys.argv[1:]:
  run.FLAGS.unparse_flags()
  run.FLAGS(['run.py', f'--flagfile={path}', '--workdir=w'])
  absl = config.config_from_strings({f.name: run.FLAGS[f.name].value for f in dataclasses.fields(config.Config)})
  out[path] = [dataclasses.asdict(absl), dataclasses.asdict(config.config_from_flagfile(path, workdir='w'))]
print(json.dumps(out))
'''
  flagfiles = sorted(str(p) for p in (repo / 'experiments' / 'configs').glob('*.flags'))
  proc = subprocess.run([sys.executable, '-c', code, *flagfiles], cwd=repo, capture_output=True, text=True,
                        check=True)
  configs = json.loads(proc.stdout)
  assert len(configs) == len(flagfiles) >= 5
  for path, (absl, ours) in configs.items():
    assert ours == absl, path


def test_flagfile_errors_name_the_line(tmp_path):
  bad = tmp_path / 'bad.flags'
  bad.write_text('# comment\n--alpha=0.3\nalpha=0.4\n')
  with pytest.raises(UserError, match=f'{bad}:3'):
    config.config_from_flagfile(bad)
  bad.write_text('--alpha=high\n')
  with pytest.raises(UserError, match='--alpha=high: expected a float'):
    config.config_from_flagfile(bad)
  bad.write_text('--noprogress\n--no_such_setting=1\n')
  with pytest.raises(UserError, match='no_such_setting'):
    config.config_from_flagfile(bad)
  bad.write_text('--noprogress\n--online_teachers\n--buckets=16,32\n')
  cfg = config.config_from_flagfile(bad, alpha=0.25)
  assert (cfg.progress, cfg.online_teachers, cfg.buckets, cfg.alpha) == (False, True, (16, 32), 0.25)


def test_train_questions_with_both_keeps_the_evaluated_questions():
  """WikiQA train has 8,651 pairs in questions with a positive and a negative answer (STACK-NOTES)."""
  import numpy as np
  from mkdm_jax import data
  cfg = config.Config(workdir='w', train_questions='with_both', methods=('mkdm',))
  train = context.load_examples(cfg, data.get_task('wikiqa'))['train']
  assert len(train) == 8651
  for group in np.unique(train.groups):
    labels = train.labels[train.groups == group]
    assert (labels == 1).any() and (labels == 0).any()


def test_unlabelled_splits_add_their_pairs_once_without_labels():
  """--unlabelled_splits=wikiqa:train on top of the with_both train rows gives all 20,360 WikiQA train pairs
  (the train rows are not repeated); qnli:dev adds its 5,463 pairs."""
  from mkdm_jax import data
  cfg = config.Config(workdir='w', train_questions='with_both', methods=('tmkd',), unlabelled_extra=0,
                        unlabelled_splits=('wikiqa:train', 'qnli:dev'))
  examples = context.load_examples(cfg, data.get_task('wikiqa'))
  full_train, qnli = data.load_split('wikiqa', 'train'), data.load_split('qnli', 'dev')
  unlabelled = examples['unlabelled']
  assert len(unlabelled) == len(full_train) + len(qnli) == 20360 + 5463
  assert (unlabelled.labels == -1).all() and unlabelled.groups is None
  assert unlabelled.ids[:8651].tolist() == examples['train'].ids.tolist()
  assert set(unlabelled.ids.tolist()) == set(full_train.ids.tolist()) | set(qnli.ids.tolist())
  position = {key: i for i, key in enumerate(unlabelled.ids.tolist())}
  i = position[int(qnli.ids[7])]
  assert (unlabelled.text_a[i], unlabelled.text_b[i]) == (qnli.text_a[7], qnli.text_b[7])
  only_train = context.load_examples(dataclasses.replace(cfg, unlabelled_splits=()), data.get_task('wikiqa'))
  assert unlabelled.fingerprint != only_train['unlabelled'].fingerprint


@pytest.mark.parametrize('spec,message', [('qnli', 'expected TASK:SPLIT'), ('nosuch:dev', "unknown task 'nosuch'"),
                                          ('tsv:dev', "unknown task 'tsv'"), ('qnli:nosuch', 'nosuch')])
def test_bad_unlabelled_splits_name_the_flag(spec, message):
  from mkdm_jax import data
  cfg = config.Config(workdir='w', methods=('tmkd',), max_train_rows=20, unlabelled_splits=(spec,))
  with pytest.raises(UserError, match=message) as error:
    context.load_examples(cfg, data.get_task('wikiqa'))
  assert 'nosuch:dev' not in spec or '--unlabelled_splits' in str(error.value)


def test_a_new_setting_at_its_default_keeps_saved_runs_current(tmp_path):
  """Runs recorded before a setting existed (here unlabelled_corpus) stay current while it is at its default,
  and turn stale once it is set."""
  settings = distill_settings(config.Config(workdir=str(tmp_path), methods=('tmkd',)))
  (tmp_path / 'settings.json').write_text(json.dumps({k: v for k, v in settings.items() if k != 'unlabelled_corpus'}))
  assert saved_runs.stale_changes(tmp_path, settings) == []
  changed = distill_settings(config.Config(workdir=str(tmp_path), methods=('tmkd',), unlabelled_corpus='c'))
  assert saved_runs.stale_changes(tmp_path, changed) == ["unlabelled_corpus: '' -> 'c'"]


def distill_settings(cfg):
  return distill.student_settings(cfg, 'bert3', 'tmkd')
