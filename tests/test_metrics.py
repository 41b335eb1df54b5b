"""Tests of mkdm_jax.metrics against scikit-learn, hand-worked rankings and the WikiQA reference files."""
import numpy as np
import pytest
from sklearn import metrics as skm

from mkdm_jax import metrics
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
  # Question 1: rows 5 and 6 tie at 0.5 and keep row order: 4 (-, 0.9), 5 (-), 6 (+): AP = 1/3, RR = 1/3.
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
  # Sentence-order ranker: the file lists each question's sentences in document order.
  got = metrics.compute(["map", "mrr"], test.labels, binary_probs(1 - test.ids / len(test)), test.groups)
  assert got["map"] == pytest.approx(0.633, abs=5e-4) and got["mrr"] == pytest.approx(0.634, abs=5e-4)
