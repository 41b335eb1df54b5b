"""Paired significance tests over questions for comparing two models (see experiments/study.py).

The unit is a question: `a` and `b` hold one score per question (e.g. its average precision, already
averaged over seeds), in the same order. Seeds x questions are not independent, so questions are what
is resampled. Resampling is scipy's: `scipy.stats.bootstrap` (percentile interval) and
`scipy.stats.permutation_test` (sign flips; every one of the 2^n when 2^n <= num_resamples, so the
p-value is exact on small cases).
"""
import numpy as np
import scipy.stats


def _differences(a, b):
  a, b = np.asarray(a, float), np.asarray(b, float)
  if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
    raise ValueError(f'need two 1-d score arrays of one length >= 2, got shapes {a.shape} and {b.shape}')
  return a - b


def paired_bootstrap(a, b, num_resamples=10000, seed=0) -> dict:
  """Mean difference of `a - b` over questions, its 95% percentile bootstrap interval (questions
  resampled with replacement) and a two-sided p-value.

  The p-value is the paired randomization (sign-flip) test: under the null hypothesis that the two
  models are exchangeable on every question, each question's difference is as likely negated, so p is
  the share of sign flips whose mean difference is at least as far from 0 as the observed one (exact
  enumeration when 2^n <= num_resamples, else a Monte Carlo estimate that counts the observed flip,
  (1 + hits) / (1 + num_resamples)). It is exact in finite samples, unlike a bootstrap p-value, and is
  the test Smucker, Allan and Carterette (CIKM 2007) recommend for IR metrics.
  """
  differences = _differences(a, b)
  rng = np.random.default_rng(seed)
  interval = scipy.stats.bootstrap((differences,), np.mean, n_resamples=num_resamples, method='percentile',
                                   rng=rng).confidence_interval
  test = scipy.stats.permutation_test((differences,), np.mean, permutation_type='samples',
                                      n_resamples=num_resamples, rng=rng)
  return {'mean_difference': float(differences.mean()), 'ci_low': float(interval.low),
          'ci_high': float(interval.high), 'p_value': float(test.pvalue)}


def holm(p_values) -> np.ndarray:
  """Holm-Bonferroni adjusted p-values, in the given order: the i-th smallest (0-based) is multiplied by
  m - i, made non-decreasing in that order and capped at 1. Hand-written: scipy has no Holm correction
  (scipy.stats.false_discovery_control is Benjamini-Hochberg/Yekutieli) and statsmodels is not a dependency."""
  p = np.asarray(p_values, float)
  order = np.argsort(p, kind='stable')
  adjusted = np.empty_like(p)
  adjusted[order] = np.minimum(1.0, np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]))
  return adjusted


def minimal_detectable_difference(differences, alpha=0.05, power=0.8) -> float:
  """The smallest true mean difference a two-sided test at level `alpha` detects with `power`, given the
  per-question differences' standard deviation (ddof=1) and count, normal approximation:
  (z_{1-alpha/2} + z_power) * sd / sqrt(n)."""
  differences = np.asarray(differences, float)
  if differences.ndim != 1 or len(differences) < 2:
    raise ValueError(f'need a 1-d array of >= 2 differences, got shape {differences.shape}')
  z = scipy.stats.norm.ppf(1 - alpha / 2) + scipy.stats.norm.ppf(power)
  return float(z * differences.std(ddof=1) / np.sqrt(len(differences)))
