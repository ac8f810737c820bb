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
import threading

import torch
from torch import nn

_MADV_HUGEPAGE = 14  # linux/mman.h
_MADV_NOHUGEPAGE = 15
_MADV_POPULATE_WRITE = 23  # Linux 5.14 on; older kernels refuse it, and pages fault lazily
_HUGE_PAGE = 2 << 20
_PAGE = 4096


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


def _advise_pages(start: int, nbytes: int, advice: int) -> bool:
    """madvise the whole pages that [start, start + nbytes) touches; whether Linux took it.
    ctypes lets go of the GIL for the call."""
    first = start // _PAGE * _PAGE  # madvise takes whole pages
    return _madvise()(first, start + nbytes - first, advice) == 0


def keep_small_pages(ranges: list[tuple[int, int]]) -> None:
    """Back the pages of the memory ranges (address, bytes) with 4 KiB pages even inside a
    buffer advised huge: a few bytes written into a huge page fault in all 2 MiB of it."""
    if sys.platform != "linux":
        return
    for start, nbytes in ranges:
        _advise_pages(start, nbytes, _MADV_NOHUGEPAGE)


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
    populate(arena.data_ptr(), total)
    for param, offset in zip(params, offsets):
        nbytes = param.numel() * param.element_size()
        param.data = arena[offset:offset + nbytes].view(param.dtype).view(param.shape)


def populate(start: int, nbytes: int) -> int:
    """Fault in the pages of [start, start + nbytes) now, split among as many threads as
    torch uses, keeping what they hold (fresh memory stays zero). Returns the bytes
    populated: 0 off Linux, or where the kernel predates MADV_POPULATE_WRITE (their pages
    fault when first written, as without this).

    The first touch of fresh memory is what costs, not the copy into it: on the KVM guest
    here a huge page's first write took 1-4.5 ms (the host backs the guest's memory as it is
    first touched), so loading SmolLM2's 538 MB of weights took 0.5-1.0 s of a warm start.
    One thread's page faults do not wait for another's: two threads faulted 538 MB of
    huge pages in 0.29-0.30 s against 0.46-0.54 for one (separate processes, alternating)."""
    if sys.platform != "linux" or nbytes <= 0:
        return 0
    step = -(-nbytes // torch.get_num_threads())
    parts = [(start + i, min(step, nbytes - i)) for i in range(0, nbytes, step)]
    done = []

    def fault_in(part: tuple[int, int]) -> None:
        if _advise_pages(*part, _MADV_POPULATE_WRITE):
            done.append(part[1])

    threads = [threading.Thread(target=fault_in, args=(part,)) for part in parts[1:]]
    for thread in threads:
        thread.start()
    fault_in(parts[0])
    for thread in threads:
        thread.join()
    return sum(done)
