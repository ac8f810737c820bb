"""Transparent huge pages for kiln's large CPU buffers: the weights and the KV cache.

A batch-1 decode step reads every weight from memory once. With 4 KiB pages that is a TLB
miss every 4 KiB (about 130 000 per step for SmolLM2's 538 MB), and the hardware prefetcher
stops at every page boundary. Linux backs memory with 2 MiB pages where a program asks for
them (madvise) when transparent huge pages are in "madvise" mode, a common default, this
machine's included; the request has to come before the memory is first written, which is
why kiln makes it right after allocating a buffer and before loading into it."""

import ctypes
import ctypes.util
import functools
import sys

import torch

_MADV_HUGEPAGE = 14  # linux/mman.h
_HUGE_PAGE = 2 << 20


@functools.cache
def _madvise():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise_huge_pages(tensor: torch.Tensor) -> int:
    """Ask Linux to back the whole 2 MiB pages inside `tensor`'s memory with huge pages when
    they are first touched. Returns the bytes covered: 0 off Linux, off the CPU, for
    buffers too small to hold a whole huge page, or if the kernel refused."""
    if sys.platform != "linux" or tensor.device.type != "cpu":
        return 0
    storage = tensor.untyped_storage()
    start = storage.data_ptr()
    first = -(-start // _HUGE_PAGE) * _HUGE_PAGE
    last = (start + storage.nbytes()) // _HUGE_PAGE * _HUGE_PAGE
    if last <= first or _madvise()(first, last - first, _MADV_HUGEPAGE) != 0:
        return 0
    return last - first
