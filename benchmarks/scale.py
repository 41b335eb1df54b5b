"""Scale benchmark of the streamed TMKD path: prepare, score and stage-1 training on synthetic corpora.

  python benchmarks/scale.py --pairs=100000,1000000 --out=/tmp/bench/scale.json

For each corpus size, a synthetic TSV of question-passage pairs is written (not measured), then each stage
runs in its own process, whose peak resident memory (its VmHWM) and throughput are reported:
  prepare  experiments/prepare.py's work: text shards and the tokenizer's encoding;
  score    a fixed tiny random BERT (--model=tiny: 2 layers, 64 wide, 2 heads, length 32; it measures the
           data path, not model FLOPs) writes its logits on every shard to the store;
  train    --train_steps of TMKD stage 1 streamed from the corpus and its stored logits;
  train_memory  the same steps with the same rows, logits and batches held in memory (the in-memory path),
           on the first --memory_rows rows (a full 10^6-row corpus in memory is what streaming avoids);
  batches  the host side of `train` alone: the fit loop's batches of the same steps built with no model (ms per
           batch: the epoch's order, token gathers from the shards, logit reads), to tell data from compute.
Training throughput is the median of the fit loop's logged examples/s after the first log window (which
holds the compilation). Goal (issue 18): peak memory of each stage at the largest size within 1.2x of the
smallest, and streamed training within 10% of in-memory training. Record the JSON in BENCHMARKS.md.
"""
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time


from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list('pairs', ['100000', '1000000'], 'Corpus sizes (pairs).')
flags.DEFINE_string('out', None, 'Where to write the results JSON.')
flags.DEFINE_enum('model', 'tiny', ['tiny'], 'Model scoring and trained (tiny: the data path, not FLOPs).')
flags.DEFINE_string('workdir', None, 'Folder for corpora and stores (default: a temporary folder, deleted).')
flags.DEFINE_integer('rows_per_shard', 65536, 'Rows per corpus shard.')
flags.DEFINE_integer('train_steps', 600, 'Stage-1 steps timed per corpus (batch --batch_size).')
flags.DEFINE_integer('batch_size', 32, 'Training batch size.')
flags.DEFINE_integer('eval_batch_size', 256, 'Scoring batch size.')
flags.DEFINE_integer('memory_rows', 100000, 'Rows of the in-memory training comparison.')
flags.DEFINE_string('stage', None, 'Internal: run one stage in this process.')
flags.DEFINE_string('corpus', None, 'Internal: corpus folder of --stage.')
flags.DEFINE_string('source', None, 'Internal: TSV file of --stage=prepare.')

LENGTH = 32
WORDS = ('what who where when how which river city country year film song team war king law bank water light '
         'energy music school church island mountain language history science book game disease cell star '
         'ocean planet army bridge road market station company university museum festival computer').split()


def tiny_model():
  from mkdm_jax import models
  config = models.BertConfig(hidden_size=64, num_layers=2, num_attention_heads=2, intermediate_size=256,
                             max_position_embeddings=LENGTH)
  return models.Classifier(config, num_classes=2, num_heads=1)


def tiny_params(model, seed):
  import jax
  from mkdm_jax.models import factory
  return factory.init_params(model, jax.random.PRNGKey(seed))


def tokenizer():
  from mkdm_jax import models
  return models.load_tokenizer(models.resolve_checkpoint('minilm-l6'))


def write_source(path: pathlib.Path, pairs: int):
  """Synthetic pairs: 3-9 word questions, 6-24 word passages, 4 passages per question."""
  import numpy as np
  rng = np.random.default_rng(pairs)
  with open(path, 'w') as f:
    f.write('question\tpassage\n')
    for start in range(0, pairs, 10000):
      n = min(10000, pairs - start)
      qlen, plen = rng.integers(3, 10, n), rng.integers(6, 25, n)
      words = rng.integers(len(WORDS), size=(n, 33))
      f.write(''.join(' '.join(WORDS[w] for w in row[:q]) + f' {(start + i) // 4}\t'
                      + ' '.join(WORDS[w] for w in row[9:9 + p]) + f' {start + i}\n'
                      for i, (row, q, p) in enumerate(zip(words, qlen, plen))))


def stage_prepare():
  from mkdm_jax.data import corpus
  options = corpus.ReadOptions('tsv', 'question', 'passage')
  manifest = corpus.prepare([FLAGS.source], FLAGS.corpus, options, rows_per_shard=FLAGS.rows_per_shard,
                            progress=False)
  corpus.encode_corpus(FLAGS.corpus, tokenizer(), LENGTH, progress=False)
  return {'rows': manifest['rows']}


def store_manifest(rows):
  return {'teacher': 'tiny-random-seed-0', 'data': rows.fingerprint, 'max_length': LENGTH}


def stage_score():
  from mkdm_jax import predictions
  from mkdm_jax.data import LogitStore, corpus
  rows = corpus.CorpusRows(FLAGS.corpus, tokenizer(), LENGTH)
  model = tiny_model()
  store = LogitStore(pathlib.Path(FLAGS.corpus) / 'logits')
  count = len(rows.shard_rows)
  for shard, logits in predictions.corpus_logits(model, tiny_params(model, 0), rows, range(count),
                                                 batch_size=FLAGS.eval_batch_size, progress=False):
    store.write('teacher_0.corpus', logits, rows.shard_ids(shard), store_manifest(rows), shard=shard, num_shards=count)
  return {'rows': len(rows)}


def stage_train(in_memory):
  import numpy as np
  from mkdm_jax import losses, train
  from mkdm_jax.data import Encoded, LogitStore, corpus
  rows = corpus.CorpusRows(FLAGS.corpus, tokenizer(), LENGTH)
  store = LogitStore(pathlib.Path(FLAGS.corpus) / 'logits')
  shards = store.read_shards('teacher_0.corpus', store_manifest(rows))
  logits = corpus.CorpusLogits([[a for a, _ in shards]], rows.shard_rows)
  data = rows
  if in_memory:  # the same rows, tokens and logits as arrays: the in-memory path of small data
    n = min(FLAGS.memory_rows, len(rows))
    tokens = rows.tokens(np.arange(n), LENGTH)
    data = Encoded(**tokens, lengths=rows.lengths[:n], labels=rows.labels[:n], ids=rows.ids[:n], groups=None,
                   fingerprint='memory')
    logits = np.asarray(logits[np.arange(n)])
  model = tiny_model()
  workdir = pathlib.Path(tempfile.mkdtemp(dir=FLAGS.corpus, prefix='train-'))
  cfg = train.TrainConfig(batch_size=FLAGS.batch_size, max_steps=FLAGS.train_steps, learning_rate=1e-3,
                          buckets=(16, LENGTH), checkpoint_every=10**9, log_every=50, select_best=False,
                          progress=False)
  loss = losses.LossConfig(teacher_mode='per_head', alpha=1.0, temperature=2.0)
  train.fit(workdir, model, data, cfg, loss, mesh=train.make_mesh(), init_params=tiny_params(model, 1),
            teacher_logits=logits)
  logged = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  speeds = [r['examples_per_sec'] for r in logged if r['kind'] == 'train' and r['step'] > 50]
  return {'rows': len(data), 'examples_per_sec': statistics.median(speeds)}


def stage_batches():
  """Milliseconds per batch of the fit loop's batch stream over the streamed corpus (no model): the first batch
  (it computes the epoch's order) apart from the rest."""
  from mkdm_jax import train
  from mkdm_jax.data import LogitStore, corpus
  rows = corpus.CorpusRows(FLAGS.corpus, tokenizer(), LENGTH)
  shards = LogitStore(pathlib.Path(FLAGS.corpus) / 'logits').read_shards('teacher_0.corpus', store_manifest(rows))
  logits = corpus.CorpusLogits([[a for a, _ in shards]], rows.shard_rows)
  cfg = train.TrainConfig(batch_size=FLAGS.batch_size, buckets=(16, LENGTH))
  stream = train.loop.train_batches(rows, cfg, 0, train.loop.num_batches(rows, cfg.batch_size),
                                    extra={'teacher_logits': logits})
  start = time.perf_counter()
  next(stream)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(FLAGS.train_steps - 1):
    next(stream)
  return {'rows': len(rows), 'first_batch_ms': 1e3 * first,
          'ms_per_batch': 1e3 * (time.perf_counter() - start) / (FLAGS.train_steps - 1)}


def run_stage(stage, corpus_dir, source=None):
  """Runs one stage in a child process: (its JSON result, wall seconds, its peak RSS in MB)."""
  cmd = [sys.executable, __file__, f'--stage={stage}', f'--corpus={corpus_dir}',
         f'--rows_per_shard={FLAGS.rows_per_shard}', f'--train_steps={FLAGS.train_steps}',
         f'--batch_size={FLAGS.batch_size}', f'--eval_batch_size={FLAGS.eval_batch_size}',
         f'--memory_rows={FLAGS.memory_rows}'] + ([f'--source={source}'] if source else [])
  start = time.perf_counter()
  child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, 'JAX_PLATFORMS': os.environ.get('JAX_PLATFORMS', 'cpu')})
  out, err = child.communicate()
  seconds = time.perf_counter() - start
  if child.returncode:
    raise SystemExit(f'stage {stage} failed:\n{err[-3000:]}')
  result = json.loads(out.strip().splitlines()[-1])
  return result, seconds, result.pop('peak_rss_mb')


def peak_rss_mb():
  """This process's peak resident set (VmHWM), MB."""
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith('VmHWM:'):
      return int(line.split()[1]) / 1024
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def disk_bytes(folder: pathlib.Path, pattern='*'):
  return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def main(argv):
  del argv
  if FLAGS.stage:
    from mkdm_jax import allocator
    allocator.one_arena()  # as experiments/prepare.py (and run.py's --malloc=keep) run
    result = {'prepare': stage_prepare, 'score': stage_score, 'train': lambda: stage_train(False),
              'train_memory': lambda: stage_train(True), 'batches': stage_batches}[FLAGS.stage]()
    print(json.dumps({**result, 'peak_rss_mb': round(peak_rss_mb(), 1)}))
    return
  from mkdm_jax import provenance
  root = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix='scale-'))
  root.mkdir(parents=True, exist_ok=True)
  sizes = [int(p) for p in FLAGS.pairs]
  report = {'pairs': sizes, 'model': FLAGS.model, 'length': LENGTH, 'batch_size': FLAGS.batch_size,
            'train_steps': FLAGS.train_steps, 'rows_per_shard': FLAGS.rows_per_shard,
            'memory_rows': FLAGS.memory_rows, 'peak_rss_mb': {}, 'examples_per_sec': {}, 'seconds': {},
            'disk_bytes_per_pair': {'text': [], 'encoding': [], 'logits': []},
            'train_memory_examples_per_sec': [], 'train_memory_peak_rss_mb': [], 'batches': [],
            'command': ' '.join(sys.argv), 'machine': provenance.record()}
  for name in ('prepare', 'score', 'train'):
    for key in ('peak_rss_mb', 'examples_per_sec', 'seconds'):
      report[key][name] = []
  for pairs in sizes:
    corpus_dir = root / f'corpus-{pairs}'
    source = root / f'pairs-{pairs}.tsv'
    write_source(source, pairs)
    for stage in ('prepare', 'score', 'train', 'train_memory', 'batches'):
      result, seconds, rss = run_stage(stage, corpus_dir, source if stage == 'prepare' else None)
      print(f'{pairs} pairs, {stage}: {seconds:.1f} s, peak {rss:.0f} MB, {json.dumps(result)}', flush=True)
      if stage == 'batches':
        report['batches'].append({k: round(v, 3) for k, v in result.items() if k != 'rows'})
        continue
      if stage == 'train_memory':
        report['train_memory_examples_per_sec'].append(round(result['examples_per_sec'], 1))
        report['train_memory_peak_rss_mb'].append(rss)
        continue
      report['peak_rss_mb'][stage].append(rss)
      report['seconds'][stage].append(round(seconds, 1))
      speed = result['examples_per_sec'] if stage == 'train' else pairs / seconds
      report['examples_per_sec'][stage].append(round(speed, 1))
    report['disk_bytes_per_pair']['text'].append(round(disk_bytes(corpus_dir / 'text') / pairs, 1))
    report['disk_bytes_per_pair']['encoding'].append(
        round(sum(disk_bytes(d) for d in corpus_dir.glob('enc-*')) / pairs, 1))
    report['disk_bytes_per_pair']['logits'].append(round(disk_bytes(corpus_dir / 'logits') / pairs, 1))
    source.unlink()
  smallest, largest = 0, len(sizes) - 1
  report['peak_rss_ratio_largest_vs_smallest'] = {
      k: round(v[largest] / v[smallest], 3) for k, v in report['peak_rss_mb'].items()}
  report['train_stream_vs_memory'] = [round(s / m, 3) for s, m in zip(report['examples_per_sec']['train'],
                                                                      report['train_memory_examples_per_sec'])]
  text = json.dumps(report, indent=1)
  print(text)
  if FLAGS.out:
    pathlib.Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(FLAGS.out).write_text(text)


if __name__ == '__main__':
  app.run(main)
