"""Loss values against hand computations (numpy), for each soft loss, T, alpha, weights, missing labels."""
import numpy as np
import pytest

import jax.numpy as jnp
from mkdm_jax import losses


def np_softmax(x, t=1.0):
  z = np.exp(x / t - (x / t).max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


S = np.array([[[1.0, -0.5], [0.2, 0.3]], [[-1.0, 2.0], [0.5, 0.5]]], np.float32)  # [B=2, H=2, C=2]
Z = np.array([[[2.0, 0.0], [-1.0, 1.0]], [[0.0, 1.0], [3.0, -3.0]]], np.float32)
Y = np.array([0, 1], np.int32)
W = np.ones(2, np.float32)


@pytest.mark.parametrize('t', [1.0, 2.0, 4.0])
def test_kl_matches_hand_computation(t):
  p, q = np_softmax(Z, t), np_softmax(S, t)
  expected = t * t * np.sum(p * (np.log(p) - np.log(q)), -1)
  np.testing.assert_allclose(losses.soft_loss(S, Z, t, 'kl'), expected, rtol=1e-5, atol=1e-6)


def test_soft_ce_and_mse():
  t = 2.0
  expected_ce = -t * t * np.sum(np_softmax(Z, t) * np.log(np_softmax(S, t)), -1)
  np.testing.assert_allclose(losses.soft_loss(S, Z, t, 'ce'), expected_ce, rtol=1e-5)
  np.testing.assert_allclose(losses.soft_loss(S, Z, t, 'mse'), np.mean((S - Z) ** 2, -1), rtol=1e-6)
  # KL and CE differ by the teacher entropy; KL of identical logits is zero.
  np.testing.assert_allclose(losses.soft_loss(Z, Z, t, 'kl'), 0.0, atol=1e-5)
  with pytest.raises(ValueError):
    losses.soft_loss(S, Z, t, 'bogus')


@pytest.mark.parametrize('alpha', [0.0, 0.3, 1.0])
def test_mkdm_combination(alpha):
  t = 2.0
  soft = t * t * np.sum(np_softmax(Z, t) * (np.log(np_softmax(Z, t)) - np.log(np_softmax(S, t))), -1)
  gold = -np.log(np_softmax(S))[np.arange(2), :, Y]  # [B, H]
  expected = np.mean(np.sum(0.5 * (alpha * soft + (1 - alpha) * gold), axis=1))
  loss, m = losses.mkdm_loss(S, Z, Y, W, alpha=alpha, temperature=t)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(m['soft_t1'], soft[:, 1].mean(), rtol=1e-5)
  np.testing.assert_allclose(m['gold'], np.mean(gold.mean(1)), rtol=1e-5)


def test_fixed_and_confidence_weights():
  t = 1.0
  soft = np.sum(np_softmax(Z) * (np.log(np_softmax(Z)) - np.log(np_softmax(S))), -1)
  loss, _ = losses.mkdm_loss(S, Z, Y, W, alpha=1.0, temperature=t, weighting='fixed', fixed_weights=(3, 1))
  np.testing.assert_allclose(loss, np.mean(0.75 * soft[:, 0] + 0.25 * soft[:, 1]), rtol=1e-5)
  conf = np_softmax(Z).max(-1)
  w = conf / conf.sum(1, keepdims=True)
  loss, _ = losses.mkdm_loss(S, Z, Y, W, alpha=1.0, temperature=t, weighting='confidence')
  np.testing.assert_allclose(loss, np.mean(np.sum(w * soft, 1)), rtol=1e-5)


def test_sample_weights_follow_each_teachers_cross_entropy_with_the_gold_label():
  """CA-MKD's per-example weights by hand: teachers 0, 1, 2 give the gold class probabilities 0.9, 0.5 and 0.1
  (CE -log p); w_t = (1 - exp(CE_t) / sum_k exp(CE_k)) / 2; an unlabelled row gets 1/3 each."""
  p = np.array([0.9, 0.5, 0.1])
  logits = np.stack([np.log(1 - p), np.log(p)], axis=-1)[None].repeat(2, 0).astype(np.float32)  # [2, 3, 2]
  labels = np.array([1, -1], np.int32)
  w = np.asarray(losses.teacher_weights(logits, 'sample', labels=labels))
  inverse = 1 / p  # exp(CE_t) = 1 / p_t
  expected = (1 - inverse / inverse.sum()) / 2
  np.testing.assert_allclose(w[0], expected, rtol=1e-5)
  assert w[0, 0] > w[0, 1] > w[0, 2]  # the teacher that predicts the label best counts most
  np.testing.assert_allclose(w.sum(1), [1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(w[1], [1 / 3] * 3, rtol=1e-6)
  # The gold label 0 reverses the order.
  w0 = np.asarray(losses.teacher_weights(logits[:1], 'sample', labels=np.array([0], np.int32)))
  assert w0[0, 2] > w0[0, 1] > w0[0, 0]
  # In the loss: the per-head soft terms weighted by them.
  student = np.zeros((2, 3, 2), np.float32)
  soft = np.sum(np_softmax(logits) * (np.log(np_softmax(logits)) - np.log(np_softmax(student))), -1)
  loss, _ = losses.mkdm_loss(student, logits, labels, np.ones(2, np.float32), alpha=1.0, temperature=1.0,
                             weighting='sample')
  np.testing.assert_allclose(loss, np.mean(np.sum(w * soft, 1)), rtol=1e-5)
  with pytest.raises(ValueError, match='needs the gold labels'):
    losses.teacher_weights(logits, 'sample')


def test_missing_labels_use_soft_term_only_and_padding_is_ignored():
  t, alpha = 1.0, 0.25
  labels = np.array([-1, 1], np.int32)
  soft = np.sum(np_softmax(Z) * (np.log(np_softmax(Z)) - np.log(np_softmax(S))), -1)
  gold = -np.log(np_softmax(S))[1, :, 1]
  row0 = np.mean(soft[0])  # unlabelled: full weight on the soft term
  row1 = np.mean(alpha * soft[1] + (1 - alpha) * gold)
  loss, _ = losses.mkdm_loss(S, Z, labels, W, alpha=alpha, temperature=t)
  np.testing.assert_allclose(loss, (row0 + row1) / 2, rtol=1e-5)
  loss_padded, _ = losses.mkdm_loss(S, Z, labels, np.array([0.0, 1.0], np.float32), alpha=alpha, temperature=t)
  np.testing.assert_allclose(loss_padded, row1, rtol=1e-5)


def test_one_teacher_mkdm_equals_single_teacher_kd():
  """MKDM with one teacher and one head is exactly Hinton KD: alpha*T^2*KL + (1-alpha)*CE."""
  s, z, t, alpha = S[:, :1], Z[:, :1], 3.0, 0.7
  kd = alpha * t * t * np.sum(np_softmax(z, t) * (np.log(np_softmax(z, t)) - np.log(np_softmax(s, t))), -1)
  kd += (1 - alpha) * -np.log(np_softmax(s))[np.arange(2), :, Y]
  loss, _ = losses.mkdm_loss(s, z, Y, W, alpha=alpha, temperature=t)
  np.testing.assert_allclose(loss, kd.mean(), rtol=1e-5)


def test_gold_only_when_no_teacher():
  loss, m = losses.mkdm_loss(S[:, :1], None, Y, W, alpha=0.5, temperature=1.0)
  np.testing.assert_allclose(loss, np.mean(-np.log(np_softmax(S[:, 0]))[np.arange(2), Y]), rtol=1e-5)
  assert 'soft' not in m


def test_intermediate_terms():
  rng = np.random.default_rng(0)
  hs, ht = rng.normal(size=(2, 3, 4)).astype(np.float32), rng.normal(size=(2, 3, 4)).astype(np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  expected = np.sum(np.mean((hs - ht) ** 2, -1) * mask) / mask.sum()
  np.testing.assert_allclose(losses.hidden_state_mse(hs, ht, jnp.eye(4), mask), expected, rtol=1e-5)
  a = np_softmax(rng.normal(size=(2, 2, 3, 3)))
  np.testing.assert_allclose(losses.attention_kl(a, a, mask), 0.0, atol=1e-6)
  b = np_softmax(rng.normal(size=(2, 2, 3, 3)))
  assert float(losses.attention_kl(b, a, mask)) > 0


def test_schedules():
  s = losses.linear_schedule(4.0, 1.0, 3)
  np.testing.assert_allclose([float(s(i)) for i in range(5)], [4, 3, 2, 1, 1])
  assert float(losses.linear_schedule(2.0, 2.0, 10)(7)) == 2.0
