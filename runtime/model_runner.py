"""Turns a scheduled batch into flat tensors, runs the model, and samples.

Input preparation works on whole-batch numpy arrays: the Python work per step is one slice
per request (its new tokens and its block ids), never one operation per token."""

import itertools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..compiler.cache import CompileCache
from ..compiler.inductor import beside_inductor_start, keep_builds_in, start_inductor
from ..graphs.chain import load_step_loop
from ..graphs.runner import GraphRunner, start_key
from ..models import AttentionMetadata, attention_context
from ..models.cpu_attention import load_decode_kernel
from ..models.cpu_build import KERNEL_DTYPES
from ..models.cpu_linear import load_linear_kernel
from ..models.huge_pages import advise_huge_pages, keep_small_pages
from ..models.loader import build_model, init_dummy_weights, load_weights
from .config import EngineConfig
from .sampler import SamplerOutput, SamplingBatch, sample
from .scheduler import ScheduledBatch

logger = logging.getLogger("kiln")


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states that produce a next token
    sampling_rows: list[int]  # which batch entries those are


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. Zeroed, not empty: attention reads whole blocks and masks the unwritten
    slots, and a NaN left in freed memory would survive the mask (NaN * 0 is NaN). On CPU
    the memory comes from calloc through numpy, so the OS hands out zero pages as they are
    first touched instead of kiln writing gigabytes of zeros at start (0.8 s for 2 GiB)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.device
        self.block_size = config.cache.block_size
        cache_dir = config.compile_cache_dir
        compile_cache = CompileCache(cache_dir) \
            if cache_dir is not None and not config.enforce_eager else None
        if compile_cache is not None:
            keep_builds_in(compile_cache.root)
        # Inductor's imports and CPU check run beside the load, unless the last start with
        # these settings ran every compiled piece without Inductor (graphs/runner.py).
        if not config.enforce_eager and not (compile_cache is not None and compile_cache.marked(
                start_key(config.compilation, config.compile_sizes(),
                          config.compile_cache_salt()))):
            start_inductor(compile_cache.root if compile_cache is not None else None,
                           self.device)
        with beside_inductor_start():
            self._load_model()
            self._allocate_kv_cache()
            self.graph_runner = GraphRunner(
                self.model, self.device, config.enforce_eager, config.compilation,
                config.compile_sizes(), config.scheduler.max_num_seqs,
                -(-config.model.max_model_len // self.block_size), self.sink_block,
                self.block_size, compile_cache, config.compile_cache_salt())

    def _load_model(self) -> None:
        config = self.config
        start = time.perf_counter()
        # What other engines in this process hold, so the KV cache is sized from this one's use
        self.memory_before = (torch.cuda.memory_allocated(self.device)
                              if self.device.type == "cuda" else 0)
        self.model = build_model(config.model.arch_config, config.model.dtype, self.device)
        if config.model.load_format == "dummy":
            init_dummy_weights(self.model, config.model.seed)
        else:
            load_weights(self.model, config.model.path)
        logger.info("loaded %s (%s) in %.1f s", config.model.path, config.model.dtype,
                    time.perf_counter() - start)
        self.decode_kernel = None  # filled into each step's metadata (CPU only)
        if self.device.type == "cpu" and not config.enforce_eager:
            load_step_loop(config.kernel_dir)  # one-token steps run their layers' kernels in it
        if self.device.type == "cpu" and config.model.dtype in KERNEL_DTYPES:
            self.decode_kernel = load_decode_kernel(config.kernel_dir)
            if not config.enforce_eager and \
                    "single_token_linear_as_row_kernel" in config.compilation.passes:
                load_linear_kernel(config.kernel_dir)  # the one-token pieces call it

    def _allocate_kv_cache(self) -> None:
        config = self.config
        layers = self.model.attention_layers()
        attn = layers[0]
        self.bytes_per_block = (2 * len(layers) * self.block_size * attn.num_kv_heads
                                * attn.head_dim * config.model.dtype.itemsize)
        self.num_blocks = self._num_kv_blocks()
        # One block more than the block manager hands out: padding tokens of compiled sizes
        # write there.
        self.sink_block = self.num_blocks
        cache = zeroed((len(layers), 2, self.num_blocks + 1, self.block_size,
                        attn.num_kv_heads, attn.head_dim), config.model.dtype, self.device)
        if self.device.type == "cpu":
            advise_huge_pages(cache)  # decode attention walks it block by block, every layer
            # From the first warm-up on, padding tokens write to the sink block of every layer:
            # in huge pages, 60 of them for SmolLM2, 2 MiB each for 12 KiB of sink, whose first
            # writes took 0.24-0.27 s of a warm start here.
            keep_small_pages([(block.data_ptr(), block.nbytes)
                              for block in cache[:, :, self.sink_block].flatten(0, 1)])
        for layer, kv in zip(layers, cache):
            layer.kv_cache = kv
        max_len = config.model.max_model_len
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB); %.1f requests "
                    "of max_model_len=%d fit at once", self.num_blocks, self.block_size,
                    self.num_blocks * self.block_size, cache.numel() * cache.element_size() / 2**30,
                    self.num_blocks * self.block_size / max_len, max_len)

    def dummy_metadata(self, num_tokens: int) -> AttentionMetadata:
        """A decode-only step of `num_tokens` one-token sequences in the sink block, for
        compiling and capturing without touching any request's blocks."""
        return self._prepare(
            token_ids=[np.zeros(num_tokens, dtype=np.int64)],
            starts=np.zeros(num_tokens, dtype=np.int64),
            num_scheduled=np.ones(num_tokens, dtype=np.int64),
            block_tables=[[self.sink_block]] * num_tokens, num_decodes=num_tokens,
            sampling_rows=[]).meta

    def _num_kv_blocks(self) -> int:
        cache = self.config.cache
        memory = cache.kv_cache_memory
        if memory is None and self.device.type == "cuda":
            memory = self._free_cuda_memory_after_profile()
        elif memory is None:
            memory = cache.DEFAULT_CPU_KV_CACHE_MEMORY
        num_blocks = memory // self.bytes_per_block
        needed = -(-self.config.model.max_model_len // self.block_size)
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache ({memory} bytes, {num_blocks} blocks) cannot hold one request "
                f"of max_model_len={self.config.model.max_model_len} ({needed} blocks); raise "
                f"kv_cache_memory / gpu_memory_utilization or lower max_model_len")
        return int(num_blocks)

    @torch.inference_mode()
    def _free_cuda_memory_after_profile(self) -> int:
        """Run the largest prefill the scheduler can send, then give the KV cache what is left
        of the `gpu_memory_utilization` share of the device once this engine's weights and
        activations are counted (memory other engines of the process hold is not part of this
        one's share, but must leave room for it)."""
        num_tokens = min(self.config.scheduler.max_num_batched_tokens,
                         self.config.model.max_model_len)
        layers = self.model.attention_layers()
        num_blocks = -(-num_tokens // self.block_size)
        scratch = torch.zeros(2, num_blocks, self.block_size, layers[0].num_kv_heads,
                              layers[0].head_dim, dtype=self.config.model.dtype,
                              device=self.device)
        for layer in layers:
            layer.kv_cache = scratch
        torch.cuda.reset_peak_memory_stats(self.device)
        batch_inputs = self._prepare(
            token_ids=[np.zeros(num_tokens, dtype=np.int64)],
            starts=np.zeros(1, dtype=np.int64), num_scheduled=np.array([num_tokens]),
            block_tables=[list(range(num_blocks))], num_decodes=0, sampling_rows=[0])
        with attention_context(batch_inputs.meta):  # eager: the profile precedes compiling
            hidden = self.model(batch_inputs.input_ids, batch_inputs.positions)
        self.model.compute_logits(hidden[batch_inputs.logits_indices])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - self.memory_before
        del scratch, hidden
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        share = int(total * self.config.cache.gpu_memory_utilization)
        budget = share - peak
        if budget <= 0:
            raise ValueError(f"no GPU memory left for the KV cache: the model peaks at "
                             f"{peak / 2**30:.2f} GiB of the {share / 2**30:.2f} GiB allowed by "
                             f"gpu_memory_utilization={self.config.cache.gpu_memory_utilization}")
        free = torch.cuda.mem_get_info(self.device)[0]
        if budget > free:
            raise ValueError(
                f"the KV cache's share of gpu_memory_utilization="
                f"{self.config.cache.gpu_memory_utilization} is {budget / 2**30:.2f} GiB but "
                f"only {free / 2**30:.2f} GiB of the GPU is free (other engines or processes "
                f"hold the rest): lower gpu_memory_utilization, set kv_cache_memory, or free "
                f"the other engine (del llm; gc.collect())")
        return budget

    def prepare_inputs(self, batch: ScheduledBatch) -> ModelInputs:
        reqs = batch.requests
        starts = np.fromiter((r.num_computed_tokens for r in reqs), np.int64, len(reqs))
        num_scheduled = np.asarray(batch.num_scheduled_tokens, dtype=np.int64)
        token_ids = [r.token_ids[s:s + n] for r, s, n in zip(reqs, starts.tolist(),
                                                              num_scheduled.tolist())]
        ends = starts + num_scheduled
        sampling_rows = [i for i, (r, e) in enumerate(zip(reqs, ends.tolist()))
                         if e == r.num_tokens]
        return self._prepare(token_ids, starts, num_scheduled, [r.block_ids for r in reqs],
                             batch.num_decodes, sampling_rows)

    def _prepare(self, token_ids, starts, num_scheduled, block_tables, num_decodes,
                 sampling_rows) -> ModelInputs:
        num_seqs = len(block_tables)
        bs = self.block_size
        seq_lens = starts + num_scheduled
        cu = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(num_scheduled, out=cu[1:])
        token_to_seq = np.repeat(np.arange(num_seqs), num_scheduled)
        token_offsets = np.arange(cu[-1]) - cu[token_to_seq]
        positions = starts[token_to_seq] + token_offsets
        width = -(-int(seq_lens.max()) // bs)
        tables = np.zeros((num_seqs, width), dtype=np.int64)
        for row, ids in enumerate(block_tables):
            tables[row, : len(ids)] = ids
        slot_mapping = tables[token_to_seq, positions // bs] * bs + positions % bs
        prefill_lens = num_scheduled[num_decodes:]
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slot_mapping),
            seq_lens=self._tensor(seq_lens),
            query_lens=self._tensor(num_scheduled),
            block_tables=self._tensor(tables),
            token_to_seq=self._tensor(token_to_seq),
            token_offsets=self._tensor(token_offsets),
            token_lens=self._tensor(positions + 1),
            num_decodes=num_decodes,
            max_query_len=int(prefill_lens.max()) if len(prefill_lens) else 0,
            decode_kernel=self.decode_kernel,
        )
        return ModelInputs(
            input_ids=self._tensor(np.concatenate(token_ids)),
            positions=self._tensor(positions),
            meta=meta,
            logits_indices=self._tensor(cu[1:][sampling_rows] - 1),
            sampling_rows=sampling_rows,
        )

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(self.device)

    def warmup(self) -> None:
        self.graph_runner.warmup(self.dummy_metadata)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list[int], SamplerOutput | None, dict]:
        """Run one step; return the batch rows that produced a token, their sample, and the
        prompt logprobs computed in this step (request -> entries, see `prompt_logprobs`)."""
        inputs = self.prepare_inputs(batch)
        hidden = self.graph_runner.run(inputs.input_ids, inputs.positions, inputs.meta)
        prompt_logprobs = self.prompt_logprobs(batch, hidden)
        if not inputs.sampling_rows:
            return [], None, prompt_logprobs
        logits = self.graph_runner.logits(hidden[inputs.logits_indices])
        reqs = [batch.requests[i] for i in inputs.sampling_rows]
        sampling = SamplingBatch.from_requests(reqs, logits.shape[-1], self.device)
        return inputs.sampling_rows, sample(logits, sampling), prompt_logprobs

    @torch.inference_mode()
    def execute_pooling(self, batch: ScheduledBatch) -> tuple[list[int], torch.Tensor]:
        """Run one step of pooling requests; return the batch rows whose prompt ended in this
        step and the final hidden state of each one's last token (last-token pooling)."""
        inputs = self.prepare_inputs(batch)
        hidden = self.graph_runner.run(inputs.input_ids, inputs.positions, inputs.meta)
        return inputs.sampling_rows, hidden[inputs.logits_indices].float()

    def prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor) -> dict:
        """For requests that asked for prompt logprobs: each prompt position this step
        computed (and not recorded before a preemption) gives the logprob of the next prompt
        token, its rank, and the top-k: request -> [(token, logprob, rank, top ids, top
        logprobs)]."""
        out = {}
        offsets = itertools.accumulate(batch.num_scheduled_tokens, initial=0)
        for req, n, offset in zip(batch.requests, batch.num_scheduled_tokens, offsets):
            k = req.params.prompt_logprobs
            if k is None:  # the usual case: no per-request work on the hot path
                continue
            start = req.num_computed_tokens
            first = max(start, len(req.prompt_logprobs) - 1)
            last = min(start + n, req.num_prompt_tokens - 1)  # positions predicting a prompt token
            if first < last:
                rows = torch.arange(offset + first - start, offset + last - start,
                                    device=hidden.device)
                logprobs = self.model.compute_logits(hidden[rows]).log_softmax(-1)
                targets = torch.tensor(req.token_ids[first + 1:last + 1], device=hidden.device)
                chosen = logprobs.gather(1, targets[:, None])[:, 0]
                ranks = (logprobs > chosen[:, None]).sum(-1) + 1
                top = logprobs.topk(k, dim=-1)
                out[req] = list(zip(targets.tolist(), chosen.tolist(), ranks.tolist(),
                                    top.indices.tolist(), top.values.tolist()))
        return out
