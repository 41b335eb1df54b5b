"""The README's commands and .ci/run agree: CI installs what the set-up line installs and runs its test command."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_block(title):
  """The first fenced block after the line `title` in README.md."""
  text = (REPO / 'README.md').read_text()
  match = re.search(re.escape(title) + r'\s*\n+```bash\n(.*?)\n```', text, re.S)
  assert match, f'README.md has no ```bash block after {title!r}'
  return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
  ci_lines = [line.strip() for line in (REPO / '.ci' / 'run').read_text().splitlines() if line.strip()]
  assert ci_lines[-1] == readme_block('Test:')


def test_ci_installs_the_readme_requirements():
  ci = (REPO / '.ci' / 'run').read_text()
  setup = readme_block('Set up (Python 3.11, CPU; from the repository root):')
  for requirements in re.findall(r'-r (\S+)', setup):
    assert f'-r {requirements}' in ci, requirements
    assert (REPO / requirements).is_file(), requirements


def test_setup_installs_the_package_with_its_requirements():
  """One set-up line: the package (pyproject.toml reads requirements.txt as its dependencies) and CI agree."""
  setup = readme_block('Set up (Python 3.11, CPU; from the repository root):')
  assert 'pip install -e .' in setup and 'pip install -q -e .' in (REPO / '.ci' / 'run').read_text()
  assert 'file = ["requirements.txt"]' in (REPO / 'pyproject.toml').read_text()


def test_no_sys_path_edits():
  """Entry points and tests import the installed package; none edits sys.path."""
  offenders = [str(p.relative_to(REPO)) for folder in ('mkdm_jax', 'experiments', 'benchmarks', 'tests')
               for p in (REPO / folder).rglob('*.py')
               if p.name != 'test_repo.py' and ('sys.path.insert' in p.read_text() or 'sys.path[' in p.read_text())]
  assert offenders == []
