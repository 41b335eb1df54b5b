"""Tests of mkdm_jax.metrics: scikit-learn, trec_eval, hand-worked rankings and the WikiQA reference files."""
# ir-measures (terrier-org, maintained) computes AP and RR with trec_eval's own C code (through
# pytrec-eval-terrier, its one dependency), installs as two wheels and imports in a tenth of a second;
# ranx needs numba (JIT compiles on first use) and pulls ir_datasets, pandas and seaborn.
import ir_measures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from mkdm_jax import metrics, models
from mkdm_jax.data import load_split, resolve_data_dir
from mkdm_jax.errors import UserError

DATA = resolve_data_dir()


def binary_probs(scores):
  scores = np.asarray(scores, dtype=np.float64)
  return np.stack([1 - scores, scores], axis=1)


@pytest.mark.parametrize("seed", range(5))
def test_against_sklearn(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, size=300)
  scores = np.round(rng.random(300), 1)  # Many ties.
  labels[:20] = -1
  got = metrics.compute(["accuracy", "precision", "recall", "f1", "auc"], labels, binary_probs(scores))
  y, s = labels[20:], scores[20:]
  predicted = binary_probs(s).argmax(1)
  assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, predicted))
  assert got["precision"] == pytest.approx(skm.precision_score(y, predicted, zero_division=0))
  assert got["recall"] == pytest.approx(skm.recall_score(y, predicted))
  assert got["f1"] == pytest.approx(skm.f1_score(y, predicted))
  assert got["auc"] == pytest.approx(skm.roc_auc_score(y, s))


def test_edge_cases():
  assert metrics.compute(["f1"], [1, 0], binary_probs([0.1, 0.2]))["f1"] == 0.0
  assert np.isnan(metrics.compute(["auc"], [1, 1], binary_probs([0.1, 0.2]))["auc"])
  assert np.isnan(metrics.compute(["accuracy"], [-1], binary_probs([0.1]))["accuracy"])
  three = np.eye(3)[[0, 1, 2, 2]]
  assert metrics.compute(["accuracy"], [0, 1, 2, 1], three)["accuracy"] == 0.75
  with pytest.raises(UserError, match=r"metric\(s\) \['f1'\] need 2 classes, got 3"):
    metrics.compute(["f1"], [0, 1, 2, 1], three)
  with pytest.raises(UserError, match="unknown metric"):
    metrics.compute(["bleu"], [0], binary_probs([0.1]))
  with pytest.raises(UserError, match="map/mrr need question groups"):
    metrics.compute(["map"], [0], binary_probs([0.1]))


def test_map_mrr_hand_worked():
  # Question 0: ranked by score: rows 2 (+), 0 (-), 3 (+), 1 (-): AP = (1/1 + 2/3) / 2 = 5/6, RR = 1.
  # Question 1: rows 5 (-) and 6 (+) tie at 0.5, the negative first: 4 (-, 0.9), 5, 6: AP = 1/3, RR = 1/3.
  # Question 2 (no positive), question 3 (only positives) and the unlabelled row 11 are not evaluated.
  labels = [0, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1, -1]
  scores = [0.6, 0.1, 0.9, 0.4, 0.9, 0.5, 0.5, 0.3, 0.2, 0.7, 0.8, 0.99]
  groups = [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 1]
  got = metrics.compute(["map", "mrr"], labels, binary_probs(scores), groups)
  assert got["map"] == pytest.approx((5 / 6 + 1 / 3) / 2)
  assert got["mrr"] == pytest.approx((1 + 1 / 3) / 2)
  assert metrics.evaluated_groups(np.array(labels), np.array(groups)).tolist() == [0, 1]
  assert metrics.evaluated_groups(np.array([1, -1]), np.array([0, 0])).tolist() == []
  assert np.isnan(metrics.compute(["map"], [0, 0], binary_probs([0.1, 0.2]), [0, 0])["map"])


def test_groups_may_be_strings_and_unordered():
  got = metrics.compute(["map", "mrr"], [1, 0, 0, 1], binary_probs([0.2, 0.3, 0.9, 0.1]), ["b", "a", "b", "a"])
  assert got == {"map": pytest.approx(0.5), "mrr": pytest.approx(0.5)}


def test_wikiqa_protocol_matches_reference_files():
  test = load_split("wikiqa", "test")
  ref = np.loadtxt(DATA / "wikiqa" / "ref" / "WikiQA-test-filtered.ref", dtype=np.int64)
  # Ref question ids are 1-based question indices in file order, i.e. our group codes + 1.
  kept = metrics.evaluated_groups(test.labels, test.groups)
  assert len(kept) == len(np.unique(ref[:, 0])) == 237
  np.testing.assert_array_equal(kept + 1, np.unique(ref[:, 0]))
  in_ref = np.isin(test.groups, kept)
  np.testing.assert_array_equal(test.labels[in_ref], ref[:, 3])
  # Sentence-order ranker: the file lists each question's sentences in document order, as do our rows.
  position = np.arange(len(test)) / len(test)
  got = metrics.compute(["map", "mrr"], test.labels, binary_probs(1 - position), test.groups)
  assert got["map"] == pytest.approx(0.633, abs=5e-4) and got["mrr"] == pytest.approx(0.634, abs=5e-4)


@pytest.mark.parametrize("labels, scores, ap, rr", [
    ([1, 0, 0], [0.5, 0.5, 0.5], 1 / 3, 1 / 3),  # The positive ranks below its tied negatives.
    ([0, 0, 1], [0.5, 0.5, 0.5], 1 / 3, 1 / 3),
    ([1, 1, 0], [0.7, 0.7, 0.3], 1, 1),  # Ties among positives cost nothing.
    # 0.9 (-) at rank 1; tie block at ranks 2-5: the two negatives, then the two positives; 0.1 (+) at rank 6.
    ([0, 1, 0, 1, 0, 1], [0.9, 0.5, 0.5, 0.5, 0.5, 0.1], (1 / 4 + 2 / 5 + 3 / 6) / 3, 1 / 4),
])
def test_ties_rank_pessimistically(labels, scores, ap, rr):
  got = metrics.compute(["map", "mrr"], labels, binary_probs(scores), [7] * len(labels))
  assert got == {"map": pytest.approx(ap), "mrr": pytest.approx(rr)}


def test_average_precisions_per_group():
  # Group "b": 0.9 (+), 0.2 (-): AP = RR = 1. Group "a": 0.5 (-), 0.4 (+), 0.3 (+): AP = (1/2 + 2/3) / 2,
  # RR = 1/2; its unlabelled row (0.99) is ignored. Group "c" has no negative and is not evaluated.
  labels = [0, 1, 0, 1, -1, 1, 1]
  scores = [0.2, 0.9, 0.5, 0.4, 0.99, 0.3, 0.1]
  groups = ["b", "b", "a", "a", "a", "a", "c"]
  keys, ap, rr = metrics.average_precisions(labels, scores, groups)
  assert keys.tolist() == ["a", "b"]
  np.testing.assert_allclose(ap, [(1 / 2 + 2 / 3) / 2, 1])
  np.testing.assert_allclose(rr, [1 / 2, 1])
  assert metrics.ranking(np.array(labels), np.array(scores), np.array(groups)) == (ap.mean(), rr.mean())
  keys, ap, rr = metrics.average_precisions([1, 1], [0.1, 0.2], [0, 0])
  assert len(keys) == len(ap) == len(rr) == 0


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1), st.sampled_from([0.0, 0.5, 1.0])),
                     min_size=1, max_size=12),
       data=st.data())
def test_ranking_ignores_row_order(rows, data):
  groups, labels, scores = map(np.array, zip(*rows))
  order = np.array(data.draw(st.permutations(range(len(rows)))))
  keys, ap, rr = metrics.average_precisions(labels, scores, groups)
  shuffled = metrics.average_precisions(labels[order], scores[order], groups[order])
  np.testing.assert_array_equal(keys, shuffled[0])
  np.testing.assert_array_equal(ap, shuffled[1])
  np.testing.assert_array_equal(rr, shuffled[2])


def minilm_relevance(examples, checkpoint, batch_size=64):
  """Zero-shot relevance: cosine of mean-pooled MiniLM embeddings of text_a and text_b (each text once)."""
  config, params = models.load_hf_encoder(checkpoint)
  tokenizer = models.load_tokenizer(checkpoint)
  tokenizer.enable_truncation(64)
  encoder = models.BertEncoder(config)

  @jax.jit
  def embed(ids, mask):
    hidden = encoder.apply({"params": params}, ids, jnp.zeros_like(ids), mask)["sequence"]
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return mean / jnp.linalg.norm(mean, axis=-1, keepdims=True)

  texts = sorted(set(examples.text_a) | set(examples.text_b))
  tokens = [e.ids for e in tokenizer.encode_batch(texts)]
  by_length = np.argsort([len(t) for t in tokens])
  vectors = np.zeros((len(texts), config.hidden_size), np.float32)
  for start in range(0, len(texts), batch_size):
    rows = by_length[start:start + batch_size]
    width = -(-len(tokens[rows[-1]]) // 16) * 16  # The longest, rounded up: a few widths to compile.
    ids, mask = np.zeros((2, batch_size, width), np.int32)
    mask[:, 0] = 1  # Rows past the last text stay valid (attending to [PAD]) and are dropped.
    for i, row in enumerate(rows):
      ids[i, :len(tokens[row])], mask[i, :len(tokens[row])] = tokens[row], 1
    vectors[rows] = np.asarray(embed(ids, mask))[:len(rows)]
  index = {text: i for i, text in enumerate(texts)}
  embedded = lambda column: vectors[[index[text] for text in column]]
  return np.sum(embedded(examples.text_a) * embedded(examples.text_b), axis=1)


def test_map_mrr_match_trec_eval_on_minilm_scores(minilm_dir):
  dev = load_split("wikiqa", "dev")
  scores = minilm_relevance(dev, minilm_dir)
  kept = metrics.evaluated_groups(dev.labels, dev.groups)
  # Tie-free, so no tie rule matters (ir-measures documents none). Only evaluated questions are checked:
  # unevaluated question 9 lists one sentence twice.
  for group in kept:
    assert len(np.unique(scores[dev.groups == group])) == np.sum(dev.groups == group)
  rows = np.flatnonzero(np.isin(dev.groups, kept))
  qrels = [ir_measures.Qrel(str(dev.groups[i]), str(i), int(dev.labels[i])) for i in rows]
  run = [ir_measures.ScoredDoc(str(dev.groups[i]), str(i), float(scores[i])) for i in rows]
  measures = [ir_measures.AP, ir_measures.RR]
  theirs = {(m.query_id, str(m.measure)): m.value for m in ir_measures.iter_calc(measures, qrels, run)}
  keys, ap, rr = metrics.average_precisions(dev.labels, scores, dev.groups)
  np.testing.assert_array_equal(keys, kept)
  np.testing.assert_allclose(ap, [theirs[str(k), "AP"] for k in keys], rtol=0, atol=1e-6)
  np.testing.assert_allclose(rr, [theirs[str(k), "RR"] for k in keys], rtol=0, atol=1e-6)
  ours = metrics.compute(["map", "mrr"], dev.labels, binary_probs(scores), dev.groups)
  aggregate = ir_measures.calc_aggregate(measures, qrels, run)
  assert ours["map"] == pytest.approx(aggregate[ir_measures.AP], abs=1e-6)
  assert ours["mrr"] == pytest.approx(aggregate[ir_measures.RR], abs=1e-6)


@pytest.mark.parametrize("labels, scores, threshold", [
    # F1 = 2TP / (predicted + positives) for thresholds 0.1 ... 0.9: 6/9, 6/8, 4/7, 4/6, 2/5, 0.
    ([0, 1, 0, 1, 1, 0], [0.1, 0.2, 0.3, 0.4, 0.8, 0.9], 0.2),
    # 0.9 and 0.2 both give F1 = 2/3 (0.6: 1/2, 0.5: 2/5): the larger threshold wins.
    ([1, 0, 0, 1], [0.9, 0.6, 0.5, 0.2], 0.9),
    # Tied scores: 0.7 -> 2/(2+2), 0.4 -> 4/(4+2), 0.1 -> 4/(5+2); the unlabelled 0.95 is no candidate.
    ([1, 0, 1, 1, 0, -1], [0.7, 0.7, 0.4, 0.4, 0.1, 0.95], 0.4),
])
def test_best_f1_threshold_hand_worked(labels, scores, threshold):
  assert metrics.best_f1_threshold(labels, scores) == threshold


@pytest.mark.parametrize("seed", range(5))
def test_best_f1_threshold_against_sklearn(seed):
  rng = np.random.default_rng(seed)
  labels = (rng.random(200) < 0.1).astype(int)
  scores = np.round(rng.random(200) * 0.5 + 0.3 * labels, 2)  # Mostly negative, with ties.
  f1 = {t: skm.f1_score(labels, scores >= t) for t in np.unique(scores)}
  best = max(f1.values())
  got = metrics.best_f1_threshold(labels, scores)
  assert got == max(t for t, v in f1.items() if v == pytest.approx(best, abs=1e-12))
  results = metrics.compute(["f1"], labels, binary_probs(scores), threshold=got)
  assert results["f1_at_threshold"] == pytest.approx(best)
  assert results["accuracy_at_threshold"] == pytest.approx(skm.accuracy_score(labels, scores >= got))
  with pytest.raises(UserError, match="at least one positive"):
    metrics.best_f1_threshold([0, 0, -1], [0.1, 0.2, 0.3])


def test_compute_at_threshold():
  # probs[:, 1] >= 0.3 predicts 1 1 0 1 (argmax: 1 0 0 0); the unlabelled row is ignored. TP 2, FP 1, FN 0.
  labels, scores = [1, 0, 0, 1, -1], [0.6, 0.4, 0.2, 0.3, 0.9]
  got = metrics.compute(["accuracy", "f1"], labels, binary_probs(scores), threshold=0.3)
  assert got == {"accuracy": 0.75, "f1": pytest.approx(2 / 3), "accuracy_at_threshold": 0.75,
                 "f1_at_threshold": pytest.approx(0.8)}
  assert set(metrics.compute(["accuracy"], labels, binary_probs(scores))) == {"accuracy"}
  unlabelled = metrics.compute(["accuracy"], [-1], binary_probs([0.5]), threshold=0.5)
  assert set(unlabelled) == {"accuracy", "accuracy_at_threshold", "f1_at_threshold"}
  assert all(np.isnan(v) for v in unlabelled.values())
  with pytest.raises(UserError, match="threshold needs 2 classes, got 3"):
    metrics.compute(["accuracy"], [0, 1, 2], np.eye(3), threshold=0.5)


def test_teacher_diversity_by_hand():
  """Two rows, three teachers. Row 0: teachers 0 and 1 say class 1, teacher 2 class 0; row 1: all say 0."""
  logits = np.array([[[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]],
                     [[1.0, 0.0], [2.0, 0.0], [1.0, 0.0]]])
  out = metrics.teacher_diversity(logits)
  assert out['disagreement'] == pytest.approx((0.5 + 0.5 + 0.0) / 3)  # pairs (0,1) (0,2) (1,2): rows differing
  p = lambda z: np.exp(z) / np.exp(z).sum()
  kl = lambda a, b: np.sum(p(a) * np.log(p(a) / p(b))) + np.sum(p(b) * np.log(p(b) / p(a)))
  per_pair = [np.mean([kl(logits[r, i], logits[r, j]) for r in range(2)]) for i, j in ((0, 1), (0, 2), (1, 2))]
  assert out['symmetric_kl'] == pytest.approx(np.mean(per_pair))
  same = metrics.teacher_diversity(np.repeat(logits[:, :1], 3, axis=1))
  assert same == {'disagreement': 0.0, 'symmetric_kl': 0.0}
  with pytest.raises(ValueError, match='teachers >= 2'):
    metrics.teacher_diversity(logits[:, :1])


def test_ranking_agreement_by_hand():
  """Per question Kendall tau between rankers' scores (positive minus negative logit), averaged over questions,
  then over ranker pairs; one-row questions and constant scores have no tau."""
  to_logits = lambda scores: np.stack([np.zeros_like(scores), scores], axis=-1)  # score = logit 1 - logit 0
  groups = np.array([0, 0, 0, 1, 1, 1, 2])
  same = np.array([1.0, 2.0, 3.0, 3.0, 1.0, 2.0, 5.0])
  reversed_in_q1 = np.array([1.0, 2.0, 3.0, 1.0, 3.0, 2.0, 0.0])  # q0: tau 1; q1: order 2,0,1 vs 0,2,1 -> tau -1
  logits = to_logits(np.stack([same, same, reversed_in_q1], axis=1))  # [7, 3, 2]
  # Pairs (0, 1): 1 and 1 -> 1; (0, 2) and (1, 2): q0 1, q1 -1 -> 0. Mean over pairs: 1/3.
  assert metrics.ranking_agreement(logits, groups) == pytest.approx(1 / 3)
  assert metrics.ranking_agreement(logits[:, :2], groups) == pytest.approx(1.0)
  constant = to_logits(np.stack([same, np.ones(7)], axis=1))
  assert np.isnan(metrics.ranking_agreement(constant, groups))  # no question has a tau
  with pytest.raises(ValueError, match='two-class logits'):
    metrics.ranking_agreement(logits[:, :1], groups)
