"""A one-token step's recorded layer calls (compiler/inductor.py's Replay), made back to back
on CPU, as a CUDA graph makes a step's kernels on the GPU.

The model still calls each decoder layer with the outputs of the one before. The chain's
first layer's call runs every layer's recorded kernels and ops; each later layer's call,
given what the one before returned, returns what its own steps left: the chain takes it
that the model hands each layer's outputs to the next as they are, without writing into
them, as kiln's decoder loops do; a call given other tensors stops it. Otherwise the
model's loop, the runner's dispatch and each replay's argument checks ran between two
layers' kernels, with every weight streaming through the caches in between (a few
microseconds each with the caches hot, tens in a step). SmolLM2 batch-1 decode on the Zen 3
EPYC here, eight alternating rounds of 128 tokens in one process, same tokens: forward
16.8 ms median against 17.3 without the chain, whole step 21.5 against 22.0.

Where every later layer's step has a C function (Inductor's kernels, the attention
kernel's recorded call), one C loop makes them all (`StepLoop`): no Python at all between
two kernels. Same machine, the two alternating step by step in one process (380 steps
each, same tokens), forward median 14.35 / 14.37 / 13.92 ms against 14.57 / 14.54 / 13.99
with the Python loop over the same steps."""

import ctypes
import functools
import types
from collections.abc import Callable
from pathlib import Path

import torch

from ..compiler.inductor import Replay
from ..models.cpu_build import load_library


class LayerChain:
    def __init__(self, layers: list[torch.nn.Module], replays: list[Replay],
                 first_call: Callable[[tuple], tuple]):
        self.layers = layers
        self.replays = replays
        self.first_call = first_call  # the first layer's replay, copying its arguments in
        # The later layers' steps from one C loop, where the loop is built and each step has
        # a C function; None: from Python.
        self.loop = StepLoop.of([step for replay in replays[1:] for step in replay.steps])
        self.next = 0  # the later layer whose outputs are ready; 0: none
        self.positions = None  # the argument every layer takes first, this step's
        self.num_runs = 0

    @classmethod
    def link(cls, calls: list[tuple], recorded: dict, replays: dict) -> "LayerChain | None":
        """The chain of a step's one-token calls (layer, args, outputs), in order, where
        each replays its recording (`recorded`: layer -> its Replay and whether a call with
        given args would run it on them as they are), and each later call takes the first
        call's first argument and the previous call's outputs, as they are; None otherwise.
        `replays`: layer -> its replay's call."""
        layers = [layer for layer, _, _ in calls]
        if len(calls) < 2 or len(set(layers)) != len(layers) or \
                any(layer not in recorded for layer in layers):
            return None
        first = calls[0][1][0]
        for (_, _, before), (layer, args, out) in zip(calls, calls[1:]):
            replay, as_is = recorded[layer]
            if args[0] is not first or not _same(args[1:], before) or \
                    not _same(out, replay.outputs) or not as_is(args):
                return None
        return cls(layers, [recorded[layer][0] for layer in layers], replays[layers[0]])

    def start(self, args: tuple) -> tuple:
        """The first layer's call: every layer's steps run; returns the first's outputs."""
        out = self.first_call(args)
        if self.loop is not None:
            self.loop.run()
        else:
            for replay in self.replays[1:]:
                replay.run_steps()
        self.next, self.positions = 1, args[0]
        self.num_runs += 1
        return out

    def ran_ahead(self, layer: torch.nn.Module, args: tuple) -> tuple | None:
        """What `layer`'s call with `args` returns, where it is the next call the chain ran
        ahead; None otherwise, and nothing further is taken as run (the calls then replay
        one by one)."""
        i = self.next
        if i and layer is self.layers[i] and args[0] is self.positions and \
                _same(args[1:], self.replays[i - 1].outputs):
            self.next = (i + 1) % len(self.layers)
            return self.replays[i].outputs
        self.next = 0
        return None


def _same(given: tuple, kept: tuple) -> bool:
    return len(given) == len(kept) and all(a is b for a, b in zip(given, kept))


# Each recorded step's C function called with its arguments as recorded: pointers to the
# recorded tensors' memory, which a replay writes and reads in place, and integers. Every
# argument is passed as a pointer-sized integer, as the x86-64 and AArch64 calling
# conventions pass both. A function whose `checked` flag is set returns an int, nonzero
# where the loop must stop; a C++ exception stops it too. `run_steps` returns 0 when every
# step ran, else the stopping step's number (from 1), negative for an exception.
_MAX_ARGS = 24
_LOOP_SOURCE = """
#include <exception>
struct Step { void* fn; int64_t checked; int64_t num_args; void* args[MAX_ARGS]; };
extern "C" int64_t run_steps(const Step* steps, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    void* const* a = steps[i].args;
    try {
      if (steps[i].checked) {
        if (reinterpret_cast<int (*)(void*)>(steps[i].fn)(a[0])) return i + 1;
        continue;
      }
      switch (steps[i].num_args) {
CASES
        default: return i + 1;
      }
    } catch (...) {
      return -(i + 1);
    }
  }
  return 0;
}
""".replace("MAX_ARGS", str(_MAX_ARGS)).replace("CASES", "\n".join(
    f"        case {n}: reinterpret_cast<void (*)({', '.join(['void*'] * n)})>(steps[i].fn)("
    f"{', '.join(f'a[{k}]' for k in range(n))}); break;" for n in range(1, _MAX_ARGS + 1)))


class _Step(ctypes.Structure):
    _fields_ = [("fn", ctypes.c_void_p), ("checked", ctypes.c_int64),
                ("num_args", ctypes.c_int64), ("args", ctypes.c_void_p * _MAX_ARGS)]


_loop: list = []  # the built library's run_steps, once loaded


def load_step_loop(build_dir: Path) -> bool:
    """Build (once) and load the C loop of recorded steps; whether it is there."""
    if not _loop:
        library = load_library("step_loop", _LOOP_SOURCE, build_dir, "a Python loop")
        if library is None:
            return False
        library.run_steps.restype = ctypes.c_int64
        library.run_steps.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        _loop.append(library.run_steps)
    return True


class StepLoop:
    """Recorded steps (a Replay's: fn, args, kwargs, result) made from one C loop: with no
    Python between two layers' kernels, nothing of the interpreter's is read from memory
    while each weight streams through the caches. A step the loop stops at runs again from
    Python, which makes its fallback or raises its error; the loop then goes on after it."""

    def __init__(self, steps: list[tuple], table):
        self.steps = steps
        self.table = table
        self.size = ctypes.sizeof(_Step)

    @classmethod
    def of(cls, steps: list[tuple]) -> "StepLoop | None":
        """The loop of `steps`, or None where the loop is not loaded or a step has no C
        function to call: a kernel Inductor built (a Python extension whose C function
        `kernel` takes pointers and integers), or a step that gives its own (`c_call`)."""
        if not _loop or not steps:
            return None
        table = (_Step * len(steps))()
        for entry, (fn, args, kwargs, result) in zip(table, steps):
            call = _c_call(fn, args) if not kwargs and result is None else None
            if call is None:
                return None
            entry.fn, entry.checked, arguments = call
            entry.num_args = len(arguments)
            entry.args[:len(arguments)] = arguments
        return cls(steps, table)

    def run(self) -> None:
        start, address = 0, ctypes.addressof(self.table)
        while start < len(self.steps):
            stop = _loop[0](address + start * self.size, len(self.steps) - start)
            if stop == 0:
                return
            start += abs(stop) - 1
            fn, args, kwargs, _ = self.steps[start]
            fn(*args, **kwargs)
            start += 1


def _c_call(fn, args: tuple) -> tuple[int, bool, list[int]] | None:
    """(C function, whether it returns a status, its arguments) for a recorded step."""
    if hasattr(fn, "c_call"):
        address, arguments = fn.c_call()
        return address, True, arguments
    module = getattr(fn, "__self__", None)
    if getattr(fn, "__name__", None) != "kernel" or not isinstance(module, types.ModuleType) \
            or not getattr(module, "__file__", "").endswith(".so") or len(args) > _MAX_ARGS:
        return None
    arguments = []
    for arg in args:
        if isinstance(arg, torch.Tensor) and arg.device.type == "cpu":
            arguments.append(arg.data_ptr())
        elif type(arg) is int and -2**63 <= arg < 2**63:
            arguments.append(arg % 2**64)  # its two's complement bits
        else:
            return None
    return _kernel_address(module.__file__), False, arguments


@functools.cache
def _kernel_address(path: str) -> int:
    """The C function `kernel` of the Inductor extension at `path`: its Python binding only
    reads each tensor's data pointer before calling it. Opened once per file, though every
    layer's steps call the same few extensions."""
    return ctypes.cast(ctypes.CDLL(path).kernel, ctypes.c_void_p).value
