"""Pooling models: embeddings (`encode`, `embed`, `score` by cosine) and cross-encoder scores.

Encoders keep no KV cache and need no scheduler step by step: prompts are sorted by length,
packed into padded batches of at most `max_num_batched_tokens` tokens, run once, pooled and
returned in the caller's order. How to pool comes from the checkpoint's sentence-transformers
files (modules.json, 1_Pooling/config.json) unless `PoolingParams` says otherwise."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

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


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling_type: str) -> torch.Tensor:
    """[B, T, H] hidden states of a right-padded batch -> [B, H]."""
    mask = mask.to(hidden.dtype)[..., None]
    if pooling_type == "MEAN":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    if pooling_type == "CLS":
        return hidden[:, 0]
    if pooling_type == "LAST":
        last = mask[..., 0].sum(1).long() - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    return hidden.masked_fill(mask == 0, float("-inf")).amax(1)


class PoolingRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, max_batch_tokens: int):
        self.model = model
        self.device = device
        self.max_batch_tokens = max_batch_tokens

    def batches(self, lengths: list[int]) -> list[list[int]]:
        """Prompt indices grouped by similar length, each group padded to its longest prompt
        within the token budget."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        groups, current = [], []
        for i in order:
            if current and (len(current) + 1) * lengths[i] > self.max_batch_tokens:
                groups.append(current)
                current = []
            current.append(i)
        return groups + ([current] if current else [])

    @torch.inference_mode()
    def hidden_states(self, prompts: list[tuple[list[int], list[int]]]):
        """Yield (indices, hidden [B, T, H], mask [B, T]) per batch of (ids, type ids)."""
        for group in self.batches([len(ids) for ids, _ in prompts]):
            width = max(len(prompts[i][0]) for i in group)
            ids = torch.zeros(len(group), width, dtype=torch.int64)
            types = torch.zeros(len(group), width, dtype=torch.int64)
            mask = torch.zeros(len(group), width, dtype=torch.int64)
            for row, i in enumerate(group):
                n = len(prompts[i][0])
                ids[row, :n] = torch.tensor(prompts[i][0])
                types[row, :n] = torch.tensor(prompts[i][1])
                mask[row, :n] = 1
            ids, types, mask = (t.to(self.device) for t in (ids, types, mask))
            yield group, self.model(ids, types, mask), mask

    def embed(self, prompts: list[list[int]], pooling_type: str,
              normalize: bool) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [None] * len(prompts)
        for group, hidden, mask in self.hidden_states([(p, [0] * len(p)) for p in prompts]):
            pooled = pool(hidden, mask, pooling_type).float()
            if normalize:
                pooled = F.normalize(pooled, dim=-1)
            for row, i in enumerate(group):
                out[i] = pooled[row].cpu()
        return out

    def classify(self, pairs: list[tuple[list[int], list[int]]],
                 activation: bool) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [None] * len(pairs)
        for group, hidden, _ in self.hidden_states(pairs):
            logits = self.model.classify(hidden).float()
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
        self.runner = PoolingRunner(self.model, config.device,
                                    config.scheduler.max_num_batched_tokens)

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
