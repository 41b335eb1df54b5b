"""Process set-up that entry points opt in to: call `configure_xla_cpu()` before importing jax."""
import logging
import os
import sys

log = logging.getLogger(__name__)

FLAG_NAME = 'xla_cpu_experimental_ynn_fusion_type'
SWITCH = 'MKDM_XLA_CPU_FLAGS'


def _backends_initialized() -> bool:
  # Private jax API: the public ones (jax.devices(), jax.extend.backend) initialise the backends.
  bridge = sys.modules.get('jax._src.xla_bridge')
  return bridge is not None and bridge.backends_are_initialized()


def configure_xla_cpu() -> bool:
  """Keeps only convolutions in YNNPACK (`--xla_cpu_experimental_ynn_fusion_type=individual_convolution`).

  Measured on 2-core x86 CPUs (STACK-NOTES, BENCHMARKS.md): this jaxlib's default YNNPACK fusions of
  matmuls are about 40% slower than XLA's classic Eigen matmuls. XLA reads XLA_FLAGS when jax first
  creates its backends, so call this before any jax computation. Not set when the user's XLA_FLAGS
  already name the flag, or with MKDM_XLA_CPU_FLAGS=0. Returns whether the flag was set.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if os.environ.get(SWITCH) == '0' or FLAG_NAME in flags:
    return False
  if _backends_initialized():
    log.warning('configure_xla_cpu: jax backends are already initialised, so --%s cannot take effect; '
                'call it before the first jax computation', FLAG_NAME)
    return False
  os.environ['XLA_FLAGS'] = f'{flags} --{FLAG_NAME}=individual_convolution'.strip()
  return True
