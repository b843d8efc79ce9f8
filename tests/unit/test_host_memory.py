"""The engine core's host-allocator setting: freed step memory is reused, not faulted in again."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from service.runtime.host_memory import malloc_tuned_by_environment
from service.settings import REPO_ROOT, Settings

# A step-like loop: a few activations of 1-6 MB, allocated, written (which faults in any fresh page) and
# freed every iteration, in a fresh interpreter so that nothing else has warmed its heap.
STEP_LOOP = """
import json, resource, sys
from service.runtime.host_memory import keep_freed_host_memory
outcome = keep_freed_host_memory() if sys.argv[1] == "keep" else "off"
def step():
    buffers = [bytearray(size << 20) for size in (6, 1, 3, 5, 2)]
    for buffer in buffers:
        buffer[::4096] = b"x" * len(range(0, len(buffer), 4096))
    del buffers
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print(json.dumps({"outcome": outcome,
                  "faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50}))
"""


def run_step_loop(mode: str) -> dict[str, float | str]:
    completed = subprocess.run([sys.executable, "-c", STEP_LOOP, mode], capture_output=True, text=True, check=True,
                               env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, cwd=REPO_ROOT)
    return json.loads(completed.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_memory_is_reused_without_page_faults() -> None:
    kept = run_step_loop("keep")
    assert kept["outcome"] == "kept"
    # 17 MB written a step = about 4,350 fresh pages if nothing were reused
    assert kept["faults_per_step"] < 20, kept
    plain = run_step_loop("off")
    assert plain["faults_per_step"] > 10 * kept["faults_per_step"] + 100, (plain, kept)


def test_the_users_malloc_settings_rule() -> None:
    assert not malloc_tuned_by_environment({})
    assert not malloc_tuned_by_environment({"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "LD_PRELOAD": "libfoo.so"})
    assert malloc_tuned_by_environment({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert malloc_tuned_by_environment({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"})
    assert malloc_tuned_by_environment({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"})
    assert malloc_tuned_by_environment({"LD_PRELOAD": "libtcmalloc_minimal.so.4"})


def test_the_setting_is_on_by_default_and_one_flag_away() -> None:
    from service.__main__ import settings_from_args

    assert Settings(models={}).keep_freed_host_memory
    assert not settings_from_args(["--no-keep-freed-host-memory"]).keep_freed_host_memory
