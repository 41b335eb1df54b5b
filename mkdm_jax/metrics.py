"""Classification and answer-ranking metrics.

Rows with label -1 are ignored. Binary metrics score class 1: precision/recall/f1 of predicting class 1
(argmax; 0 when undefined, as scikit-learn's zero_division=0), ROC AUC by the rank statistic with tied
scores given their average rank (nan when only one class is present).

`map` / `mrr` follow the WikiQA answer-selection protocol (the `*-filtered.ref` files): per question
(`groups`), candidates are ranked by probs[:, 1], descending, ties kept in their original row order; only
questions with at least one positive and at least one negative candidate are evaluated.
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


def ranking(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
  """(MAP, MRR) over the evaluated groups; nan when there are none."""
  keep = np.flatnonzero(np.isin(groups, evaluated_groups(labels, groups)))
  if not len(keep):
    return float("nan"), float("nan")
  keep = keep[np.argsort(groups[keep], kind="stable")]
  boundaries = np.flatnonzero(groups[keep][1:] != groups[keep][:-1]) + 1
  average_precisions, reciprocal_ranks = [], []
  for rows in np.split(keep, boundaries):
    ranked = rows[np.argsort(-scores[rows], kind="stable")]  # Ties keep row order.
    hit_ranks = np.flatnonzero(labels[ranked] == 1) + 1
    average_precisions.append(np.mean(np.arange(1, len(hit_ranks) + 1) / hit_ranks))
    reciprocal_ranks.append(1 / hit_ranks[0])
  return float(np.mean(average_precisions)), float(np.mean(reciprocal_ranks))


def compute(metric_names, labels, probs, groups=None) -> dict[str, float]:
  """The named metrics of `probs` [N, C] against `labels` [N] (-1 = ignored); groups for map/mrr."""
  unknown = [m for m in metric_names if m not in METRICS]
  if unknown:
    raise UserError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
  labels, probs = np.asarray(labels), np.asarray(probs)
  binary_only = [m for m in metric_names if m in _BINARY_ONLY]
  if binary_only and probs.shape[1] != 2:
    raise UserError(f"metric(s) {binary_only} need 2 classes, got {probs.shape[1]}")
  if {"map", "mrr"} & set(metric_names) and groups is None:
    raise UserError("metrics map/mrr need question groups (for tsv/jsonl data, give group_col)")
  keep = labels >= 0
  if not keep.any():
    return {m: float("nan") for m in metric_names}
  labels, probs = labels[keep], probs[keep]
  predicted = probs.argmax(axis=1)
  true_pos = float(np.sum((predicted == 1) & (labels == 1)))
  precision = true_pos / max(np.sum(predicted == 1), 1)
  recall = true_pos / max(np.sum(labels == 1), 1)
  results = {
      "accuracy": float(np.mean(predicted == labels)),
      "precision": precision,
      "recall": recall,
      "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
  }
  if "auc" in metric_names:
    results["auc"] = roc_auc(labels, probs[:, 1])
  if {"map", "mrr"} & set(metric_names):
    results["map"], results["mrr"] = ranking(labels, probs[:, 1], np.asarray(groups)[keep])
  return {m: results[m] for m in metric_names}
