"""The quickstart notebook: executed top to bottom with its tiny settings, and kept without outputs in git."""
import json
import shutil
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / 'notebooks' / 'mkdm_quickstart.ipynb'
METHODS = {'student_scratch', 'kd_single', 'kd_ensemble', 'mkdm', 'tmkd'}


def test_outputs_are_cleared_in_git():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def parameters_cell(nb):
  tagged = [i for i, cell in enumerate(nb.cells) if 'parameters' in cell.metadata.get('tags', [])]
  assert len(tagged) == 1
  assert 'TINY = True\n' in nb.cells[tagged[0]].source
  return tagged[0]


@pytest.mark.slow
def test_notebook_runs_with_tiny_settings(tmp_path, monkeypatch, ci_tiny_run, xla_cache):
  """The notebook's cells all run, over a copy of the session's finished ci_tiny work directory.

  tests/test_pipeline.py trains that run from scratch with the same flagfile, so here the pipeline cells
  call run.py for real but find every training stage done: the notebook is checked without paying for a
  second ci_tiny training.
  """
  # A kernelspec for this interpreter, so the kernel has the project's packages.
  kernel_dir = tmp_path / 'jupyter' / 'kernels' / 'mkdm-test'
  kernel_dir.mkdir(parents=True)
  (kernel_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'mkdm test', 'language': 'python'}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = tmp_path / 'run'
  shutil.copytree(ci_tiny_run[0], workdir, ignore=shutil.ignore_patterns('ckpt', 'best'))
  copied = time.time()
  # As papermill would: a temporary work directory (runs/ stays untouched) and the session's XLA cache.
  overrides = (f'WORKDIR = pathlib.Path({str(workdir)!r})\n'
               f"EXTRA = {{'compilation_cache_dir': {str(xla_cache)!r}}}")
  nb.cells.insert(parameters_cell(nb) + 1, nbformat.v4.new_code_cell(overrides))
  NotebookClient(nb, timeout=600, kernel_name='mkdm-test',
                 resources={'metadata': {'path': str(NOTEBOOK.parent)}}).execute()

  outputs = {i: cell.outputs for i, cell in enumerate(nb.cells) if cell.cell_type == 'code'}
  assert not [o for cell in outputs.values() for o in cell if o.output_type == 'error']
  texts = {i: ''.join(o.get('text', '') + str(o.get('data', {}).get('text/markdown', '')) for o in cell)
           for i, cell in outputs.items()}
  assert any('| question | sentence | label |' in t for t in texts.values())  # the WikiQA sample
  assert any('teacher_2: already trained, skipping' in t for t in texts.values())  # the pipeline's log
  assert any('| bert1_mkdm |' in t for t in texts.values())  # the results table
  assert sum('image/png' in o.get('data', {}) for cell in outputs.values() for o in cell) == 1
  assert (workdir / 'results.json').stat().st_mtime > copied  # written again by the notebook's report stage
  results = json.loads((workdir / 'results.json').read_text())
  assert {r['method'] for r in results['rows']} >= METHODS | {'teacher', 'teacher_ensemble'}
  assert (workdir / 'comparison.png').stat().st_size > 10_000
