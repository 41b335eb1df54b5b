"""Word-overlap teachers (`overlap:count`, `overlap:idf`): the number of the question's distinct non-stop words that
occur in the passage, or their summed IDF over the run's distinct passages (the WikiQA paper's "Word Cnt" and "Wgt
Word Cnt" baselines), calibrated on dev."""
import collections
import math
import re

import numpy as np

from mkdm_jax.teachers.base import Calibrated

WEIGHTS = ('count', 'idf')
# Hand-written (a dozen function words; the baseline needs no NLP library): words that say nothing about
# whether a passage answers a question.
STOP_WORDS = frozenset('a an and are as at be by did do does for from how in is it of on or the to was were what '
                       'when where which who whom why with'.split())


class WordOverlap(Calibrated):
  kind = 'overlap'

  def fingerprint(self):
    return f'overlap:{self.source}'

  def score_pairs(self, ctx, text_a, text_b):
    """IDF over the distinct passages of every set of the run."""
    return word_overlap_scorer(self.source, [text for e in ctx.examples.values() for text in e.text_b])(text_a, text_b)

  def report_fields(self):
    return {'params': 0}


def _words(text):
  return set(re.findall(r'\w+', text.lower())) - STOP_WORDS


def word_overlap_scorer(weight: str, passages):
  """(text_a, text_b) -> per pair, the question's distinct non-stop words found in the passage, counted
  (`count`) or weighted by their IDF log(N / df) over the distinct `passages` (`idf`; the table is built once
  here). Passages of text_b missing from `passages` join the table on the call that scores them."""
  documents = set(passages)
  frequency = collections.Counter(w for passage in documents for w in _words(passage))

  def scores(text_a, text_b):
    new = set(text_b) - documents
    table = frequency + collections.Counter(w for passage in new for w in _words(passage)) if new else frequency
    n = len(documents) + len(new)
    value = (lambda w: 1.0) if weight == 'count' else (lambda w: math.log(n / table[w]))
    return np.array([sum(value(w) for w in _words(a) & _words(b)) for a, b in zip(text_a, text_b)], np.float64)
  return scores
