"""Keep freed tensor memory in the process instead of handing it back to the kernel.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
`mmap` and returns it with `munmap` when freed. A CPU model allocates activations of that
size for every batch (attention scores alone are rows x heads x length^2 floats), so each
batch faults every page in again: measured on the example protein encoder (2-core VM, one
torch thread), 6.2 M minor page faults and 10 s of system time in a 33 s loop, and 1.4x the
throughput once the memory stays mapped.

`tune_allocator` tells glibc, through `mallopt`, what each setting below buys. Measured with
`python -m bench.allocator_settings` (minor page faults per batch of three blocks of varying
size, on the main thread, where the event loop runs, and on another, like the model thread;
each setting left out in turn; 2-core VM, 2026-12-07):

- `M_MMAP_THRESHOLD` 1 GiB: blocks up to 1 GiB come from the heap, not a fresh mmap. The one
  that matters: without it 10,566 (main) and 11,058 (thread) faults per batch of blocks up to
  48 MiB, 471 / 1,208 up to 8 MiB; with all three settings 0.
- `M_TRIM_THRESHOLD` 2 GiB: keep up to 2 GiB of freed heap top instead of giving it back
  (main arena, blocks up to 48 MiB: 204 faults per batch without it, 0 with).
- `M_TOP_PAD` 64 MiB: grow a heap in 64 MiB steps (a model thread's arena, blocks up to 8 MiB:
  409 faults per batch without it, 0 with).

Every thread keeps its own glibc arena. Until issue 25 the tuning also set `M_ARENA_MAX=1`
(one arena for all threads), which made a server bistable: in some passes the model thread
and its OpenMP workers fought the event loop's and gRPC's threads for the arena lock, with
18,000-24,000 voluntary context switches per pass instead of 50-300 and a third of the
throughput gone (`python -m bench.server_passes` counts such passes). The price of separate
arenas: a non-main arena's heaps hold at most 64 MiB each, so a block larger than that,
allocated on any thread but the main one, is mmapped and faulted in on every batch (128 MiB
blocks: 16,384 faults each, tuned or not; with one arena 0). So a CPU server process runs its
models' batches on the main thread, whose arena is glibc's main one, and its event loop on
another (services/main_thread.py, issue 25): the blocks between 64 MiB and M_MMAP_THRESHOLD
stay in the heap there, as in a hand-written loop, without the single arena's lock fights.
Measured (`python -m bench.server_passes --layers 6 --dim 320 --heads 20 --median 0
--sequences 128 --batch 16`, blocks of 64 MiB-1 GiB, 2 threads, 2026-12-07): on the model
thread 398,406 minor faults per batch and 3.5 seq/s; on the main thread 1,143 and 14.3 seq/s;
the single arena 20,800 and 13.6 seq/s.
A model run on another thread (a server built inside another program, tests/inprocess.py)
still pays it: `TENSORFLEET_MALLOC=single-arena` or a token budget that keeps the blocks
below 64 MiB avoid it there.

CPU servers only: on a GPU the activations live in device memory. It is a no-op where glibc
is absent (macOS, musl) and can be switched off with `TENSORFLEET_MALLOC=default`.

The cost is memory, measured on the same encoder (with the single arena): resident memory
stays at its peak, and batches that grow one after another can leave holes a bigger block
cannot reuse. Blocks over 1 GiB still get their own mmap, which bounds that: 4 batches of 64
of the longest proteins in ascending length (no token budget, 3.5 GB of attention scores per
layer) peaked at 9.3 GB vs 7.5 GB default (14.6 GB with mmap switched off entirely); 40
token-budget-sized batches in random order: 2.3 GB vs 2.2 GB peak, and 1.2x faster (system
time 0.8 s vs 12.7 s). Keep a token budget on CPU servers, or turn the tuning off when
memory is tight.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("tensorfleet.services.allocator")

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

#: (parameter, value, name) in the order they are applied.
TUNED_SETTINGS: tuple[tuple[int, int, str], ...] = (
    (M_MMAP_THRESHOLD, 2**30, "M_MMAP_THRESHOLD"),
    (M_TRIM_THRESHOLD, 2**31 - 1, "M_TRIM_THRESHOLD"),
    (M_TOP_PAD, 64 * 2**20, "M_TOP_PAD"),
)


#: `TENSORFLEET_MALLOC=single-arena` adds this: every thread in glibc's main arena.
SINGLE_ARENA = (M_ARENA_MAX, 1, "M_ARENA_MAX")

SETTINGS = ("tuned", "single-arena", "default")


def tune_allocator() -> bool:
    """Apply TUNED_SETTINGS (and SINGLE_ARENA when asked); True when glibc took all of them.

    Call it early (before the model thread starts): a thread picks its arena at its first malloc.
    """
    setting = os.environ.get("TENSORFLEET_MALLOC", "tuned").lower()
    if setting not in SETTINGS:
        log.warning("TENSORFLEET_MALLOC=%s is not one of %s; using 'tuned'", setting, ", ".join(SETTINGS))
        setting = "tuned"
    if setting == "default":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = (SINGLE_ARENA, *TUNED_SETTINGS) if setting == "single-arena" else TUNED_SETTINGS
    refused = [label for parameter, value, label in settings if mallopt(parameter, value) != 1]
    if refused:
        log.warning("glibc refused mallopt %s; large tensors keep using mmap", ", ".join(refused))
    return not refused
