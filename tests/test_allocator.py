"""glibc allocator policies: keep_freed_memory reuses a freed big block without page faults; one_arena
serves every thread from one heap (glibc only)."""
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each test measures malloc in a fresh Python process

SIZE = 2**30 + 2**27  # above the 1 GiB trim threshold that once let a MiniLM train step refault

# Fills a malloc-ed block, frees it, and prints the minor page faults of filling a second one.
# (Plain malloc: numpy asks for huge pages, which hides the faults this is about.)
_SCRIPT = """
import ctypes, resource, sys
if {keep}:
  from mkdm_jax.allocator import keep_freed_memory
  assert keep_freed_memory()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def fill():
  block = libc.malloc({size}); ctypes.memset(block, 1, {size}); return block
libc.free(fill())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _refaults(keep):
  out = subprocess.run([sys.executable, '-c', _SCRIPT.format(keep=keep, size=SIZE)],
                       capture_output=True, text=True, check=True)
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt policy is glibc-specific')
def test_keep_freed_memory_reuses_big_blocks():
  pages = SIZE // 4096
  assert _refaults(keep=False) > pages // 2  # glibc maps the block afresh: a fault per page
  assert _refaults(keep=True) < pages // 100  # the heap keeps the freed pages


# Mallocs from 4 threads, then prints how many arenas glibc's malloc_stats reports (it writes to stderr).
_ARENAS_SCRIPT = """
import ctypes, sys, threading
if {one}:
  from mkdm_jax.allocator import one_arena
  assert one_arena()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
blocks = []
threads = [threading.Thread(target=lambda: blocks.append(libc.malloc(1000))) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
libc.malloc_stats()
"""


def _arenas(one):
  out = subprocess.run([sys.executable, '-c', _ARENAS_SCRIPT.format(one=one)],
                       capture_output=True, text=True, check=True)
  return sum(line.startswith('Arena ') for line in out.stderr.splitlines())


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt policy is glibc-specific')
def test_one_arena_serves_every_thread_from_one_heap():
  assert _arenas(one=False) > 1  # glibc gives new threads their own arenas
  assert _arenas(one=True) == 1
