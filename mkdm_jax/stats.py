"""Paired significance tests for comparing two models (see mkdm_jax/studies).

`paired_bootstrap`: the unit is a question; `a` and `b` hold one score per question (e.g. its average precision
averaged over seeds), and questions are resampled: the seeds are treated as fixed. `two_level_bootstrap`: `a` and
`b` hold a score per seed and question, and both are resampled: seeds are a random factor. The one-level
resampling is scipy's: `scipy.stats.bootstrap` (percentile interval) and `scipy.stats.permutation_test` (sign
flips; every one of the 2^n when 2^n <= num_resamples, so the p-value is exact on small cases).
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


def two_level_bootstrap(a, b, num_resamples=10000, seed=0) -> dict:
  """Mean difference of `a - b` with seeds and questions both random factors.

  a, b: [seeds, questions] scores, row s of `a` paired with row s of `b` (the same student seed). Each resample
  draws the seeds and, independently, the questions with replacement (crossed factors) and takes the mean
  difference over the drawn grid, so the interval holds seed-to-seed variance as well as question variance.
  Returns the mean difference, its 95% percentile interval, `se` (the resamples' standard deviation) and a
  two-sided p-value read off the same resamples, 2 min(P(d* <= 0), P(d* >= 0)), at least 1 / (num_resamples + 1)
  (the interval's inversion: p < 0.05 exactly when the 95% interval excludes 0). Hand-written: scipy's bootstrap
  resamples one axis only. With few seeds the seed level is coarse (3 seeds give 10 distinct draws); say so.
  """
  a, b = np.asarray(a, float), np.asarray(b, float)
  if a.shape != b.shape or a.ndim != 2 or a.shape[1] < 2:
    raise ValueError(f'need two [seeds, questions] arrays of one shape with >= 2 questions, got {a.shape} and {b.shape}')
  d = a - b
  seeds, questions = d.shape
  rng = np.random.default_rng(seed)
  # Multinomial counts per seed and per question give each resample's weights: mean_r = w_r^T d v_r.
  w = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=num_resamples) / seeds
  v = rng.multinomial(questions, np.full(questions, 1 / questions), size=num_resamples) / questions
  means = np.einsum('rs,sq,rq->r', w, d, v)
  low, high = np.percentile(means, [2.5, 97.5])
  p = min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean()))
  return {'mean_difference': float(d.mean()), 'ci_low': float(low), 'ci_high': float(high),
          'p_value': max(p, 1 / (num_resamples + 1)), 'se': float(means.std(ddof=1))}


def detectable_difference(se, alpha=0.05, power=0.8) -> float:
  """The smallest true difference a two-sided test at level `alpha` detects with `power` when the estimate's
  standard error is `se` (normal approximation): (z_{1-alpha/2} + z_power) * se."""
  return float((scipy.stats.norm.ppf(1 - alpha / 2) + scipy.stats.norm.ppf(power)) * se)
