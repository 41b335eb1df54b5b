"""Host allocator policy: keep freed memory in glibc's heap so large buffers are not page-faulted anew.

By default glibc maps each block above its mmap threshold (at most 32 MiB) afresh and unmaps it on
free, and returns heap memory above its trim threshold to the kernel, so a big buffer costs one page
fault per 4 KiB on every call. On a 2-core CPU that was XLA's 73 MB temp buffer of a MiniLM forward
(batch 32 x 128), PyTorch's activations (20-75 thousand faults per forward), and the 1.3 GB temp
buffer of a MiniLM train step: 330 thousand faults, a quarter of the step's time.
"""
import ctypes

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# Heap memory is never trimmed (the size_t threshold becomes SIZE_MAX), nothing is mmap-ed, one arena.
KEEP_POLICY = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_ARENA_MAX, 1))


def _mallopt(policy) -> bool:
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):
    return False
  return all(mallopt(param, value) == 1 for param, value in policy)


def keep_freed_memory() -> bool:
  """Tells glibc to serve every allocation from its heap and keep freed memory; False off glibc.

  Call it before the big allocations (it only affects later ones). The process keeps its peak heap
  size instead of giving memory back, which is what a training or benchmark process wants.
  """
  return _mallopt(KEEP_POLICY)


def one_arena() -> bool:
  """Tells glibc to serve every thread from one heap (arena); False off glibc.

  The tokenizer's worker threads otherwise each allocate from their own arena, where memory freed by one
  pass is not reused by the next pass's other threads: a long encoding pass then grew with the corpus (the
  peak of preparing 1M pairs was 1.32x that of 100k; with one arena 1.09x). Call it before threads start.
  """
  return _mallopt(((M_ARENA_MAX, 1),))
