"""Optimiser: optax AdamW with warmup + decay, masked weight decay, clipping, layer-wise LR decay."""
import re

import jax
import optax

NO_DECAY_NAMES = ('bias', 'scale', 'combine_weights')


def _path_names(path):
  return [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]


def decay_mask(params):
  """True for leaves that get weight decay: matrices and embeddings, not biases or LayerNorm."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(n in NO_DECAY_NAMES or 'LayerNorm' in n or 'layer_norm' in n
                              for n in _path_names(path)), params)


def frozen_mask(params, names):
  """True for the leaves with one of `names` in their path (e.g. 'word_embeddings'): frozen leaves get no update."""
  return jax.tree_util.tree_map_with_path(lambda path, _: any(n in names for n in _path_names(path)), params)


def without_frozen(tree, frozen):
  """`tree` with its frozen leaves replaced by optax.MaskedNode (an empty subtree: norms and maps skip it)."""
  return jax.tree.map(lambda x, f: optax.MaskedNode() if f else x, tree, frozen)


def layerwise_scales(params, decay):
  """Per-leaf LR multipliers decay^(depth from the top): heads/pooler 1, layer i decay^(L-i), embeddings decay^(L+1)."""
  layers = [int(m.group(1)) for path, _ in jax.tree_util.tree_leaves_with_path(params)
            for m in [re.search(r'layer_(\d+)', '/'.join(_path_names(path)))] if m]
  num_layers = max(layers) + 1 if layers else 0

  def scale(path, _):
    name = '/'.join(_path_names(path))
    match = re.search(r'layer_(\d+)', name)
    if match:
      return decay ** (num_layers - int(match.group(1)))
    if 'embeddings' in name:
      return decay ** (num_layers + 1)
    return 1.0
  return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales):
  """Multiplies each update by a fixed per-leaf factor (optax has no per-leaf constant scale)."""
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (jax.tree.map(lambda u, s: u * s, updates, scales), state))


def learning_rate_schedule(peak, total_steps, warmup_steps, decay='linear'):
  """Linear warmup to `peak`, then linear or cosine decay to 0, or constant."""
  decay_steps = max(total_steps - warmup_steps, 1)
  decays = {'linear': lambda: optax.linear_schedule(peak, 0.0, decay_steps),
            'cosine': lambda: optax.cosine_decay_schedule(peak, decay_steps),
            'constant': lambda: optax.constant_schedule(peak)}
  if decay not in decays:
    raise ValueError(f'lr decay must be one of {tuple(decays)}, got {decay!r}')
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), decays[decay]()],
                              [warmup_steps])


def make_optimizer(params, *, learning_rate, total_steps, warmup_steps=0, decay='linear',
                   weight_decay=0.01, clip_norm=1.0, layer_decay=1.0, accumulate=1, frozen=()):
  """AdamW as used for BERT fine-tuning. `total_steps` counts optimiser updates.

  Returns (optimizer, schedule). With `accumulate` = k > 1, optax.MultiSteps averages the gradients
  of k consecutive micro-batches and applies one update. Leaves named by `frozen` (`frozen_mask`) get no update
  and no optimiser state; clipping's global norm is over the trained leaves.
  """
  schedule = learning_rate_schedule(learning_rate, total_steps, warmup_steps, decay)
  mask = frozen_mask(params, frozen)
  parts = []
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask))
  if layer_decay != 1.0:
    parts.append(scale_by_tree(layerwise_scales(without_frozen(params, mask) if frozen else params, layer_decay)))
  optimizer = optax.chain(*parts)
  if frozen:
    labels = jax.tree.map(lambda f: 'frozen' if f else 'trained', mask)
    optimizer = optax.multi_transform({'trained': optimizer, 'frozen': optax.set_to_zero()}, labels)
  if accumulate > 1:
    optimizer = optax.MultiSteps(optimizer, every_k_schedule=accumulate)
  return optimizer, schedule
