"""mkdm_jax.stats against hand and brute-force computations."""
import itertools

import numpy as np
import pytest
import scipy.stats

from mkdm_jax import stats


def sign_flip_p(differences):
  """Exact two-sided sign-flip p-value by enumerating all 2^n flips."""
  observed = abs(np.mean(differences))
  flipped = [abs(np.mean(np.multiply(signs, differences)))
             for signs in itertools.product((-1, 1), repeat=len(differences))]
  return np.mean(np.array(flipped) >= observed - 1e-12)


def test_p_value_is_exact_sign_flip_enumeration_on_small_cases():
  a = np.array([0.9, 0.5, 0.75, 0.6, 1.0, 0.3, 0.65, 0.7])
  b = np.array([0.6, 0.6, 0.5, 0.55, 0.6, 0.5, 0.5, 0.6])
  result = stats.paired_bootstrap(a, b)
  assert result['mean_difference'] == pytest.approx(np.mean(a - b))
  assert result['p_value'] == pytest.approx(sign_flip_p(a - b))  # 42 of 256 flips: 0.1640625
  assert result['p_value'] == pytest.approx(42 / 256)
  swapped = stats.paired_bootstrap(b, a)
  assert swapped['p_value'] == pytest.approx(result['p_value'])
  assert swapped['mean_difference'] == pytest.approx(-result['mean_difference'])
  assert (swapped['ci_low'], swapped['ci_high']) == pytest.approx((-result['ci_high'], -result['ci_low']), abs=0.02)


def test_monte_carlo_p_value_is_close_to_the_exact_one():
  differences = np.random.default_rng(1).normal(0.05, 0.2, 16)  # 65,536 flips > 10,000 resamples
  exact = sign_flip_p(differences)
  estimate = stats.paired_bootstrap(differences, np.zeros(16), num_resamples=10000, seed=3)['p_value']
  assert abs(estimate - exact) < 4 * np.sqrt(exact * (1 - exact) / 10000) + 1e-4
  assert 0 < estimate <= 1


def test_identical_scores_give_p_one_and_a_zero_interval():
  a = np.array([0.2, 0.5, 1.0, 0.7])
  assert stats.paired_bootstrap(a, a) == {'mean_difference': 0.0, 'ci_low': 0.0, 'ci_high': 0.0, 'p_value': 1.0}


def test_bootstrap_interval():
  # Three questions: 27 equally likely resamples; the smallest and largest means (all of one question) each
  # have probability 1/27 > 2.5%, so the 95% percentile interval is [min, max] of the differences.
  result = stats.paired_bootstrap([0.5, 0.4, 0.9], [0.4, 0.5, 0.6])
  assert (result['ci_low'], result['ci_high']) == pytest.approx((-0.1, 0.3))
  # Many questions: close to the normal interval mean +- 1.96 sd / sqrt(n).
  differences = np.random.default_rng(0).normal(0.03, 0.3, 400)
  result = stats.paired_bootstrap(differences, np.zeros(400), seed=1)
  half = 1.96 * differences.std(ddof=1) / np.sqrt(400)
  assert result['ci_low'] == pytest.approx(differences.mean() - half, abs=0.15 * half)
  assert result['ci_high'] == pytest.approx(differences.mean() + half, abs=0.15 * half)


def test_holm_by_hand():
  # Sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> 0.06 (monotone).
  assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
  assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # 0.5 * 2 = 1.0, then monotone; capped at 1
  assert stats.holm([0.02, 0.02]) == pytest.approx([0.04, 0.04])
  assert stats.holm([0.3]) == pytest.approx([0.3])


def test_minimal_detectable_difference_by_hand():
  # sd of 1, 2, 3, 4 (ddof=1) = sqrt(5/3); z_0.975 = 1.959964, z_0.8 = 0.841621.
  expected = (1.959964 + 0.841621) * np.sqrt(5 / 3) / np.sqrt(4)
  assert stats.minimal_detectable_difference([1, 2, 3, 4]) == pytest.approx(expected, rel=1e-6)
  # alpha 0.01, power 0.9: z_0.995 = 2.575829, z_0.9 = 1.281552.
  assert stats.minimal_detectable_difference([1, 2, 3, 4], alpha=0.01, power=0.9) == pytest.approx(
      (2.575829 + 1.281552) * np.sqrt(5 / 3) / 2, rel=1e-6)


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError):
    stats.paired_bootstrap([0.1, 0.2], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError):
    stats.paired_bootstrap([0.1], [0.2])
  with pytest.raises(ValueError):
    stats.minimal_detectable_difference([0.1])


def test_two_level_bootstrap_holds_seed_variance():
  """Seeds that disagree widen the interval far beyond what resampling questions alone gives."""
  rng = np.random.default_rng(0)
  questions = rng.normal(0, 0.01, size=200)
  steady = np.stack([questions + 0.02] * 3)  # every seed +0.02 on every question
  shaky = np.stack([questions + 0.06, questions - 0.02, questions + 0.02])  # the same mean, seeds disagree
  zeros = np.zeros_like(steady)
  a, b = stats.two_level_bootstrap(steady, zeros), stats.two_level_bootstrap(shaky, zeros)
  assert a['mean_difference'] == pytest.approx(b['mean_difference'])
  assert a['ci_low'] > 0 and a['p_value'] < 0.001
  assert b['ci_high'] - b['ci_low'] > 5 * (a['ci_high'] - a['ci_low'])
  assert b['se'] > 5 * a['se']
  # One resample's weights by hand: the grid mean of d at drawn seeds and questions.
  d = np.arange(6.0).reshape(2, 3)
  out = stats.two_level_bootstrap(d, np.zeros_like(d), num_resamples=1000)
  assert d.min() <= out['ci_low'] <= out['mean_difference'] == 2.5 <= out['ci_high'] <= d.max()
  with pytest.raises(ValueError):
    stats.two_level_bootstrap(np.zeros(3), np.zeros(3))


def test_detectable_difference_by_hand():
  z = scipy.stats.norm.ppf(0.975) + scipy.stats.norm.ppf(0.8)
  assert stats.detectable_difference(0.01) == pytest.approx(z * 0.01)
  assert stats.detectable_difference(0.01, alpha=0.05 / 7) > stats.detectable_difference(0.01)
