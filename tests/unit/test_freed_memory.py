"""fedrec.runtime.keep_freed_memory: after it, glibc serves a large block from the heap instead
of a fresh ``mmap`` and keeps it when it is freed, as ``mallinfo2`` reads back; without it, the
same block is mapped. Each case runs in a fresh interpreter, since the settings are the
process's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BLOCK = 64 << 20  # bytes: far above glibc's default mmap threshold (128 KiB .. 32 MiB)

_SCRIPT = """
import ctypes, ctypes.util, json, sys
from fedrec.runtime import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2()
block = libc.malloc(BLOCK)
held = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"kept": kept, "allocated": bool(block),
                  "mapped": held.hblkhd - before.hblkhd, "heap_held": held.arena,
                  "heap_after_free": after.arena}))
"""


def _allocate(mode: str) -> dict:
    script = _SCRIPT.replace("BLOCK", str(BLOCK))
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                         cwd=REPO, check=True, timeout=120)  # fmt: skip
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def glibc():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc settings exist on Linux only")
    probe = "import ctypes, ctypes.util; ctypes.CDLL(ctypes.util.find_library('c')).mallinfo2"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode:
        pytest.skip("this C library has no mallinfo2 (glibc >= 2.33) to read the heap with")


def test_a_freed_large_block_stays_in_the_heap(glibc):
    out = _allocate("keep")

    assert out["kept"] is True and out["allocated"]
    assert out["mapped"] < BLOCK  # from the heap, not a fresh mapping
    assert out["heap_held"] >= BLOCK
    assert out["heap_after_free"] >= BLOCK  # not trimmed back to the OS on free
    assert out["heap_held"] < 4 * BLOCK  # and without a padding beyond the block


def test_without_it_the_same_block_is_mapped_and_given_back(glibc):
    out = _allocate("default")

    assert out["allocated"] and out["mapped"] >= BLOCK
    assert out["heap_after_free"] < BLOCK
