"""Pooling models: embeddings (`encode`, `embed`, `score` by cosine) and cross-encoder scores.

Encoders keep no KV cache and need no scheduler step by step: prompts are sorted by length,
packed into flat batches of at most `max_num_batched_tokens` tokens, run once (through the
compiled layers unless `enforce_eager`), pooled and returned in the caller's order. How to
pool comes from the checkpoint's sentence-transformers files (modules.json,
1_Pooling/config.json) unless `PoolingParams` says otherwise."""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models import AttentionMetadata

POOLING_TYPES = ("MEAN", "CLS", "LAST", "MAX")


@dataclass
class PoolingParams:
    normalize: bool | None = None  # None: as the checkpoint's sentence-transformers config
    activation: bool = True  # cross-encoders: sigmoid (one label) or softmax of the logits

    def __post_init__(self) -> None:
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be True, False or None, got {self.normalize!r}")
        if not isinstance(self.activation, bool):
            raise ValueError(f"activation must be True or False, got {self.activation!r}")


@dataclass
class PoolingConfig:
    pooling_type: str  # MEAN, CLS, LAST or MAX
    normalize: bool

    @classmethod
    def from_checkpoint(cls, folder: str | Path, default: "PoolingConfig") -> "PoolingConfig":
        """sentence-transformers' choice for the checkpoint; `default` when the folder has
        none."""
        folder = Path(folder)
        modules_path = folder / "modules.json"
        if not modules_path.is_file():
            return default
        try:
            modules = json.loads(modules_path.read_text())
            types = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
            pooling = {}
            if "Pooling" in types:
                pooling = json.loads((folder / types["Pooling"] / "config.json").read_text())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read the sentence-transformers config in {folder}: "
                             f"{e}") from e
        mode = next((name for key, name in (("pooling_mode_mean_tokens", "MEAN"),
                                            ("pooling_mode_cls_token", "CLS"),
                                            ("pooling_mode_lasttoken", "LAST"),
                                            ("pooling_mode_max_tokens", "MAX"))
                     if pooling.get(key)), default.pooling_type)
        return cls(mode, "Normalize" in types)


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def data(self) -> torch.Tensor:
        return torch.tensor(self.embedding)


@dataclass
class ScoringOutput:
    score: float


@dataclass
class PoolingRequestOutput:
    """vLLM's EmbeddingRequestOutput / ScoringRequestOutput shape."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput | ScoringOutput
    finished: bool = True


def pool(hidden: torch.Tensor, seq_lens: torch.Tensor, token_to_seq: torch.Tensor,
         pooling_type: str) -> torch.Tensor:
    """[T, H] hidden states of a flat batch of sequences -> [S, H]."""
    ends = seq_lens.cumsum(0)
    if pooling_type == "CLS":
        return hidden[ends - seq_lens]
    if pooling_type == "LAST":
        return hidden[ends - 1]
    out = hidden.new_zeros(seq_lens.shape[0], hidden.shape[1])
    if pooling_type == "MEAN":
        return out.index_add_(0, token_to_seq, hidden) / seq_lens[:, None]
    return out.index_reduce_(0, token_to_seq, hidden, "amax", include_self=False)


def flat_metadata(lengths: list[int], device: torch.device) -> AttentionMetadata:
    """Metadata of a flat encoder batch: sequences of `lengths` tokens, back to back."""
    seq_lens = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(seq_lens) - seq_lens
    token_to_seq = np.repeat(np.arange(len(lengths)), seq_lens)
    offsets = np.arange(int(seq_lens.sum())) - starts[token_to_seq]

    def tensor(a):
        return torch.from_numpy(a).to(device)

    return AttentionMetadata(
        slot_mapping=tensor(offsets),  # unused: encoders write no KV cache
        seq_lens=tensor(seq_lens), query_lens=tensor(seq_lens),
        block_tables=torch.zeros(len(lengths), 0, dtype=torch.int64, device=device),
        token_to_seq=tensor(token_to_seq), token_offsets=tensor(offsets),
        token_lens=tensor(offsets + 1),
        num_decodes=0, max_query_len=int(seq_lens.max()))


class PoolingRunner:
    """Packs prompts into flat batches of at most `max_batch_tokens` tokens and runs the
    encoder through the GraphRunner: compiled per token-count bucket unless eager."""

    def __init__(self, model: torch.nn.Module, config):
        from ..compiler.cache import CompileCache
        from ..graphs.runner import GraphRunner

        self.model = model
        self.device = config.device
        sizes = config.compile_sizes()
        self.max_batch_tokens = config.scheduler.max_num_batched_tokens
        if self.max_batch_tokens < config.model.max_model_len:
            raise ValueError(f"an encoder runs each prompt whole, so max_num_batched_tokens="
                             f"{self.max_batch_tokens} must be at least max_model_len="
                             f"{config.model.max_model_len}")
        cache_dir = config.compile_cache_dir
        cache = None if config.enforce_eager or cache_dir is None else CompileCache(cache_dir)
        # Encoder batches are never decode-only, so there is nothing to capture as a graph.
        compilation = dataclasses.replace(config.compilation, cudagraphs=False)
        self.graph_runner = GraphRunner(model, self.device, config.enforce_eager, compilation,
                                        sizes, config.scheduler.max_num_seqs, 1, 0, 1, cache,
                                        config.compile_cache_salt())

    def warmup(self) -> None:
        self.graph_runner.warmup(lambda n: flat_metadata([1] * n, self.device))

    def batches(self, lengths: list[int]) -> list[list[int]]:
        """Prompt indices grouped by similar length (attention pads to the longest of a
        batch) within the token budget."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        groups, current, tokens = [], [], 0
        for i in order:
            if current and tokens + lengths[i] > self.max_batch_tokens:
                groups.append(current)
                current, tokens = [], 0
            current.append(i)
            tokens += lengths[i]
        return groups + ([current] if current else [])

    @torch.inference_mode()
    def hidden_states(self, prompts: list[tuple[list[int], list[int]]]):
        """Yield (indices, hidden [T, H], metadata) per batch of (ids, type ids)."""
        for group in self.batches([len(ids) for ids, _ in prompts]):
            meta = flat_metadata([len(prompts[i][0]) for i in group], self.device)
            ids, types = (torch.tensor([t for i in group for t in prompts[i][part]],
                                       device=self.device) for part in (0, 1))
            yield group, self.graph_runner.run(ids, meta.token_offsets, meta, types), meta

    def embed(self, prompts: list[list[int]], pooling_type: str,
              normalize: bool) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [None] * len(prompts)
        for group, hidden, meta in self.hidden_states([(p, [0] * len(p)) for p in prompts]):
            pooled = pool(hidden.float(), meta.seq_lens, meta.token_to_seq, pooling_type)
            if normalize:
                pooled = F.normalize(pooled, dim=-1)
            for row, i in enumerate(group):
                out[i] = pooled[row].cpu()
        return out

    def classify(self, pairs: list[tuple[list[int], list[int]]],
                 activation: bool) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [None] * len(pairs)
        for group, hidden, meta in self.hidden_states(pairs):
            logits = self.model.classify(pool(hidden, meta.seq_lens, meta.token_to_seq,
                                              "CLS")).float()
            if activation:
                logits = logits.sigmoid() if logits.shape[-1] == 1 else logits.softmax(-1)
            for row, i in enumerate(group):
                out[i] = logits[row].cpu()
        return out


class Pooler:
    """The pooling side of `LLM`. Encoders run here in padded batches with no KV cache;
    decoder models pool their last token through the generation engine (`engine`)."""

    def __init__(self, config, engine=None):
        from ..models.loader import build_model, init_dummy_weights, load_weights
        from .tokenizer import Tokenizer

        mc = config.model
        self.max_len = mc.max_model_len
        self.engine = engine
        if engine is not None:
            self.tokenizer = engine.tokenizer
            # vLLM's default for decoders used as embedding models.
            self.pooling = PoolingConfig.from_checkpoint(mc.path, PoolingConfig("LAST", True))
            if self.pooling.pooling_type != "LAST":
                raise ValueError(f"kiln pools decoder models by their last token; "
                                 f"{mc.path} asks for {self.pooling.pooling_type} pooling")
            self.is_cross_encoder = False
            return
        self.tokenizer = None if mc.skip_tokenizer_init else Tokenizer(mc.tokenizer,
                                                                       mc.tokenizer_mode)
        self.model = build_model(mc.arch_config, mc.dtype, config.device)
        if mc.load_format == "dummy":
            init_dummy_weights(self.model, mc.seed)
        else:
            load_weights(self.model, mc.path)
        self.pooling = PoolingConfig.from_checkpoint(mc.path, PoolingConfig("CLS", False))
        self.is_cross_encoder = hasattr(self.model, "classify")
        self.runner = PoolingRunner(self.model, config)

    def check_length(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty (it has no tokens)")
        if len(ids) > self.max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, longer than "
                             f"max_model_len={self.max_len}")

    def embed(self, prompts: list[list[int]], params: PoolingParams) -> list[torch.Tensor]:
        for ids in prompts:
            self.check_length(ids)
        normalize = self.pooling.normalize if params.normalize is None else params.normalize
        if self.engine is not None:
            vectors = self.engine.embed_last_tokens(prompts)
            return [F.normalize(v, dim=-1) if normalize else v for v in vectors]
        return self.runner.embed(prompts, self.pooling.pooling_type, normalize)

    def score(self, pairs: list[tuple[str, str]], params: PoolingParams) -> list[float]:
        if self.is_cross_encoder:
            if self.model.config.num_labels != 1:
                raise ValueError(f"score needs a cross-encoder with one label; this one has "
                                 f"{self.model.config.num_labels}")
            encoded = [self.tokenizer.encode_pair(a, b) for a, b in pairs]
            for ids, _ in encoded:
                self.check_length(ids)
            return [float(v[0]) for v in self.runner.classify(encoded, params.activation)]
        texts = sorted({t for pair in pairs for t in pair})
        vectors = dict(zip(texts, self.embed([self.tokenizer.encode(t) for t in texts],
                                             PoolingParams(normalize=True))))
        return [float(vectors[a] @ vectors[b]) for a, b in pairs]
