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
