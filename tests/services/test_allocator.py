"""The server's allocator tuning: large freed blocks stay mapped, so a batch does not fault them in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
from tensorfleet.services.allocator import tune_allocator
tuned = tune_allocator()
import torch  # torch's CPU allocator is plain malloc (numpy would madvise huge pages)
for batch in range(30):  # steady state: the last 10 batches of 30
    if batch == 20:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(16 << 20)  # 64 MiB: above glibc's largest mmap threshold
    del block
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def probe(setting: str) -> dict:
    env = {**os.environ, "TENSORFLEET_MALLOC": setting}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning is glibc-only")
def test_tuned_allocator_keeps_large_blocks_mapped_across_batches():
    default, tuned = probe("default"), probe("tuned")
    assert default["tuned"] is False and tuned["tuned"] is True
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    # default glibc: every 64 MiB block is a fresh mmap, faulted in page by page, each batch
    assert default["faults"] > 8 * pages
    # tuned: the heap keeps the block; later batches reuse pages that are already mapped
    assert tuned["faults"] < pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning is glibc-only")
def test_single_arena_is_the_tuning_plus_one_arena_and_keeps_large_blocks_mapped():
    single = probe("single-arena")
    assert single["tuned"] is True
    assert single["faults"] < (64 << 20) // os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning is glibc-only")
def test_an_unknown_setting_is_named_and_the_tuning_applies():
    env = {**os.environ, "TENSORFLEET_MALLOC": "arena-of-one"}
    code = "import logging; logging.basicConfig(); from tensorfleet.services.allocator import tune_allocator; print(tune_allocator())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.strip() == "True"
    assert "TENSORFLEET_MALLOC=arena-of-one is not one of tuned, single-arena, default" in result.stderr
