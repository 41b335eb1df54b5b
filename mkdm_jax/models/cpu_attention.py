"""Fused attention core for XLA:CPU inference: a jax.ffi kernel (cpu_attention.cc) built on first use.

XLA:CPU runs the batched score and context matmuls of attention on one core; the kernel threads
(example, head) pairs over XLA's intra-op pool, keeps each pair's scores in cache and skips padded
keys (BENCHMARKS.md: the MiniLM forward against PyTorch). `bert.BertSelfAttention` uses it at
inference where `applies()` (CPU backend, fp32, head size a multiple of 8, kernel built), with MPNet's
relative-position bias through a second entry point of the same source; training and everything else
use the einsum path.

It is compiled with the system C++ compiler ($CXX, default g++) for this CPU (-march=native) into
$MKDM_CACHE_DIR (default ~/.cache/mkdm_jax), keyed by the source, flags, jax version and CPU.
MKDM_CPU_ATTENTION=0 turns it off; without a compiler the einsum path is used, with one warning.
"""
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp

from mkdm_jax import paths
from mkdm_jax.paths import cache_dir

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name('cpu_attention.cc')
TARGET = 'mkdm_cpu_attention'
BIAS_TARGET = 'mkdm_cpu_attention_bias'  # with a score bias [heads, L, L]
# Fast math for the kernel's own code only: it vectorises the softmax's exp (libmvec) and its max/sum
# reductions. Measured 2026-12-02 on a 2-core "Intel(R) Xeon(R) Processor" (lscpu; AVX-512), g++ 12.2,
# against builds without it, fast/slow alternately: kernel 1.65-1.92x faster at batch 32, 12 heads of 32,
# length 48-128 (6.2 vs 11.9 ms at 128); MiniLM-L6 forward at 32 x 128 1.10x faster. Accuracy: no cost
# seen. Max abs error against `reference` over 8 shapes with padding holes and q scales 1/sqrt(d), 1, 4:
# 2.6e-6 with fast math, 4.5e-6 without (tests/test_cpu_attention.py asserts 5e-6); against float64 both
# reach 4.6e-5 at worst, as the fp32 reference itself does. Compiled and linked in two steps: linking with
# -ffast-math adds crtfastmath.o (GCC < 13 also for -shared), whose constructor turns on flush-to-zero for
# the whole process when the library loads.
COMPILE_FLAGS = ('-O3', '-march=native', '-ffast-math', '-std=c++17', '-fPIC', '-w')
LINK_FLAGS = ('-shared',)


def _cpu_signature() -> str:
  try:
    lines = pathlib.Path('/proc/cpuinfo').read_text().splitlines()
  except OSError:
    return os.uname().machine
  return '\n'.join(sorted({l for l in lines if l.startswith(('model name', 'flags'))}))


def build(compiler=None) -> pathlib.Path:
  """Compiles the kernel (once per source, flags, jax version and CPU) and returns the library path."""
  compiler = compiler or os.environ.get('CXX', 'g++')
  if shutil.which(compiler) is None:
    raise OSError(f'no C++ compiler {compiler!r} on PATH (set $CXX)')
  key = hashlib.sha256('\0'.join([SOURCE.read_text(), compiler, *COMPILE_FLAGS, *LINK_FLAGS, jax.__version__,
                                  _cpu_signature()]).encode()).hexdigest()[:16]
  out = cache_dir() / f'cpu_attention-{key}.so'
  if out.is_file():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)

  def compile_to(tmp):  # concurrent builders each write their own temporary library (paths.write_atomic)
    obj = tmp.with_name(tmp.name + '.o')
    try:
      for cmd in ([compiler, *COMPILE_FLAGS, '-I', jax.ffi.include_dir(), '-c', str(SOURCE), '-o', str(obj)],
                  [compiler, *LINK_FLAGS, str(obj), '-o', str(tmp)]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
          raise OSError(f'{" ".join(cmd)} failed:\n{done.stderr[-2000:]}')
    finally:
      obj.unlink(missing_ok=True)
  paths.write_atomic(out, compile_to)
  return out


@functools.cache
def available() -> bool:
  """Whether the kernel is built and registered (False, with one warning, if it cannot be)."""
  if os.environ.get('MKDM_CPU_ATTENTION', '1') == '0':
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
  except OSError as e:
    log.warning('fused CPU attention kernel unavailable, using the einsum path: %s', e)
    return False
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.MkdmAttention), platform='cpu')
  jax.ffi.register_ffi_target(BIAS_TARGET, jax.ffi.pycapsule(library.MkdmAttentionBias), platform='cpu')
  return True


def applies(dtype, head_size) -> bool:
  """Whether BERT (or MPNet) inference of this compute dtype and head size runs on the kernel here."""
  return (jnp.dtype(dtype) == jnp.float32 and head_size % 8 == 0 and jax.default_backend() == 'cpu'
          and available())


def reference(q, k, v, keep, bias=None):
  """The kernel's result in jnp: softmax over kept keys of q.k (+ bias), times v; all-padded rows give 0."""
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k)
  if bias is not None:
    scores = scores + bias
  scores = jnp.where(keep[:, None, None, :] > 0, scores, -jnp.inf)
  peak = jnp.max(scores, -1, keepdims=True)
  e = jnp.where(keep[:, None, None, :] > 0, jnp.exp(scores - jnp.where(jnp.isfinite(peak), peak, 0)), 0)
  total = e.sum(-1, keepdims=True)
  return jnp.einsum('bhqk,bkhd->bqhd', e / jnp.where(total > 0, total, 1), v)


@jax.custom_vjp
def attention(q, k, v, keep, bias=None):
  """Attention context [B, L, heads, d] of q, k, v [B, L, heads, d] (fp32, q pre-scaled), a [B, L]
  fp32 key mask of 0/1 and an optional fp32 score bias [heads, L, L] shared by the batch. Call only
  where `available()`; gradients go through `reference`."""
  target, args = (TARGET, (q, k, v, keep)) if bias is None else (BIAS_TARGET, (q, k, v, keep, bias))
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method='sequential')(*args)


def _forward(q, k, v, keep, bias):
  return attention(q, k, v, keep, bias), (q, k, v, keep, bias)


def _backward(residuals, g):
  return jax.vjp(reference, *residuals)[1](g)


attention.defvjp(_forward, _backward)
