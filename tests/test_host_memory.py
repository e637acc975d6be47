"""retain_freed_memory: freed blocks are reused instead of being faulted in again."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from train_helpers import subprocess_env

# Frees and reallocates 48 MiB tensors (above glibc's largest automatic mmap threshold, 32 MiB) and prints
# the page faults of the repeats after the first few.
_LOOP = """
import resource, sys, torch
from slip.host_memory import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    (torch.ones(12 << 20) * 2).sum()
start = faults()
for _ in range(10):
    (torch.ones(12 << 20) * 2).sum()
print(faults() - start)
"""


def _faults(mode: str) -> int:
    """Page faults of the loop above, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", _LOOP, mode], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_retained_memory_is_reused_instead_of_faulted_in_again():
    default, retained = _faults("default"), _faults("retain")
    pages = 10 * 2 * (48 << 20) // 4096  # two 48 MiB tensors per repeat
    assert default > pages / 2  # each fresh block is faulted in again
    assert retained < default / 10
