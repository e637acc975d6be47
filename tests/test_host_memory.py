"""retain_freed_memory: freed blocks are reused instead of being faulted in again."""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys

import pytest

from train_helpers import subprocess_env

_TENSOR_PAGES = (48 << 20) // 4096
# Frees and reallocates 48 MiB tensors (above glibc's largest automatic mmap threshold, 32 MiB) and prints
# the page faults of each repeat. With retention the heap still grows in a few early repeats, while small
# allocations settle into the freed space; from then on every repeat reuses it.
_LOOP = """
import json, resource, sys, torch
from slip.host_memory import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
per_repeat = []
for _ in range(24):
    start = faults()
    (torch.ones(12 << 20) * 2).sum()
    per_repeat.append(faults() - start)
print(json.dumps(per_repeat[2:]))
"""


def _faults_per_repeat(mode: str) -> list[int]:
    """Page faults of each repeat of the loop above, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", _LOOP, mode], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_retained_memory_is_reused_instead_of_faulted_in_again():
    default, retained = _faults_per_repeat("default"), _faults_per_repeat("retain")
    # Without retention each repeat faults in both of its tensors again.
    assert statistics.median(default) > 1.5 * _TENSOR_PAGES
    # With it the typical repeat faults in almost nothing, and the last repeats none of a tensor's pages.
    assert statistics.median(retained) < _TENSOR_PAGES / 10
    assert sum(retained[-6:]) < _TENSOR_PAGES / 10
