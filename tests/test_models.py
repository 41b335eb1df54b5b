"""Tests for mkdm_jax.models: HF parity, export, multi-head combination, BiLSTM masking, checkpoint I/O."""
import dataclasses
import json

from mkdm_jax import runtime

runtime.configure_xla_cpu()  # as the entry points do, before jax's first computation

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mkdm_jax.errors import UserError
from mkdm_jax.models.bert import hash_dropout
from mkdm_jax.models import (BertConfig, BertEncoder, BiLSTMConfig, BiLSTMEncoder, Classifier, MPNetConfig,
                             bilstm_embeddings_from_bert, count_params, cut_layers, export_hf, load_hf_encoder,
                             load_tokenizer, resolve_checkpoint)

TINY_BERT = BertConfig(vocab_size=120, hidden_size=16, num_layers=2, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=32)
TINY_LSTM = BiLSTMConfig(vocab_size=120, embed_dim=16, hidden_size=8)
TINY_MPNET = MPNetConfig(vocab_size=120, hidden_size=16, num_layers=2, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=34)
PAIRS = [('what is the capital of france?', 'paris is the capital and largest city of france.'),
         ('who wrote hamlet', 'shakespeare'),
         ('how tall is mount everest?', 'mount everest is 8,849 metres above sea level.')]


def encode(tokenizer, pairs):
  """Left-aligned, right-padded int32 batch (ids, token types, mask)."""
  encs = tokenizer.encode_batch(pairs)
  length = max(len(e.ids) for e in encs)
  ids, types, mask = (np.zeros((len(encs), length), np.int32) for _ in range(3))
  for i, e in enumerate(encs):
    n = len(e.ids)
    ids[i, :n], types[i, :n], mask[i, :n] = e.ids, e.type_ids, 1
  return ids, types, mask


def random_batch(seed, batch=3, length=10, vocab=120):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, (batch, length)).astype(np.int32)
  lengths = np.array([length, length - 3, 4])[:batch]
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  types = ((np.arange(length)[None] >= lengths[:, None] // 2) & mask.astype(bool)).astype(np.int32)
  return ids * mask, types, mask


def torch_inputs(torch, ids, types, mask):
  as_long = lambda x: torch.tensor(x, dtype=torch.long)
  return {'input_ids': as_long(ids), 'token_type_ids': as_long(types), 'attention_mask': as_long(mask)}


def init(model, seed=0, length=10):
  ids, types, mask = random_batch(seed, length=length)
  return model.init(jax.random.key(seed), ids, types, mask)['params']


@pytest.fixture(scope='module')
def minilm(minilm_dir):
  return load_hf_encoder(minilm_dir)


def test_bert_matches_transformers(minilm_dir, minilm):
  import torch
  import transformers
  cfg, params = minilm
  ids, types, mask = encode(load_tokenizer(minilm_dir), PAIRS)
  assert mask.min() == 0  # the batch includes padding
  out = BertEncoder(cfg).apply({'params': params}, ids, types, mask)
  hf = transformers.BertModel.from_pretrained(str(minilm_dir), attn_implementation='eager').eval()
  with torch.no_grad():
    ref = hf(**torch_inputs(torch, ids, types, mask), output_hidden_states=True, output_attentions=True)
  # fp32 over 6 layers, two libraries' kernels: on an AMD EPYC (2026-12-02) states differ by up to 1.1e-4 and
  # attention probabilities by 1.04e-5, on Intel by under 1e-4 and 1e-5; a wrong mask, scale or layer order is
  # off by 1e-2 or more.
  tol = 2e-4
  assert np.abs(np.asarray(out['sequence']) - ref.last_hidden_state.numpy()).max() < tol
  assert np.abs(np.asarray(out['pooled']) - ref.pooler_output.numpy()).max() < tol
  assert len(out['hidden_states']) == cfg.num_layers + 1
  for ours, theirs in zip(out['hidden_states'], ref.hidden_states, strict=True):
    assert np.abs(np.asarray(ours) - theirs.numpy()).max() < tol
  for ours, theirs in zip(out['attentions'], ref.attentions, strict=True):
    assert np.abs(np.asarray(ours) - theirs.numpy()).max() < tol / 10


def test_count_params_matches_checkpoint(minilm_dir, minilm):
  from safetensors.numpy import load_file
  state = load_file(minilm_dir / 'model.safetensors')
  expected = sum(v.size for k, v in state.items() if 'position_ids' not in k)
  assert count_params(minilm[1]) == expected == 22_713_216


def test_export_reproduces_combined_logits(minilm_dir, minilm, tmp_path):
  import torch
  import transformers
  cfg3, enc3 = cut_layers(*minilm, (0, 1, 2))
  model = Classifier(cfg3, num_classes=2, num_heads=3, combine='learned')
  params = init(model)
  rng = np.random.default_rng(0)
  params = {'encoder': enc3, 'combine_weights': np.array([0.5, -1.0, 1.5], np.float32),
            'heads': {'kernel': rng.normal(0, 0.3, (3, 384, 2)).astype(np.float32),
                      'bias': rng.normal(0, 0.3, (3, 2)).astype(np.float32)}}
  tokenizer = load_tokenizer(minilm_dir)
  ids, types, mask = encode(tokenizer, PAIRS)
  out = model.apply({'params': params}, ids, types, mask)
  # The learned combination is not the plain mean, so a mean-only export would fail this test.
  assert np.abs(np.asarray(out['logits'] - out['head_logits'].mean(1))).max() > 1e-2

  export_hf(tmp_path / 'export', model, params, tokenizer_dir=minilm_dir, label_names=['no', 'yes'])
  hf = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / 'export')).eval()
  assert hf.config.id2label == {0: 'no', 1: 'yes'} and hf.config.num_hidden_layers == 3
  exported_ids, _, _ = encode(load_tokenizer(tmp_path / 'export'), PAIRS)
  np.testing.assert_array_equal(exported_ids, ids)
  with torch.no_grad():
    ref = hf(**torch_inputs(torch, ids, types, mask)).logits.numpy()
  assert np.abs(ref - np.asarray(out['logits'])).max() < 1e-4


def test_export_safetensors_round_trip(tmp_path):
  from safetensors.numpy import load_file
  model = Classifier(TINY_BERT, num_classes=3, num_heads=2)
  params = init(model)
  export_hf(tmp_path, model, params)
  state = load_file(tmp_path / 'model.safetensors')
  enc = params['encoder']
  for hf_key, ours in [('encoder.layer.1.attention.self.query', enc['layer_1']['attention']['query']),
                       ('encoder.layer.0.intermediate.dense', enc['layer_0']['intermediate']),
                       ('pooler.dense', enc['pooler'])]:
    np.testing.assert_array_equal(state[f'bert.{hf_key}.weight'], np.asarray(ours['kernel']).T)
  np.testing.assert_array_equal(state['bert.embeddings.LayerNorm.weight'], enc['embeddings']['norm']['scale'])
  mean_kernel = np.asarray(params['heads']['kernel']).mean(0)
  np.testing.assert_allclose(state['classifier.weight'], mean_kernel.T, rtol=1e-6)
  cfg, reloaded = load_hf_encoder(tmp_path)
  assert cfg == TINY_BERT
  jax.tree.map(np.testing.assert_array_equal, reloaded, jax.tree.map(np.asarray, enc))
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['architectures'] == ['BertForSequenceClassification'] and config['num_labels'] == 3


@pytest.mark.parametrize('encoder', [TINY_BERT, TINY_MPNET], ids=['bert', 'mpnet'])
def test_exported_classifier_continues_as_a_teacher_with_its_head(tmp_path, minilm_dir, encoder):
  """TANDA: a classifier fine-tuned on one task and exported is fine-tuned further as it was (its two-class layer
  kept, so its first logits are the exported model's); another class count, or a bare encoder, gets a new head."""
  from mkdm_jax.models import factory
  options = factory.ModelOptions()
  ids, types, mask = random_batch(3)
  model = Classifier(encoder, num_classes=2)
  params = init(model, seed=1)
  export_hf(tmp_path / 'two', model, params)
  teacher, start = factory.teacher(str(tmp_path / 'two'), 2, seed=5, options=options)
  np.testing.assert_allclose(teacher.apply({'params': start}, ids, types, mask)['logits'],
                             model.apply({'params': params}, ids, types, mask)['logits'], atol=1e-5)
  three = Classifier(encoder, num_classes=3)
  export_hf(tmp_path / 'three', three, init(three, seed=1))
  _, fresh = factory.teacher(str(tmp_path / 'three'), 2, seed=5, options=options)
  _, fresh_other_seed = factory.teacher(str(tmp_path / 'three'), 2, seed=6, options=options)
  assert fresh['heads']['kernel'].shape == (1, encoder.hidden_size, 2)
  assert np.abs(fresh['heads']['kernel'] - fresh_other_seed['heads']['kernel']).max() > 0  # the seed's new head
  jax.tree.map(np.testing.assert_array_equal, fresh['encoder'], start['encoder'])
  _, bare = factory.teacher('minilm-l6', 2, seed=5, options=options)
  _, bare_other_seed = factory.teacher('minilm-l6', 2, seed=6, options=options)
  assert np.abs(bare['heads']['kernel'] - bare_other_seed['heads']['kernel']).max() > 0


def test_export_bilstm_is_refused(tmp_path):
  model = Classifier(TINY_LSTM, num_classes=2)
  with pytest.raises(UserError, match='BiLSTM'):
    export_hf(tmp_path, model, init(model))


@pytest.mark.parametrize('encoder', [TINY_BERT, TINY_LSTM])
def test_multi_head_combination(encoder):
  ids, types, mask = random_batch(1)
  model = Classifier(encoder, num_classes=3, num_heads=4)
  params = init(model)
  assert set(params) == {'encoder', 'heads'}
  width = 16 if encoder is TINY_BERT else 2 * TINY_LSTM.hidden_size
  assert params['heads']['kernel'].shape == (4, width, 3) and params['heads']['bias'].shape == (4, 3)
  out = model.apply({'params': params}, ids, types, mask)
  assert out['head_logits'].shape == (3, 4, 3) and out['logits'].shape == (3, 3)
  assert out['head_logits'].dtype == out['logits'].dtype == jnp.float32
  assert np.abs(np.asarray(out['head_logits'][:, 0] - out['head_logits'][:, 1])).max() > 1e-4
  np.testing.assert_allclose(out['logits'], out['head_logits'].mean(1), atol=1e-6)

  learned = Classifier(encoder, num_classes=3, num_heads=4, combine='learned')
  lparams = init(learned)
  np.testing.assert_array_equal(lparams['combine_weights'], np.zeros(4))
  lparams = {**lparams, 'encoder': params['encoder'], 'heads': params['heads']}
  np.testing.assert_allclose(learned.apply({'params': lparams}, ids, types, mask)['logits'], out['logits'],
                             atol=1e-6)
  lparams['combine_weights'] = jnp.array([2.0, 0.0, -1.0, 0.5])
  w = jax.nn.softmax(lparams['combine_weights'])
  np.testing.assert_allclose(learned.apply({'params': lparams}, ids, types, mask)['logits'],
                             jnp.einsum('h,bhc->bc', w, out['head_logits']), atol=1e-6)



@pytest.mark.parametrize('encoder', [TINY_BERT, TINY_MPNET, TINY_LSTM], ids=['bert', 'mpnet', 'bilstm'])
def test_one_initialiser_gives_the_params_of_each_init_it_replaced(encoder):
  """factory.init_params (the factory's, fit's and init_state's random init) equals, bit for bit, the inits it
  replaced: the factory's (jnp dummy of length 8), fit's (numpy dummy of the smallest bucket, 16 here) and
  init_state's (the first half of the split key, dummy of length 32)."""
  from mkdm_jax.models import factory
  from mkdm_jax.train.optim import make_optimizer
  from mkdm_jax.train.step import init_state
  model = Classifier(encoder, num_classes=3, num_heads=2, combine='learned')

  def former_init(rng, length, xp):
    dummy = xp.zeros((1, length), xp.int32)
    return model.init(rng, dummy, dummy, xp.ones_like(dummy))['params']

  def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)

  rng = jax.random.PRNGKey(3)
  assert_same(factory.init_params(model, rng), former_init(rng, 8, jnp))
  assert_same(factory.host_init_params(model, 3), former_init(rng, 8, jnp))
  assert_same(factory.init_params(model, rng), former_init(rng, 16, np))
  optimizer, _ = make_optimizer(None, learning_rate=1e-3, total_steps=2)
  assert_same(init_state(model, optimizer, rng).params, former_init(jax.random.split(rng)[0], 32, jnp))

def test_dropout_and_hidden_states():
  ids, types, mask = random_batch(2)
  model = Classifier(TINY_BERT, num_classes=2)
  params = init(model)
  train = lambda seed: model.apply({'params': params}, ids, types, mask, deterministic=False,
                                   rngs={'dropout': jax.random.key(seed)})['logits']
  np.testing.assert_array_equal(train(0), train(0))
  assert np.abs(np.asarray(train(0) - train(1))).max() > 0
  out = model.apply({'params': params}, ids, types, mask, output_hidden_states=True)
  assert len(out['hidden_states']) == 3 and out['hidden_states'][0].shape == (3, 10, 16)
  assert len(out['attentions']) == 2 and out['attentions'][0].shape == (3, 2, 10, 10)
  np.testing.assert_allclose(out['attentions'][1].sum(-1), 1.0, atol=1e-5)
  assert float(jnp.abs(out['attentions'][0] * (1 - mask[:, None, None, :])).max()) == 0.0
  assert 'hidden_states' not in model.apply({'params': params}, ids, types, mask)


@pytest.mark.parametrize('rate', [0.1, 0.5])
def test_hash_dropout_statistics(rate):
  x = jnp.ones((256, 512), jnp.float32)
  seed = lambda s: jax.random.bits(jax.random.key(s), (2,), jnp.uint32)
  out = np.asarray(hash_dropout(x, rate, seed(0)))
  kept = out != 0
  n = kept.size
  assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
  np.testing.assert_allclose(out[kept], 1 / (1 - rate), rtol=1e-6)  # inverted dropout keeps the mean
  # No visible structure: neighbours (along rows, along columns) and other seeds are uncorrelated.
  k = kept.astype(np.float64)
  corr = lambda a, b: np.corrcoef(a.ravel(), b.ravel())[0, 1]
  bound = 5 / np.sqrt(n)
  assert abs(corr(k[:, 1:], k[:, :-1])) < bound and abs(corr(k[1:], k[:-1])) < bound
  other = np.asarray(hash_dropout(x, rate, seed(1))) != 0
  assert abs(corr(k, other.astype(np.float64))) < bound
  per_row = k.mean(1)  # every row (e.g. every token) gets its own mask, not a shared one
  assert per_row.std() > 0 and np.unique(k, axis=0).shape[0] == k.shape[0]


@pytest.mark.parametrize('extra_padding', [0, 5])
def test_bilstm_matches_flax_rnn(extra_padding):
  """The fused two-direction scan equals flax's Bidirectional(RNN(OptimizedLSTMCell)) at real tokens,
  also when every row ends before the batch's length (the scan then skips the padded steps)."""
  import flax.linen as nn
  ids, types, mask = (np.pad(a, ((0, 0), (0, extra_padding))) for a in random_batch(4, length=12))
  encoder = BiLSTMEncoder(TINY_LSTM)
  params = encoder.init(jax.random.key(4), ids, types, mask)['params']
  seq = encoder.apply({'params': params}, ids, types, mask)['sequence']
  x = params['word_embeddings']['embedding'][ids] + params['token_type_embeddings']['embedding'][types]
  cell = lambda: nn.OptimizedLSTMCell(TINY_LSTM.hidden_size)
  reference = nn.Bidirectional(nn.RNN(cell()), nn.RNN(cell()))
  ref_params = {'forward_rnn': {'cell': params['OptimizedLSTMCell_0']},
                'backward_rnn': {'cell': params['OptimizedLSTMCell_1']}}
  expected = reference.apply({'params': ref_params}, x, seq_lengths=mask.sum(-1))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(seq)[real], np.asarray(expected)[real], atol=1e-5)


@pytest.mark.parametrize('encoder', [TINY_BERT, TINY_LSTM])
def test_padding_is_ignored(encoder):
  model = Classifier(encoder, num_classes=2, num_heads=2)
  ids, types, mask = random_batch(3)
  params = init(model)
  base = model.apply({'params': params}, ids, types, mask)['logits']
  rng = np.random.default_rng(3)
  junk = rng.integers(1, 120, ids.shape).astype(np.int32)
  noisy = np.where(mask == 1, ids, junk)  # garbage ids under existing padding
  extra = rng.integers(1, 120, (3, 5)).astype(np.int32)
  padded = [np.concatenate([noisy, extra], 1), np.concatenate([types, np.ones_like(extra)], 1),
            np.concatenate([mask, np.zeros_like(extra)], 1)]
  np.testing.assert_allclose(model.apply({'params': params}, *padded)['logits'], base, atol=1e-6)
  # Gradients too (the BiLSTM skips the padded steps; BERT's attention kernel is inference-only).
  grads = [jax.grad(lambda p: model.apply({'params': p}, *batch)['logits'].sum())(params)
           for batch in ((ids, types, mask), padded)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), *grads)
  # The padded row really is sensitive to its tokens: changing a real token changes its logits.
  changed = ids.copy()
  changed[2, 1] = changed[2, 1] % 119 + 1
  changed_logits = model.apply({'params': params}, changed, types, mask)['logits']
  assert np.abs(np.asarray(changed_logits[2] - base[2])).max() > 0


def test_bert_row_without_keys_stays_finite():
  """A row whose attention mask is all zero gets finite logits and leaves the other rows unchanged."""
  model = Classifier(TINY_BERT, num_classes=2)
  ids, types, mask = random_batch(5)
  params = init(model)
  empty = mask.copy()
  empty[1] = 0
  for deterministic in (True, False):
    run = lambda m: np.asarray(model.apply({'params': params}, ids, types, m, deterministic=deterministic,
                                           rngs={'dropout': jax.random.key(0)})['logits'])
    out = run(empty)
    assert np.isfinite(out).all()
    if deterministic:
      np.testing.assert_allclose(out[[0, 2]], run(mask)[[0, 2]], atol=1e-6)


def test_bilstm_embeddings_from_bert():
  bert_params = init(BertEncoder(TINY_BERT))
  lstm_params = init(Classifier(TINY_LSTM, num_classes=2))
  new = bilstm_embeddings_from_bert(lstm_params, bert_params)
  np.testing.assert_array_equal(new['encoder']['word_embeddings']['embedding'],
                                bert_params['embeddings']['word_embeddings']['embedding'])
  assert new['heads'] is lstm_params['heads']
  narrow = init(Classifier(BiLSTMConfig(vocab_size=120, embed_dim=8, hidden_size=8), num_classes=2))
  with pytest.raises(UserError, match='embed_dim=16'):
    bilstm_embeddings_from_bert(narrow, bert_params)


def write_tiny_checkpoint(path, cfg=TINY_BERT):
  from mkdm_jax.models.hf_files import encoder_params_to_hf_state
  params = init(BertEncoder(cfg))
  path.mkdir(exist_ok=True)
  (path / 'config.json').write_text(json.dumps(cfg.to_hf_dict()))
  return params, encoder_params_to_hf_state(params, cfg, prefix='')


def test_pickle_checkpoint_needs_opt_in(tmp_path):
  import torch
  params, state = write_tiny_checkpoint(tmp_path)
  torch.save({k: torch.tensor(v) for k, v in state.items()}, tmp_path / 'pytorch_model.bin')
  with pytest.raises(UserError, match='pickle') as err:
    load_hf_encoder(tmp_path)
  assert 'allow_pickle' in str(err.value)
  cfg, loaded = load_hf_encoder(tmp_path, allow_pickle=True)
  assert cfg == TINY_BERT
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))


def test_checkpoint_errors(tmp_path):
  from safetensors.numpy import save_file
  with pytest.raises(UserError, match='config.json'):
    load_hf_encoder(tmp_path)
  _, state = write_tiny_checkpoint(tmp_path)
  with pytest.raises(UserError, match='model.safetensors'):
    load_hf_encoder(tmp_path)
  del state['pooler.dense.bias']
  state['encoder.layer.1.intermediate.dense.weight'] = np.zeros((8, 16), np.float32)
  save_file(state, str(tmp_path / 'model.safetensors'))
  with pytest.raises(UserError) as err:
    load_hf_encoder(tmp_path)
  assert 'missing pooler.dense.bias' in str(err.value)
  assert 'encoder.layer.1.intermediate.dense.weight: shape (8, 16) in file, (32, 16)' in str(err.value)


def test_resolve_checkpoint(tmp_path, monkeypatch, minilm_dir):
  assert (minilm_dir / 'model.safetensors').is_file()
  assert resolve_checkpoint(tmp_path) == tmp_path
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  with pytest.raises(UserError, match='minilm-l6'):
    resolve_checkpoint('no-such-model-xyz')
  (tmp_path / 'f').write_text('')
  with pytest.raises(UserError, match='directory'):
    resolve_checkpoint(tmp_path / 'f')


def test_minilm_l3_from_onnx(tmp_path, monkeypatch, minilm_dir):
  import onnx  # noqa: F401
  from onnx.reference import ReferenceEvaluator
  from mkdm_jax.models.onnx_import import _packaged_onnx_file
  onnx_file = _packaged_onnx_file()
  monkeypatch.setenv('MKDM_CACHE_DIR', str(tmp_path))
  path = resolve_checkpoint('minilm-l3')
  assert path == tmp_path / 'paraphrase-MiniLM-L3-v2' and resolve_checkpoint('minilm-l3') == path
  cfg, params = load_hf_encoder(path)
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads) == (3, 384, 12)
  np.testing.assert_array_equal(params['pooler']['kernel'], np.eye(384))
  ids, _, mask = encode(load_tokenizer(path), PAIRS)
  out = BertEncoder(cfg).apply({'params': params}, ids, np.zeros_like(ids), mask)
  ref, = ReferenceEvaluator(str(onnx_file)).run(['onnx::Shape_422'], {  # last layer's LayerNorm output
      'input_ids': ids.astype(np.int64), 'attention_mask': mask.astype(np.int64)})
  assert np.abs(np.asarray(out['sequence']) - ref).max() < 1e-4


def test_tokenizer_real_words(minilm_dir, tmp_path):
  tok = load_tokenizer(minilm_dir)
  enc = tok.encode('The quick brown fox jumps over the lazy dog', 'paris is in france')
  assert tok.token_to_id('[UNK]') not in enc.ids
  assert enc.tokens[:3] == ['[CLS]', 'the', 'quick'] and enc.tokens[-1] == '[SEP]'
  assert set(enc.type_ids) == {0, 1} and len(enc.ids) == 16  # tokenizer.json's padding to 128 is cleared
  (tmp_path / 'vocab.txt').write_bytes((minilm_dir / 'vocab.txt').read_bytes())
  wordpiece = load_tokenizer(tmp_path)  # vocab.txt only
  assert wordpiece.encode('The quick brown fox jumps over the lazy dog', 'paris is in france').ids == enc.ids
  with pytest.raises(UserError, match='vocab.txt'):
    load_tokenizer(tmp_path / 'missing')


@pytest.mark.parametrize('encoder', [TINY_BERT, TINY_LSTM])
def test_bf16_compute(encoder):
  ids, types, mask = random_batch(4)
  fp32 = Classifier(encoder, num_classes=2, num_heads=2)
  params = init(fp32)
  params = {**params, 'heads': {'kernel': params['heads']['kernel'] * 50, 'bias': params['heads']['bias']}}
  bf16 = Classifier(encoder, num_classes=2, num_heads=2, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(init(bf16)))
  ref = fp32.apply({'params': params}, ids, types, mask, output_hidden_states=True)
  out = bf16.apply({'params': params}, ids, types, mask, output_hidden_states=True)
  assert out['logits'].dtype == out['head_logits'].dtype == jnp.float32
  scale = np.abs(np.asarray(ref['logits'])).max()
  assert scale > 0.01
  assert np.abs(np.asarray(out['logits'] - ref['logits'])).max() < 0.05 * scale
  if encoder is TINY_BERT:
    assert out['hidden_states'][-1].dtype == jnp.bfloat16



def test_legacy_gamma_beta_layernorm_names_load(minilm_dir):
  """Google's hub checkpoints name LayerNorm weights gamma/beta; they load like weight/bias."""
  import safetensors.numpy
  from mkdm_jax.models.hf_files import hf_state_to_encoder_params
  config, params = load_hf_encoder(minilm_dir)
  state = safetensors.numpy.load_file(str(minilm_dir / 'model.safetensors'))
  legacy = {k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias', 'LayerNorm.beta'): v
            for k, v in state.items()}
  assert any(k.endswith('LayerNorm.gamma') for k in legacy)
  renamed = hf_state_to_encoder_params(legacy, config)
  for a, b in zip(jax.tree.leaves(renamed), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_training_attention_values_and_gradients_equal_plain_softmax_attention():
  """The training path (einsum, normalisation applied to the context, shift by a stop-gradient row maximum)
  gives the values and gradients of textbook masked softmax attention (no dropout here)."""
  from mkdm_jax.models.bert import BertSelfAttention
  cfg = dataclasses.replace(TINY_BERT, attention_dropout=0.0)
  layer = BertSelfAttention(cfg)
  _, _, mask = random_batch(1)
  b, l = mask.shape
  x = np.random.default_rng(2).normal(size=(b * l, cfg.hidden_size)).astype(np.float32)
  params = layer.init(jax.random.key(0), x, mask, True)['params']
  h, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

  def textbook(p, x):
    dense = lambda name, t: t @ p[name]['kernel'] + p[name]['bias']
    split = lambda t: t.reshape(b, l, h, d).transpose(0, 2, 1, 3)
    scores = jnp.einsum('bhqd,bhkd->bhqk', split(dense('query', x)), split(dense('key', x))) / np.sqrt(d)
    probs = jax.nn.softmax(jnp.where(mask[:, None, None, :] == 1, scores, -jnp.inf), axis=-1)
    ctx = jnp.einsum('bhqk,bhkd->bhqd', probs, split(dense('value', x))).transpose(0, 2, 1, 3).reshape(b * l, -1)
    return dense('output', ctx)

  training = lambda p, x: layer.apply({'params': p}, x, mask, False)[0]
  np.testing.assert_allclose(training(params, x), textbook(params, x), atol=1e-5)
  loss = lambda f: lambda p, x: jnp.sum(f(p, x) * jnp.cos(jnp.arange(b * l * cfg.hidden_size).reshape(b * l, -1)))
  got, want = (jax.grad(loss(f), argnums=(0, 1))(params, x) for f in (training, textbook))
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5), got, want)
