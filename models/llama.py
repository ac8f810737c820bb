"""The Llama decoder family: Llama 2/3 (and SmolLM2), Mistral, Qwen2 (q/k/v bias) and Qwen3
(RMSNorm on each query and key head). Pre-norm transformer blocks with grouped-query
attention, rotary positions and a SwiGLU MLP; layers pass (hidden, residual) so the residual
add lives inside the next norm."""

import torch
from torch import nn

from .attention import Attention
from .cpu_packed_linear import linear_with_packed_copy
from .layers import (
    LogitsProjection,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
)


def sliding_window_of_layer(config, layer: int) -> int | None:
    if config.layer_types is not None:
        return config.sliding_window if config.layer_types[layer] == "sliding_attention" \
            else None
    return config.sliding_window


class LlamaAttention(nn.Module):
    def __init__(self, config, layer: int, rotary_emb: RotaryEmbedding):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_bias = config.attention_bias or config.model_type == "qwen2"
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, self.num_heads,
                                          self.num_kv_heads, bias=qkv_bias)
        self.o_proj = RowParallelLinear(self.num_heads * self.head_dim, hidden,
                                        bias=config.attention_bias)
        self.has_qk_norm = config.model_type == "qwen3"
        if self.has_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim,
                              sliding_window_of_layer(config, layer))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(
            [self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.has_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = config.mlp_bias
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias)
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer: int, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer, rotary_emb)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, positions, hidden, residual):
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # One table for all layers: they rotate by the same angles.
        rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                     config.rope_parameters)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary_emb) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, call_layer=None):
        # A zero residual makes the first layer's graph the same as every other's (adding
        # zero is exact), so one trace serves all layers.
        hidden = self.embed_tokens(input_ids)
        residual = torch.zeros_like(hidden)
        for layer in self.layers:
            if call_layer is None:
                hidden, residual = layer(positions, hidden, residual)
            else:
                hidden, residual = call_layer(layer, positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # Checkpoint projections that kiln stores fused: checkpoint name -> (fused name, shard).
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.tie_word_embeddings = bool(config.tie_word_embeddings)
        if not self.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.logits_projection = LogitsProjection()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                call_layer=None) -> torch.Tensor:
        """Hidden states of every token; attention metadata comes from attention_context.
        `call_layer(layer, positions, hidden, residual)`, when given, runs each decoder layer
        (the compiler passes its compiled layer call here)."""
        return self.model(input_ids, positions, call_layer)

    @property
    def logits_weight(self) -> nn.Parameter:
        """The vocabulary matrix [V, H] the logits are computed with."""
        return (self.model.embed_tokens if self.tie_word_embeddings else self.lm_head).weight

    def compute_logits(self, hidden: torch.Tensor, call_layer=None) -> torch.Tensor:
        """Float32 logits [T, V]; `call_layer`, when given, runs the projection (the
        compiler passes its compiled call for one-row decode steps)."""
        weight = self.logits_weight
        if call_layer is not None:
            return call_layer(self.logits_projection, hidden, weight)
        if hidden.shape[0] == 1:
            return self.logits_projection(hidden, weight)
        # The same product with the vocabulary as BLAS's outer matrix: 1.6x faster for 32
        # rows on an earlier CPU (see compiler/passes.py, linear_as_weight_times_input).
        # Copied back to row-major: the sampler's argmax over a transposed view of 64 rows
        # took 14 ms, over rows 1 ms.
        if hidden.device.type != "cpu":
            return (weight @ hidden.T).T.float().contiguous()
        # A compiled model packed the matrix for oneDNN (models/cpu_packed_linear.py): on the
        # Zen 3 EPYC of the README, float32, 28.6 ms for 64 rows against 36.7 in slices
        # below, 6.8 against 17.7 for 8.
        packed = linear_with_packed_copy(hidden, weight)
        if packed is not None:
            return packed.float()
        # Otherwise in slices of the vocabulary, each copied while it is still in cache: for
        # SmolLM2 (49152 x 576) in decode steps, median 19.5 ms instead of 26.1 for 16 rows
        # and 43.3 instead of 51.2 for 64 (one 12.6 MB copy cost about 8 ms of those).
        out = hidden.new_empty(hidden.shape[0], weight.shape[0], dtype=torch.float32)
        for start in range(0, weight.shape[0], 1024):
            out[:, start:start + 1024] = (weight[start:start + 1024] @ hidden.T).T
        return out

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

