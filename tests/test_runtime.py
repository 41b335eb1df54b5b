"""mkdm_jax.runtime: importing the package changes nothing; configure_xla_cpu() opts in to the XLA CPU flag.

Each case runs in a fresh interpreter: XLA reads XLA_FLAGS once, when jax first creates its backends.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test starts a Python process to see XLA_FLAGS before jax starts

REPO = Path(__file__).resolve().parents[1]
FLAG = '--xla_cpu_experimental_ynn_fusion_type=individual_convolution'
CONFIGURE = ('import os; from mkdm_jax import runtime; print(runtime.configure_xla_cpu()); '
             'print(os.environ.get("XLA_FLAGS"))')
# Compiled HLO of a matmul + softmax: YNNPACK fusions appear under the default flags only.
USES_YNN_MATMULS = ('import jax, jax.numpy as jnp; x = jnp.ones((64, 64)); '
                    'hlo = jax.jit(lambda a, b: jax.nn.softmax(a @ b)).lower(x, x).compile().as_text(); '
                    'print("ynn_fusion" in hlo)')


def run(code, **env):
  """(stdout lines, stderr) of `code` in a new interpreter; XLA_FLAGS and the switch only as given."""
  base = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'MKDM_XLA_CPU_FLAGS')}
  proc = subprocess.run([sys.executable, '-c', code], env={**base, 'JAX_PLATFORMS': 'cpu', **env}, cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout.splitlines(), proc.stderr


def test_importing_the_package_leaves_xla_flags_unchanged():
  code = ('import os; import mkdm_jax, mkdm_jax.models, mkdm_jax.saved_model, mkdm_jax.workdir; '
          'print(os.environ.get("XLA_FLAGS"))')
  assert run(code)[0] == ['None']
  assert run(code, XLA_FLAGS='--xla_cpu_enable_fast_math=false')[0] == ['--xla_cpu_enable_fast_math=false']
  assert run(f'import mkdm_jax; {USES_YNN_MATMULS}')[0] == ['True']


def test_configure_adds_the_flag_and_it_takes_effect():
  assert run(CONFIGURE)[0] == ['True', FLAG]
  assert run(CONFIGURE, XLA_FLAGS='--xla_cpu_enable_fast_math=false')[0] == [
      'True', f'--xla_cpu_enable_fast_math=false {FLAG}']
  # jax may be imported first; only its backends must not exist yet.
  code = f'import jax; from mkdm_jax import runtime; runtime.configure_xla_cpu(); {USES_YNN_MATMULS}'
  assert run(code)[0] == ['False']


def test_users_own_value_wins():
  own = '--xla_cpu_experimental_ynn_fusion_type=default'
  assert run(CONFIGURE, XLA_FLAGS=own)[0] == ['False', own]


def test_switch_disables_it():
  assert run(CONFIGURE, MKDM_XLA_CPU_FLAGS='0')[0] == ['False', 'None']
  assert run(CONFIGURE, MKDM_XLA_CPU_FLAGS='1')[0] == ['True', FLAG]


def test_warns_when_backends_already_exist():
  out, err = run(f'import jax; jax.devices(); {CONFIGURE}')
  assert out == ['False', 'None']
  assert 'already initialised' in err and 'cannot take effect' in err
