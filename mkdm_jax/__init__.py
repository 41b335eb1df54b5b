"""mkdm_jax: multi-teacher knowledge distillation (MKDM / TMKD) of BERT-style models in JAX/Flax."""
import os

# Measured on 2-core x86 CPUs (see STACK-NOTES / BENCHMARKS.md): this jaxlib's default YNNPACK
# fusions of matmuls are ~40% slower than XLA's classic Eigen matmuls. Keep only convolutions in
# YNNPACK. It must be set before jax initialises its CPU backend; a user's own XLA_FLAGS win.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _YNN_FLAG).strip()

__version__ = "0.1.0"
