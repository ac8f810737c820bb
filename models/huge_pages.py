"""Transparent huge pages for kiln's large CPU buffers: the weights and the KV cache.

A batch-1 decode step reads every weight from memory once. With 4 KiB pages that is a TLB
miss every 4 KiB (about 130 000 per step for SmolLM2's 538 MB), and the hardware prefetcher
stops at every page boundary. Linux backs memory with 2 MiB pages where a program asks for
them (madvise) when transparent huge pages are in "madvise" mode, a common default, this
machine's included; the request has to come before the memory is first written, which is
why kiln makes it right after allocating a buffer and before loading into it.

The weights go further: they share one buffer, laid out in the order the model declares
them, which is the order a decode step reads them. Held apart, most of SmolLM2's
bfloat16 matrices (0.7-1.8 MB) were too small to hold a whole huge page, and every matrix
began where the hardware prefetcher had not been; the row kernel also asks for the bytes
after a matrix's end (models/cpu_linear.py), which are the next one's. SmolLM2's batch-1
decode on the Zen 4 EPYC, one process switching its weights between the two layouts eight
times: bfloat16 96.1 tok/s (median) against 91.3 apart, float32 57.3 against 55.7, same
tokens."""

import ctypes
import functools
import sys

import torch
from torch import nn

_MADV_HUGEPAGE = 14  # linux/mman.h
_HUGE_PAGE = 2 << 20


@functools.cache
def _madvise():
    # The process's own symbols, libc's among them: find_library("c") runs `ldconfig -p`
    # in a child process (20 ms of a warm start here).
    fn = ctypes.CDLL(None).madvise
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


def gather_weights(model: nn.Module, alignment: int = 64) -> None:
    """Point each CPU parameter of `model`, not yet written, at its own slice of one new
    buffer on huge pages, in declaration order, each slice `alignment`-byte aligned (what
    Inductor and the SIMD kernels want). Other devices keep their own allocations."""
    params = list(model.parameters())
    if not params or params[0].device.type != "cpu":
        return
    offsets, total = [], 0
    for param in params:
        offsets.append(total)
        total += -(-param.numel() * param.element_size() // alignment) * alignment
    arena = torch.empty(total + _HUGE_PAGE, dtype=torch.uint8)
    start = -arena.data_ptr() % _HUGE_PAGE  # so that huge pages cover it from its first byte
    arena = arena[start:start + total]
    advise_huge_pages(arena)
    for param, offset in zip(params, offsets):
        nbytes = param.numel() * param.element_size()
        param.data = arena[offset:offset + nbytes].view(param.dtype).view(param.shape)
