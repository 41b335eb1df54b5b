"""mkdm_jax: multi-teacher knowledge distillation (MKDM / TMKD) of BERT-style models in JAX/Flax.

Importing the package changes nothing in the process; entry points opt in to the XLA CPU flags with
`mkdm_jax.runtime.configure_xla_cpu()` before importing jax.
"""

__version__ = "0.1.0"
