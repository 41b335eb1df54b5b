"""Classification and answer-ranking metrics.

Rows with label -1 are ignored. Binary metrics score class 1: precision/recall/f1 of predicting class 1
(argmax; 0 when undefined, as scikit-learn's zero_division=0), ROC AUC by the rank statistic with tied
scores given their average rank (nan when only one class is present).

`map` / `mrr` follow the WikiQA answer-selection protocol (the `*-filtered.ref` files): per question
(`groups`), candidates are ranked by probs[:, 1], descending; only questions with at least one positive
and at least one negative candidate are evaluated. Ties are broken pessimistically: within a block of
equal scores the negatives rank first, so a positive tied with negatives ranks below all of them. Row
order never matters (WikiQA lists candidates in document order, which alone scores 0.633 MAP).

Given a `threshold` on probs[:, 1] (binary tasks; tune it with `best_f1_threshold` on dev data),
`compute` also returns `accuracy_at_threshold` and `f1_at_threshold`, predicting class 1 when
probs[:, 1] >= threshold: argmax (a 0.5 threshold) means little when training pairs are balanced and
test candidates mostly negative.
"""
import numpy as np

from mkdm_jax.errors import UserError

METRICS = ("accuracy", "precision", "recall", "f1", "auc", "map", "mrr")
_BINARY_ONLY = ("precision", "recall", "f1", "auc", "map", "mrr")


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC of binary `labels` (0/1) by `scores`, ties counting one half."""
  positives = labels == 1
  num_pos, num_neg = int(positives.sum()), int((~positives).sum())
  if num_pos == 0 or num_neg == 0:
    return float("nan")
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  ends = np.cumsum(counts)
  ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # Average 1-based rank of each tie block.
  return float((ranks[positives].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def evaluated_groups(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
  """The groups with at least one positive and one negative label (the ones map/mrr average over)."""
  keys, inverse = np.unique(groups, return_inverse=True)
  pos = np.bincount(inverse, weights=labels == 1, minlength=len(keys))
  neg = np.bincount(inverse, weights=labels == 0, minlength=len(keys))
  return keys[(pos > 0) & (neg > 0)]


def average_precisions(labels, scores, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(group keys, average precision, reciprocal rank) per evaluated group, keys sorted; ties pessimistic."""
  labels, scores, groups = np.asarray(labels), np.asarray(scores), np.asarray(groups)
  keys = evaluated_groups(labels, groups)
  keep = np.flatnonzero((labels >= 0) & np.isin(groups, keys))
  keep = keep[np.argsort(groups[keep])]
  boundaries = np.flatnonzero(groups[keep][1:] != groups[keep][:-1]) + 1
  ap, rr = np.zeros(len(keys)), np.zeros(len(keys))
  if not len(keys):
    return keys, ap, rr
  for i, rows in enumerate(np.split(keep, boundaries)):
    ranked = rows[np.lexsort((labels[rows], -scores[rows]))]  # Score descending, then negatives first.
    hit_ranks = np.flatnonzero(labels[ranked] == 1) + 1
    ap[i] = np.mean(np.arange(1, len(hit_ranks) + 1) / hit_ranks)
    rr[i] = 1 / hit_ranks[0]
  return keys, ap, rr


def ranking(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
  """(MAP, MRR): the means of `average_precisions`; nan when no group is evaluated."""
  _, ap, rr = average_precisions(labels, scores, groups)
  if not len(ap):
    return float("nan"), float("nan")
  return float(ap.mean()), float(rr.mean())


def best_f1_threshold(labels, scores) -> float:
  """The score threshold maximising F1 of predicting 1 when score >= threshold; ties: the larger one.

  Candidates are the distinct scores of the labelled rows. Hand-written rather than
  sklearn.metrics.precision_recall_curve: scikit-learn is only a test requirement.
  """
  labels, scores = np.asarray(labels), np.asarray(scores)
  positives = labels[labels >= 0] == 1
  if not positives.any():
    raise UserError("best_f1_threshold needs at least one positive label")
  thresholds, inverse = np.unique(scores[labels >= 0], return_inverse=True)
  suffix_sum = lambda x: np.cumsum(x[::-1])[::-1]  # Rows with score >= each threshold.
  true_pos = suffix_sum(np.bincount(inverse, weights=positives, minlength=len(thresholds)))
  predicted = suffix_sum(np.bincount(inverse, minlength=len(thresholds)))
  f1 = 2 * true_pos / (predicted + positives.sum())  # 2TP / (2TP + FP + FN).
  return float(thresholds[np.flatnonzero(f1 == f1.max())[-1]])


def _precision_recall_f1(labels, predicted) -> tuple[float, float, float]:
  true_pos = float(np.sum((predicted == 1) & (labels == 1)))
  precision = true_pos / max(np.sum(predicted == 1), 1)
  recall = true_pos / max(np.sum(labels == 1), 1)
  return precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def compute(metric_names, labels, probs, groups=None, threshold=None) -> dict[str, float]:
  """The named metrics of `probs` [N, C] against `labels` [N] (-1 = ignored); groups for map/mrr.

  With `threshold` (binary only) also `accuracy_at_threshold` and `f1_at_threshold`.
  """
  unknown = [m for m in metric_names if m not in METRICS]
  if unknown:
    raise UserError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
  labels, probs = np.asarray(labels), np.asarray(probs)
  binary_only = [m for m in metric_names if m in _BINARY_ONLY]
  if binary_only and probs.shape[1] != 2:
    raise UserError(f"metric(s) {binary_only} need 2 classes, got {probs.shape[1]}")
  if threshold is not None and probs.shape[1] != 2:
    raise UserError(f"a threshold needs 2 classes, got {probs.shape[1]}")
  if {"map", "mrr"} & set(metric_names) and groups is None:
    raise UserError("metrics map/mrr need question groups (for tsv/jsonl data, give group_col)")
  names = list(metric_names) + (["accuracy_at_threshold", "f1_at_threshold"] if threshold is not None else [])
  keep = labels >= 0
  if not keep.any():
    return {m: float("nan") for m in names}
  labels, probs = labels[keep], probs[keep]
  predicted = probs.argmax(axis=1)
  results = dict(zip(("precision", "recall", "f1"), _precision_recall_f1(labels, predicted)))
  results["accuracy"] = float(np.mean(predicted == labels))
  if threshold is not None:
    predicted = (probs[:, 1] >= threshold).astype(int)
    results["accuracy_at_threshold"] = float(np.mean(predicted == labels))
    results["f1_at_threshold"] = _precision_recall_f1(labels, predicted)[2]
  if "auc" in metric_names:
    results["auc"] = roc_auc(labels, probs[:, 1])
  if {"map", "mrr"} & set(metric_names):
    results["map"], results["mrr"] = ranking(labels, probs[:, 1], np.asarray(groups)[keep])
  return {m: results[m] for m in names}


def teacher_diversity(logits) -> dict[str, float]:
  """How much teachers differ on the same rows, from their logits [N, T, C] (T >= 2), averaged over the
  T(T-1)/2 teacher pairs: `disagreement`, the share of rows where the two argmax classes differ, and
  `symmetric_kl`, the mean over rows of KL(p||q) + KL(q||p) between their softmax distributions (T = 1)."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 3 or logits.shape[1] < 2:
    raise ValueError(f'need logits [rows, teachers >= 2, classes], got shape {logits.shape}')
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  pairs = [(i, j) for i in range(logits.shape[1]) for j in range(i + 1, logits.shape[1])]
  disagree = [np.mean(logits[:, i].argmax(-1) != logits[:, j].argmax(-1)) for i, j in pairs]
  kl = [np.mean(np.sum((np.exp(log_p[:, i]) - np.exp(log_p[:, j])) * (log_p[:, i] - log_p[:, j]), -1))
        for i, j in pairs]  # KL(p||q) + KL(q||p) = sum (p - q)(log p - log q)
  return {'disagreement': float(np.mean(disagree)), 'symmetric_kl': float(np.mean(kl))}


def ranking_agreement(logits, groups) -> float:
  """How alike K rankers rank each question's candidates, from their logits [N, K, C] (K >= 2): the mean over the
  K(K-1)/2 pairs of the mean over questions of Kendall's tau-b (scipy) between the two rankers' scores (positive
  minus negative logit) on the question's rows. Questions with fewer than two rows, or on which a ranker gives
  every row one score, have no tau and are left out. 1: the same order everywhere; 0: unrelated orders."""
  from scipy.stats import kendalltau
  logits, groups = np.asarray(logits, np.float64), np.asarray(groups)
  if logits.ndim != 3 or logits.shape[1] < 2 or logits.shape[2] != 2:
    raise ValueError(f'need two-class logits [rows, rankers >= 2, 2], got shape {logits.shape}')
  scores = logits[..., 1] - logits[..., 0]
  order = np.argsort(groups, kind='stable')
  questions = np.split(order, np.flatnonzero(np.diff(groups[order])) + 1)
  questions = [rows for rows in questions if len(rows) >= 2]
  pair_means = []
  for i in range(scores.shape[1]):
    for j in range(i + 1, scores.shape[1]):
      taus = [kendalltau(scores[rows, i], scores[rows, j]).statistic for rows in questions]
      taus = [t for t in taus if np.isfinite(t)]
      pair_means.append(np.mean(taus) if taus else np.nan)
  return float(np.nanmean(pair_means)) if np.isfinite(pair_means).any() else float('nan')
