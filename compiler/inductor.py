"""The one place kiln touches torch's private compiler APIs.

kiln compiles graph pieces itself (so identical decoder layers share one compiled artifact and
artifacts can be saved under kiln's own cache keys); torch offers that through
`torch._inductor.standalone_compile` and `CompiledArtifact`, which have no public alias yet."""

import ast
import builtins
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import os
import platform
import re
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path

import torch


def compile_piece(gm: torch.fx.GraphModule, example_inputs: list, options: dict,
                  dynamic: bool = False):
    """Compile one graph piece with Inductor, with Inductor config `options`
    (standalone_compile's `options` are compile_fx's arguments): for the exact shapes of
    `example_inputs`, or, `dynamic`, for the symbolic sizes Dynamo traced the graph with."""
    _before_building()
    try:
        return _standalone_compile(gm, example_inputs, options, dynamic)
    except VecIsaRejected:  # Inductor's list was picked again: generate for the new pick
        _distrust()
        _before_building()
        return _standalone_compile(gm, example_inputs, options, dynamic)


def _standalone_compile(gm, example_inputs, options: dict, dynamic: bool):
    return torch._inductor.standalone_compile(
        gm, example_inputs, dynamic_shapes="from_graph" if dynamic else "from_example_inputs",
        options={"config_patches": dict(options)})


def unknown_inductor_options(options: dict) -> list[str]:
    """The names in `options` that are not Inductor config settings."""
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    return [name for name in options if name not in known]


def save_artifact(artifact, path: Path) -> None:
    artifact.save(path=str(path), format="binary")


def load_artifact(path: Path):
    _before_building()
    return torch._inductor.CompiledArtifact.load(path=str(path), format="binary")


def _before_building() -> None:
    """Wait for the start thread's check of the vector instruction sets, trust its pick in
    this thread while it is unverified (codegen asks whether the set works, which would run
    Inductor's probe right here), and point the precompiled kernel header at the builds
    directory in use now."""
    import torch._inductor.config as inductor_config

    _wait_for_inductor_start()
    if _unverified_isa and inductor_config.cpp.vec_isa_ok is None:
        inductor_config.cpp.vec_isa_ok = True
        _trusted_here.append(True)
    _keep_headers_in(_builds_dir())


def _distrust() -> None:
    """Drop the trust `_before_building` gave this thread (the set was rejected)."""
    import torch._inductor.config as inductor_config

    if _trusted_here:
        _trusted_here.clear()
        inductor_config.cpp.vec_isa_ok = None


def _builds_dir() -> str:
    """The directory Inductor builds kernels in now (`builds_in` may change it)."""
    builds = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if builds is None:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        builds = cache_dir()
    return os.path.abspath(builds)


# A CPU kernel in Inductor's generated Python: `name = async_compile.cpp_pybinding(argtypes,
# r'''source''')`, built as a Python extension module whose `kernel` is the entry point.
_KERNEL = re.compile(r"^(\w+) = async_compile\.cpp_pybinding\((\[.*?\]), r'''(.*?)'''\)$",
                     re.MULTILINE | re.DOTALL)
_ARGS = re.compile(r"^ +((?:arg\d+_1, )*arg\d+_1),? = args$", re.MULTILINE)


def _kernel_id(argtypes: list[str], source: str) -> str:
    return hashlib.sha256(f"{argtypes}|{source}".encode()).hexdigest()


def _compiled_graph(artifact):
    """The Inductor output (CompiledFxGraph) inside a loaded or compiled artifact, found
    through the closures of the wrappers around it; None if it is not there."""
    from torch._inductor.output_code import CompiledFxGraph

    seen, todo = set(), [artifact]
    while todo:
        fn = todo.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        if isinstance(fn, CompiledFxGraph):
            return fn
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                todo.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        todo += [getattr(fn, name) for name in ("_compiled_fn", "__wrapped__")
                 if hasattr(fn, name)]
    return None


def direct_form(artifact, num_inputs: int, num_outputs: int,
                keep: Callable[[Path], str]) -> dict | None:
    """What `load_direct` needs to call the artifact's generated Python itself, without
    importing Inductor: its source and, for each of its CPU kernels, the SHA-256 of the
    built library, which `keep` stores (returning that digest). None unless calling the
    generated `call` with the piece's `num_inputs` arguments is all the artifact's wrappers
    would do: every kernel a C++ kernel of the Python wrapper, the piece's own `num_outputs`
    returned as they are (no output rebuilt as a view of an input, no input mutation copied
    back, no duplicate or misaligned input handled outside the code), no constants. What the
    wrappers add then is bookkeeping for autograd and Dynamo, which kiln's inference-mode
    calls do not use."""
    graph = _compiled_graph(artifact)
    if graph is None or graph.inputs_to_check or graph.constants or \
            graph.torchbind_constants or len(graph.output_strides or ()) != num_outputs:
        return None
    source = graph.source_code
    args = _ARGS.search(source)
    found = _KERNEL.findall(source)
    uses = re.findall(r"async_compile\.(\w+)", source)
    call = getattr(graph.current_callable, "__func__", None)
    if args is None or len(args.group(1).split(", ")) != num_inputs or call is None or \
            set(uses) - {"cpp_pybinding", "wait"} or uses.count("cpp_pybinding") != len(found):
        return None
    libraries = {}
    for name, argtypes, code in found:
        library = getattr(getattr(call.__globals__.get(name), "__self__", None), "__file__", None)
        if library is None:
            return None
        libraries[_kernel_id(ast.literal_eval(argtypes), code)] = Path(library)
    return {"source": source,
            "kernels": {kernel: keep(library) for kernel, library in libraries.items()}}


class _Lazy:
    """A name the generated Python imports from Inductor or Dynamo, imported from there when
    first used (the code kiln loads directly uses none of them on its path)."""

    def __init__(self, module: str, name: str):
        self._where = (module, name)

    def _target(self):
        module, name = self._where
        return getattr(importlib.import_module(module), name)

    def __call__(self, *args, **kwargs):
        return self._target()(*args, **kwargs)

    def __getattr__(self, name: str):
        if name == "_where":
            raise AttributeError(name)
        return getattr(self._target(), name)


class _KernelLoader:
    """Stands in for Inductor's AsyncCompile: each kernel is the library `direct_form`
    recorded for its source, loaded as a Python extension as Inductor loads it."""

    def __init__(self, kernels: dict[str, str], library: Callable[[str], Path]):
        self.kernels = kernels
        self.library = library

    def cpp_pybinding(self, argtypes: list[str], source: str):
        digest = self.kernels[_kernel_id(argtypes, source)]
        library = self.library(digest)
        if hashlib.sha256(library.read_bytes()).hexdigest() != digest:
            raise ValueError(f"kernel library {library} changed since it was recorded")
        # Inductor's extensions all name their module `kernel`; the package part only keeps
        # them apart in sys.modules.
        name = f"kiln_kernel_{digest[:32]}.kernel"
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[name] = module
        return module.kernel

    def wait(self, scope: dict) -> None:
        pass


def _direct_scope(form: dict, library: Callable[[str], Path], code) -> dict:
    """The globals of the generated Python `code` run with the names it imports from
    Inductor and Dynamo standing in (each kernel from the library file `library` gives for
    its digest, anything else imported on first use)."""
    # The address kernels built by Inductor read tensors' data through (set by Inductor
    # before it loads one).
    os.environ["_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"] = str(
        torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr)
    loader = _KernelLoader(form["kernels"], library)

    def stand_in(name, globals=None, locals=None, fromlist=(), level=0):
        if not fromlist or not name.startswith(("torch._inductor", "torch._dynamo")):
            return __import__(name, globals, locals, fromlist, level)
        module = types.ModuleType(name)
        for item in fromlist:
            setattr(module, item, (lambda: loader) if item == "AsyncCompile" else
                    _Lazy(name, item))
        return module

    scope = {"__builtins__": {**builtins.__dict__, "__import__": stand_in},
             "__name__": "kiln_direct"}
    exec(code, scope)
    return scope


class Replay:
    """One recorded call of a piece's generated code, made again without running that code:
    the same kernels and ops, in order, on the same tensors. An argument that is not the
    recorded one is copied into it first (a layer's input made anew each step); an op's
    result is copied into the tensor it returned when recorded, which the steps after it
    read. A batch-1 decode step of SmolLM2 spent about 65 us a layer in the generated Python
    here (allocations, layout checks, argument handling) around 0.5 ms of kernels."""

    def __init__(self, artifact: "DirectArtifact", inputs: tuple, steps: list,
                 outputs: tuple):
        self.artifact = artifact  # for a call with another value than a tensor's
        self.inputs = inputs
        self.steps = steps  # (kernel or op, args, kwargs, the op's result or None)
        self.outputs = outputs

    def __call__(self, *args) -> tuple:
        copies = self.copies(args)
        if copies is None:
            return tuple(self.artifact(*args))
        for kept, given in copies:
            kept.copy_(given)
        self.run_steps()
        return self.outputs

    def copies(self, args: tuple) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The (recorded input, argument) pairs a call with `args` copies in first; None
        where an argument other than a tensor differs from the recorded one (the call then
        runs the generated code)."""
        copies = []
        for given, kept in zip(args, self.inputs, strict=True):
            if given is kept:
                continue
            if not isinstance(kept, torch.Tensor):
                if given != kept:
                    return None
            elif given.data_ptr() != kept.data_ptr() or given.shape != kept.shape or \
                    given.stride() != kept.stride():
                copies.append((kept, given))
        return copies

    def run_steps(self) -> None:
        """The recorded kernels and ops, on the recorded inputs as they are now."""
        for fn, fn_args, kwargs, result in self.steps:
            out = fn(*fn_args, **kwargs)
            if result is not None:
                result.copy_(out)


# What the generated `call` may do for a recorded call of it to stand for every later one:
# allocate, view and check tensors, and call kernels and torch ops; nothing else.
_RECORDED_HELPERS = {"empty_strided_cpu", "reinterpret_tensor", "assert_size_stride",
                     "assert_alignment"}


def _replayable(call: ast.FunctionDef, kernels: set[str]) -> bool:
    def argument(value) -> bool:  # a name, a constant (or tuple of them), a dtype, a call
        if isinstance(value, (ast.Tuple, ast.List)):
            return all(map(argument, value.elts))
        if isinstance(value, ast.Attribute):
            return ast.unparse(value).startswith("torch.")
        return isinstance(value, (ast.Name, ast.Constant)) or allowed(value)

    def allowed(value) -> bool:
        if isinstance(value, (ast.Name, ast.Tuple)):  # unpacking or renaming
            return all(isinstance(e, ast.Name) for e in getattr(value, "elts", [value]))
        if not isinstance(value, ast.Call):
            return False
        func = ast.unparse(value.func)
        return (func in kernels or func in _RECORDED_HELPERS or func == "args.clear" or
                func.startswith("torch.ops.")) and all(map(argument, value.args)) and \
            all(isinstance(k.value, ast.Constant) for k in value.keywords)

    for stmt in call.body:
        if isinstance(stmt, ast.Delete):
            continue
        if isinstance(stmt, (ast.Assign, ast.Expr, ast.Return)) and stmt.value is not None \
                and allowed(stmt.value):
            continue
        return False
    return True


class _OpsToRecorder(ast.NodeTransformer):
    """torch.ops.<namespace>... -> _kiln_ops.<namespace>..."""

    def visit_Attribute(self, node: ast.Attribute):
        if ast.unparse(node) == "torch.ops":
            return ast.copy_location(ast.Name("_kiln_ops", ast.Load()), node)
        return self.generic_visit(node)


class _OpRecorder:
    """Stands in for torch.ops while a call is recorded: runs the op, and records it, as
    `bind_op(op, args, kwargs, result)` made it again where that gives a call."""

    def __init__(self, steps: list, bind_op: Callable | None, path: tuple = ()):
        self._steps = steps
        self._bind_op = bind_op
        self._path = path

    def __getattr__(self, name: str):
        return _OpRecorder(self._steps, self._bind_op, (*self._path, name))

    def __call__(self, *args, **kwargs):
        op = torch.ops
        for name in self._path:
            op = getattr(op, name)
        result = op(*args, **kwargs)
        if result is not None and not isinstance(result, torch.Tensor):
            self._steps.append(None)  # a result a replay could not give again
        again = self._bind_op and self._bind_op(op, args, kwargs, result)
        self._steps.append((again, (), {}, None) if again else (op, args, kwargs, result))
        return result


class DirectArtifact:
    """The piece `direct_form` described, callable as `fn(*args)`: its generated Python run
    with the names it imports from Inductor and Dynamo standing in. Loading an artifact
    through Inductor imports Inductor's compiler and Dynamo first: about 2.7 s of a warm
    start here, against 1.4 s for torch itself. Raises if a library is missing or
    changed."""

    def __init__(self, form: dict, library: Callable[[str], Path]):
        self.form = form
        self.library = library
        self.call = _direct_scope(form, library,
                                  compile(form["source"], "<kiln direct piece>", "exec"))["call"]
        self._recording = None  # (its scope, kernel name -> kernel), made on first use

    def __call__(self, *args):
        return self.call(list(args))

    def record(self, args: list, bind_op: Callable | None = None) -> tuple[tuple, Replay | None]:
        """Call the piece on `args` -> its outputs and, where its generated code only does
        what a `Replay` repeats, a replay of this call (else None). `bind_op(op, args,
        kwargs, result)`: a call that repeats an op's recorded call, writing its result in
        place, or None to replay the op as called."""
        if self._recording is None:
            tree = ast.parse(self.form["source"])
            kernels = {name for name, _, _ in _KERNEL.findall(self.form["source"])}
            call = next((node for node in ast.walk(tree)
                         if isinstance(node, ast.FunctionDef) and node.name == "call"), None)
            if call is None or not _replayable(call, kernels):
                self._recording = (None, {})
            else:
                _OpsToRecorder().visit(call)
                code = compile(ast.fix_missing_locations(tree), "<kiln recorded piece>", "exec")
                scope = _direct_scope(self.form, self.library, code)
                self._recording = (scope, {name: scope[name] for name in kernels})
        scope, kernels = self._recording
        if scope is None:
            return tuple(self(*args)), None
        steps: list = []
        scope["_kiln_ops"] = _OpRecorder(steps, bind_op)
        for name, kernel in kernels.items():
            scope[name] = functools.partial(_record_kernel, steps, kernel)
        inputs = tuple(args)
        outputs = tuple(scope["call"](list(args)))
        if None in steps:
            return outputs, None
        return outputs, Replay(self, inputs, steps, outputs)


def _record_kernel(steps: list, kernel, *args):
    steps.append((kernel, args, {}, None))
    return kernel(*args)


def load_direct(form: dict, library: Callable[[str], Path]) -> DirectArtifact:
    """The piece `direct_form` described (see `DirectArtifact`)."""
    return DirectArtifact(form, library)


def configure_dynamo(limit: int) -> None:
    """Settings for tracing one decoder layer once, with a symbolic token count.

    Duck sizing would give the token count the same symbol as any weight dimension of equal
    value (64 tokens and a head_dim of 64), guarding on that equality and forcing a new
    trace for every other count. Dynamo also gives up on a function after a few distinct
    guards; several engines may live in one process (tests)."""
    torch.fx.experimental._config.use_duck_shape = False
    # Floats (norm epsilons, attention scales) become constants of the trace instead of graph
    # inputs converted to tensors on every call; layers of one model share their values.
    torch._dynamo.config.specialize_float = True
    # Dynamo would otherwise give a token count of 1 a trace of its own (1.1 s per start).
    torch.fx.experimental._config.backed_size_oblivious = True
    config = torch._dynamo.config
    if getattr(config, "recompile_limit", limit) < limit:
        config.recompile_limit = limit
    if getattr(config, "cache_size_limit", limit) < limit:
        config.cache_size_limit = limit


def keep_static(tensor: torch.Tensor) -> None:
    """Trace `tensor` with its sizes as constants. Under dynamic=True Dynamo gives a plain
    tensor attribute symbolic sizes: a layer's KV cache, once the attention is compiled into
    the layer's piece, would then look sized by the token count."""
    torch._dynamo.mark_static(tensor)


def graph_input_sources(gm: torch.fx.GraphModule) -> list[str] | None:
    """For a graph Dynamo hands to a backend: the Python expression (over `L`, the traced
    function's locals) that each input was read from, in call order; None if any input has
    none (or comes from a value Dynamo converted)."""
    sources = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        arg = node.meta.get("grapharg")
        if arg is None or arg.source is None or getattr(arg, "pass_arg_as_tensor", False):
            return None
        name = arg.source.name  # a method before torch 2.12, a property since
        sources.append(name() if callable(name) else name)
    return sources


# Build directories the user chose before kiln ran; kiln leaves those alone.
_USER_BUILD_DIRS = {name: os.environ.get(name)
                    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}


def _build_dirs(root: Path) -> dict[str, str]:
    return {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
            "TRITON_CACHE_DIR": str(root / "triton")}


def keep_builds_in(root: Path) -> None:
    """Keep Inductor's and Triton's build caches (compiled C++ and GPU kernels) under kiln's
    cache instead of the temporary directory: a saved artifact holds generated source, and
    loading it without those builds compiles every kernel again (65 s instead of 15 s for
    SmolLM2 here). A directory the user chose is left alone."""
    for name, path in _build_dirs(root).items():
        os.environ.setdefault(name, path)


def environment_without_kiln_builds() -> dict[str, str]:
    """This process's environment as it was before `keep_builds_in`: what a fresh process
    started by the user would see."""
    env = dict(os.environ)
    for name, value in _USER_BUILD_DIRS.items():
        if value is None:
            env.pop(name, None)
    return env


@contextlib.contextmanager
def builds_in(root: Path):
    """Compile and load inside with the builds kept beside this cache's artifacts. Without
    this, a process that used another kiln cache first kept building there, and this
    cache's artifacts then lacked their kernels: the next process rebuilt them on first use
    (14 s before a first token, seen here)."""
    wanted = {name: path for name, path in _build_dirs(root).items()
              if _USER_BUILD_DIRS[name] is None}
    if all(os.environ.get(name) == path for name, path in wanted.items()):
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    triton = os.environ.get("TRITON_CACHE_DIR")
    if "TRITON_CACHE_DIR" in wanted:
        os.environ["TRITON_CACHE_DIR"] = wanted["TRITON_CACHE_DIR"]
    try:
        inductor = wanted.get("TORCHINDUCTOR_CACHE_DIR")
        with temporary_cache_dir(inductor) if inductor else contextlib.nullcontext():
            yield
    finally:
        if triton is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = triton


def _vec_isa_marker(root: Path) -> Path:
    capability = torch.backends.cpu.get_cpu_capability()
    return root / f"vec-isa-ok-{platform.machine()}-{capability}-torch-{torch.__version__}"


def _verdict_kept(root: Path) -> bool:
    """Whether this cache kept a passed vector instruction set check that kiln may trust
    (the user's TORCHINDUCTOR_VEC_ISA_OK wins)."""
    return "TORCHINDUCTOR_VEC_ISA_OK" not in os.environ and _vec_isa_marker(root).exists()


def _keep_headers_in(builds: str) -> None:
    """Keep Inductor's precompiled kernel header beside the kernel builds at `builds`.

    Every C++ kernel Inductor builds for the CPU starts with one large header (ATen's vector
    types): g++ took 3.0 s for a SmolLM2 layer kernel here, 0.8 s with that header
    precompiled (built once in 6 s, 128 MB). Inductor keeps precompiled headers in the
    temporary directory, shared by every cache; kept here instead, a cold start with an empty
    cache builds its own (so it is timed as cold) and `kiln cache clear` removes it. The
    path is remembered per process, so a change of directory forgets it."""
    from torch._inductor import codecache

    headers = os.path.join(builds, "precompiled_headers")
    if codecache._HEADER_DIR != headers:
        codecache._HEADER_DIR = headers
        codecache._HEADER_LOCK_DIR = os.path.join(headers, "locks")
        codecache._precompile_header.cache_clear()


def configure_inductor(root: Path) -> None:
    """Settings under the cache at `root`: once a compile in this cache found that the vector
    instruction set builds and loads, trust it instead of building and loading a probe
    library in a subprocess again on every start (this does not change kernel keys; the
    user's TORCHINDUCTOR_VEC_ISA_OK wins). Where precompiled headers go is set by each
    compile and load (`_keep_headers_in`), since `builds_in` may change the directory."""
    import torch._inductor.config as inductor_config

    if _verdict_kept(root):
        inductor_config.cpp.vec_isa_ok = True


def remember_vec_isa(root: Path) -> None:
    """After warm-up on CPU: record that Inductor's vector instruction set check passed
    (compiling or loading a kernel ran it, and its answer is cached in the process; or the
    kernel header's probe vouched for the set picked unverified), only if it chose the
    widest set this CPU lists: trusting the check picks that one, so a narrower choice (a
    set that failed to build or run) must be probed again next time."""
    import torch._inductor.config as inductor_config
    from torch._inductor.cpu_vec_isa import pick_vec_isa, valid_vec_isa_list

    try:
        _settle_vec_isa()
    except VecIsaRejected:
        _distrust()
        return
    if inductor_config.cpp.vec_isa_ok is not None and not _trusted_here:
        return
    chosen, listed = pick_vec_isa(), valid_vec_isa_list()
    if chosen and listed and str(chosen) == str(listed[0]):
        _vec_isa_marker(root).touch()


_inductor_start: list[threading.Thread] = []
_inductor_imported = threading.Event()
_vec_isa_picked = threading.Event()  # or the start thread ended without picking one


def _widest_listed_vec_isa():
    """The vector instruction set Inductor would pick if every set this x86 CPU lists
    passed its check, or None where something else decides: another architecture, or
    ATEN_CPU_CAPABILITY or `cpp.simdlen` set."""
    import torch._inductor.config as inductor_config
    from torch._inductor import cpu_vec_isa

    if platform.machine() not in ("x86_64", "AMD64") or os.environ.get("ATEN_CPU_CAPABILITY") \
            or inductor_config.cpp.simdlen is not None:
        return None
    flags = cpu_vec_isa.x86_isa_checker()
    return next((isa for isa in cpu_vec_isa.supported_vec_isa_list
                 if all(flag in flags for flag in str(isa).split())), None)


def _check_vec_isa(trusted: bool | None) -> None:
    """Inductor's check of which vector instruction sets build and load, shortened where it
    can be. Inductor builds and loads a probe library for every set the CPU lists (AVX-512
    with VNNI, AVX-512 and AVX2 on the Zen 4 EPYC here: 7.2 s, one after another), then
    picks the widest that passed. So its list is computed trusting the sets, which picks
    the widest the CPU lists; the list is cached for the process, the trust (a setting) is
    not. Inductor's settings are context variables here (torch 2.13): set in this thread,
    the trust would never reach the main one. That pick stays unverified until the kernel
    header's probe kernel (`start_kernel_header`), built with the picked set's flags from
    the same vector headers Inductor's probe builds, has run; before any kernel is built, or
    the verdict kept, `_settle_vec_isa` waits for it, or runs Inductor's probe where no
    header is built. Inductor's own probe of the widest set kept a cold start's first
    compile waiting 2.4 s for it here, its g++ sharing the two cores with the header's and
    the trace; without it, six alternating cold starts of SmolLM2 (float32, Zen 3) were
    ready in 23.3-29.5 s (median 26.8) against 23.4-31.5 (27.4), sooner in five.

    `trusted`: True where a kept verdict (or the user) already trusts the sets. Inductor
    still builds and loads probes for the sets' extensions then (AVX-512 bfloat16 and VNNI:
    three child processes, 0.15 s of a warm start here), which this thread runs beside the
    model load instead of in the first artifact load."""
    import torch._inductor.config as inductor_config
    from torch._inductor import codecache, cpu_vec_isa

    widest = None if trusted else _widest_listed_vec_isa()
    trust = trusted or widest is not None  # not `widest`: its truth value is its probe
    with inductor_config.patch({"cpp.vec_isa_ok": True if trust else None}):
        cpu_vec_isa.pick_vec_isa()  # the list is cached for the process from here
    if widest is not None:
        _unverified_isa.append(widest)
        if not getattr(codecache._precompile_header, "settles_vec_isa", False):
            codecache._precompile_header = _settled_first(codecache._precompile_header)


_unverified_isa: list = []  # the widest set, picked trusted and not yet checked
_header_verdict: list[bool] = []  # whether the kernel header's probe kernel built and ran
_settling = threading.Lock()
_trusted_here: list[bool] = []  # `_before_building` trusted the unverified set in the main thread


class VecIsaRejected(RuntimeError):
    """The trusted vector instruction set failed its check: Inductor picked its list again,
    and code generated for the rejected set must be generated again."""


def _settle_vec_isa() -> None:
    """Check the set `_check_vec_isa` picked unverified, once: by the kernel header's probe
    kernel (waiting for its thread), else by Inductor's own probe. If it fails, Inductor's
    full check picks the list again and VecIsaRejected is raised."""
    import torch._inductor.config as inductor_config
    from torch._inductor import cpu_vec_isa

    with _settling:
        if not _unverified_isa:
            return
        for thread in _header_start:
            thread.join()
        isa = _unverified_isa.pop()
        if _header_verdict == [True]:
            return
        with inductor_config.patch({"cpp.vec_isa_ok": None}):
            if bool(isa):  # Inductor's probe of `isa`
                return
        cpu_vec_isa.valid_vec_isa_list.cache_clear()
        cpu_vec_isa.pick_vec_isa()
        raise VecIsaRejected(f"vector instruction set {isa} failed its check")


def _settled_first(precompile: Callable) -> Callable:
    """Inductor's `_precompile_header`, which every CPU kernel build asks for its header
    first, settling the vector instruction set before it (except in the header's own
    thread, whose build is the check)."""
    def precompile_header(*args, **kwargs):
        if threading.current_thread() not in _header_start:
            _settle_vec_isa()
        return precompile(*args, **kwargs)

    precompile_header.cache_clear = precompile.cache_clear
    precompile_header.settles_vec_isa = True
    return precompile_header


def start_inductor(root: Path | None, device: torch.device) -> None:
    """Start what must precede Inductor's first use in this process, in a thread, so that it
    runs beside the model load: importing Inductor (with Dynamo, 1 s of a warm start here),
    hashing torch's sources and, on CPU, its check of which vector instruction sets build and load
    (`_check_vec_isa`). Cold, that check builds and loads probe libraries with g++ (up to
    ten; 16 s of a cold start on the Xeon of earlier notes; cold starts 31-40 s instead of
    42-43 there); warm, a kept verdict leaves three probes of the sets' extensions (0.15 s).
    `root`: the persistent cache (None: none), whose build directories must be set before
    Inductor is imported. `inductor_ready` waits for the imports; the first compile or
    artifact load waits for the check. Calling this again does nothing more."""
    if _inductor_start:
        return
    if root is not None:
        keep_builds_in(root)  # before anything imports Inductor: it reads this once
    kept = root is not None and _verdict_kept(root)
    thread = threading.Thread(target=_prepare_inductor, args=(kept, device.type == "cpu"),
                              name="kiln-inductor-start", daemon=True)
    _inductor_start.append(thread)
    thread.start()


# A CPU kernel as Inductor generates them (vectorised, so built with the same flags), whose
# build makes Inductor precompile their shared header.
_HEADER_PROBE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C" void kernel(float* out) {
  at::vec::Vectorized<float>(1.0f).store(out);
}
"""
_header_start: list[threading.Thread] = []


def start_kernel_header(device: torch.device) -> None:
    """Precompile Inductor's CPU kernel header (`_keep_headers_in`) in a thread, beside the
    trace and lowering of the first compile, instead of when that compile builds its first
    kernel: the header took 7.9 s of a 29.5 s cold start of SmolLM2 here, every other
    kernel waiting for it. The compile's own request for the header then waits on the
    header's file lock and finds it built (Inductor keys it by the command line and the
    preprocessed source, which this probe shares with every vectorised kernel). Only once
    `start_inductor` runs (no start mark: something may compile), on CPU."""
    if device.type != "cpu" or not _inductor_start or _header_start:
        return
    thread = threading.Thread(target=_build_kernel_header, name="kiln-kernel-header",
                              daemon=True)
    _header_start.append(thread)
    thread.start()


def _build_kernel_header() -> None:
    try:
        # First: this wait keeps the thread out of the start's imports, and the header's
        # flags come from the picked vector instruction set.
        _vec_isa_picked.wait()
        _keep_headers_in(_builds_dir())
        from torch._inductor.codecache import CppPythonBindingsCodeCache
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        kernel = CppPythonBindingsCodeCache.load_pybinding(["float*"], _HEADER_PROBE)
        out = torch.zeros(64)
        kernel(out)  # one vector of ones, as wide as the picked set's
        width = pick_vec_isa().nelements()
        works = bool(out[:width].eq(1).all() and out[width:].eq(0).all())
    except Exception:  # the compile that needs the header builds it again and reports it
        works = False
    _header_verdict.append(works)


class _TemplateOnFirstUse:
    """A kernel template's Jinja source, compiled when the template is first used."""

    def __init__(self, compile_template, source: str):
        self._compile = compile_template
        self._source = source
        self._template = None

    def __getattr__(self, name: str):
        # Protocol lookups (copy, pickle) and the proxy's own fields, before they are set,
        # are not the template's: answering them would compile it, or recurse.
        if name.startswith("__") or name in ("_compile", "_source", "_template"):
            raise AttributeError(name)
        if self._template is None:
            self._template = self._compile(self._source)
        return getattr(self._template, name)


def defer_kernel_templates() -> None:
    """Make Inductor compile a kernel template's Jinja source when the template is first
    used instead of when it is defined. Importing Inductor's compiler defines 23 Triton
    (GPU) kernel templates and compiled each one's Jinja source then: 0.56-0.63 s for that
    import instead of 0.73-1.26 here, six alternating processes, on every start; kiln's
    CPU code uses none of them, and on CUDA only max-autotune does (unchanged: compiled on
    first use). Where Inductor has no such hook (another torch) or Jinja is missing (the
    templates are then None, which callers check), nothing changes."""
    import importlib.util

    from torch._inductor.codegen import common

    kernel_template = getattr(common, "KernelTemplate", None)
    compile_template = getattr(kernel_template, "_template_from_string", None)
    if compile_template is None or getattr(compile_template, "deferred_by_kiln", False) or \
            importlib.util.find_spec("jinja2") is None:
        return

    def on_first_use(source: str) -> _TemplateOnFirstUse:
        return _TemplateOnFirstUse(compile_template, source)

    on_first_use.deferred_by_kiln = True
    kernel_template._template_from_string = staticmethod(on_first_use)


def _prepare_inductor(kept: bool, check_vec_isa: bool) -> None:
    # The import holds the GIL; the weight load beside it takes it back after every tensor
    # copy, waiting a whole switch interval (5 ms) each time unless it is shorter: SmolLM2's
    # bfloat16 load took 0.5 s instead of 0.26 beside the import.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        defer_kernel_templates()  # before anything defines them (compile_fx's imports)
        import torch._inductor.config as inductor_config
        from torch._inductor.codecache import torch_key

        # The vector instruction set first, as soon as Inductor's build code is imported:
        # the kernel header's build waits for it.
        trusted = True if kept else inductor_config.cpp.vec_isa_ok
        if check_vec_isa and trusted is not False:
            _check_vec_isa(trusted)
        _vec_isa_picked.set()
        # A hash of torch's sources (0.12-0.14 s here) that every artifact load compares
        # with the one it was saved with, computed once per process: here, while the main
        # thread loads weights and imports nothing (the hash walks torch's modules).
        torch_key()
        # The rest of Inductor's compiler here too: two threads importing Inductor's modules
        # at once can meet in an import cycle, where Python hands one of them a module still
        # being initialised (the suite once failed with "cannot import name
        # 'autograd_cache'" in the main thread).
        importlib.import_module("torch._inductor.compile_fx")
        importlib.import_module("torch.utils.cpp_extension")
    except Exception:  # the main thread's own import raises it where it can be handled
        pass
    finally:
        sys.setswitchinterval(interval)
        _vec_isa_picked.set()
        _inductor_imported.set()


@contextlib.contextmanager
def beside_inductor_start():
    """Run the block's torch work on one thread fewer while `start_inductor`'s thread
    imports. With two cores, an OpenMP team of two (weight conversion, packing) waits at
    every barrier for the core the import holds: packing SmolLM2's float32 weights took
    0.66-0.7 s beside the import, 0.3-0.46 on one thread, 0.17 alone."""
    threads = torch.get_num_threads()
    if threads > 1 and _inductor_start and not _inductor_imported.is_set():
        torch.set_num_threads(threads - 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def inductor_ready(root: Path | None, device: torch.device) -> None:
    """Wait for `start_inductor`'s imports (starting it if nothing did) and apply kiln's
    settings under the cache at `root` in this thread (Inductor's settings are per thread).
    Where the start thread's import failed, this one raises its error."""
    start_inductor(root, device)
    _inductor_imported.wait()
    if root is not None:
        configure_inductor(root)
    importlib.import_module("torch._inductor.compile_fx")


@contextlib.contextmanager
def joined_on_error():
    """Run the block; if it raises an error, wait for `start_inductor`'s thread before the
    error leaves it. The thread's imports register loggers, and code that walks logging's
    registry meanwhile failed: pytest's log capture, at the phase after an `LLM` that
    rejected its config.json, raised "dictionary changed size during iteration" (CI). The
    wait is the imports' rest (about 2 s at most here) and, before a compile cache holds
    a verdict, the vector instruction set check; a KeyboardInterrupt does not wait."""
    try:
        yield
    except Exception:
        _wait_for_inductor_start()
        raise


def _wait_for_inductor_start() -> None:
    """Wait for the start thread to finish: Inductor keeps the vector instruction set
    check's answer once it has one, so waiting keeps two threads from running the same
    probes."""
    for thread in _inductor_start:
        thread.join()
