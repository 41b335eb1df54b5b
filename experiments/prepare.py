"""Converts question-passage pair files of any size into a prepared corpus (ArrayRecord shards).

  python experiments/prepare.py --input='corpus-*.tsv' --text_a_col=question --text_b_col=passage \
      --output=corpora/web --tokenizers=minilm-l6,mpnet-base --max_length=64

One streaming pass with bounded memory writes the rows' text, row keys and labels as shards of
--rows_per_shard rows, then each named checkpoint's tokenizer encodes them (`mkdm_jax.data.corpus`). A
rerun of the same command after a kill continues after the last complete shard; a rerun with other inputs
or options into the same folder is refused. Unlabelled pairs need only the two text columns. Prints a JSON
summary (rows, shards, sources with sha256, encodings, disk bytes per pair).

--order_seed/--max_rows write a seeded, question-whole prefix instead (the rows are read into memory; corpora of
one seed nest, for a stage-1 size curve), e.g. the first 100k SQuAD train pairs:

  python experiments/prepare.py --input=../shared/data/squad/squad-v1.1-train-pairs.tsv.gz --text_a_col=question \
      --text_b_col=sentence --group_col=qid --order_seed=0 --max_rows=100000 --output=corpora/squad-100k
"""
import glob
import json
import pathlib
import time

from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

from absl import flags

from mkdm_jax import allocator, models
from mkdm_jax.data import corpus
from mkdm_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_list('input', None, 'Pair files (TSV or JSON lines), comma-separated; shell globs are expanded '
                  "(quote them: --input='corpus-*.tsv'). Read in the order given, each glob sorted.")
flags.DEFINE_string('output', None, 'Corpus folder to write (or to complete after a kill).')
flags.DEFINE_enum('format', None, ['tsv', 'jsonl'], 'Input format (default: jsonl for *.jsonl, else tsv).')
flags.DEFINE_string('text_a_col', None, 'Question column (TSV header name or index; JSONL key).')
flags.DEFINE_string('text_b_col', None, 'Passage column.')
flags.DEFINE_string('label_col', None, 'Optional gold-label column.')
flags.DEFINE_string('group_col', None, 'Optional question-id column (part of each row key).')
flags.DEFINE_list('label_names', ['0', '1'], 'Label names, in class order (labels may also be given as indices).')
flags.DEFINE_boolean('skip_bad_rows', False, 'Skip malformed rows (counted in the manifest) instead of failing.')
flags.DEFINE_integer('rows_per_shard', 65536, 'Rows per shard: the unit of resume and of multi-process scoring.')
flags.DEFINE_list('tokenizers', [], "Checkpoints whose tokenizers encode the corpus now (e.g. minilm-l6,mpnet-base); "
                  'others are added on demand by the logits stage.')
flags.DEFINE_integer('max_length', 128, 'Max tokens per encoded pair (longest-first truncation).')
flags.DEFINE_boolean('progress', True, 'Show progress bars.')
flags.DEFINE_integer('order_seed', None, 'Write the questions (--group_col; else rows) in an order shuffled with this '
                     'seed, each kept whole (the rows are then read into memory).')
flags.DEFINE_integer('max_rows', None, 'With --order_seed: only the first questions holding this many rows (rounded '
                     'up to whole questions). One seed with growing --max_rows gives nested corpora (each a prefix '
                     'of the next): the stage-1 size curve.')

for _name in ('input', 'output', 'text_a_col', 'text_b_col'):
  flags.mark_flag_as_required(_name)


def input_files() -> list[pathlib.Path]:
  files = []
  for pattern in FLAGS.input:
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not matches:
      raise UserError(f'--input: no file matches {pattern!r}')
    files.extend(pathlib.Path(m) for m in matches)
  missing = [str(f) for f in files if not f.is_file()]
  if missing:
    raise UserError(f'--input: not a file: {", ".join(missing)}')
  return files


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {argv[1:]} (flags must start with --)')
  allocator.one_arena()  # before the tokenizer's threads: memory stays flat in corpus size
  if FLAGS.max_length < 8:
    raise UserError(f'--max_length={FLAGS.max_length} is too short for a pair (at least 8)')
  files = input_files()
  fmt = FLAGS.format or ('jsonl' if all(f.suffix == '.jsonl' for f in files) else 'tsv')
  options = corpus.ReadOptions(fmt, FLAGS.text_a_col, FLAGS.text_b_col, FLAGS.label_col, FLAGS.group_col,
                               tuple(FLAGS.label_names), FLAGS.skip_bad_rows)
  tokenizers = {name: models.load_tokenizer(models.resolve_checkpoint(name)) for name in FLAGS.tokenizers}
  start = time.perf_counter()
  manifest = corpus.prepare(files, FLAGS.output, options, rows_per_shard=FLAGS.rows_per_shard,
                            progress=FLAGS.progress, order_seed=FLAGS.order_seed, max_rows=FLAGS.max_rows)
  encodings = [{'tokenizer': name, 'max_length': FLAGS.max_length,
                'folder': str(corpus.encode_corpus(FLAGS.output, tok, FLAGS.max_length, progress=FLAGS.progress))}
               for name, tok in tokenizers.items()]
  disk = sum(p.stat().st_size for p in pathlib.Path(FLAGS.output).rglob('*') if p.is_file())
  print(json.dumps({'output': str(pathlib.Path(FLAGS.output).absolute()), 'rows': manifest['rows'],
                    'shards': manifest['shards'], 'sources': manifest['sources'], 'encodings': encodings,
                    'disk_bytes': disk, 'disk_bytes_per_pair': round(disk / manifest['rows'], 1),
                    'seconds': round(time.perf_counter() - start, 2)}, indent=1))


if __name__ == '__main__':
  cli.main(main)
