"""BERT encoders (Devlin et al., 2019), as sentence-embedding models use them: token,
position and segment embeddings summed and normalised, then post-norm transformer blocks
with bidirectional attention within each sequence. `BertForSequenceClassification` adds the
pooler (tanh of a projection of the [CLS] state) and a linear classifier: a cross-encoder.

A batch is flat, as in the decoders: T tokens of several sequences, placed by the attention
metadata. Encoders keep no KV cache; attention is the custom op `kiln::encoder_attention`,
where the compiler splits each layer as it does a decoder's."""

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    _new_param,
)


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = _new_param(size), _new_param(size), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written out rather than F.layer_norm: Dynamo passes `eps` as a symbolic float,
        # which F.layer_norm cannot take.
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, h)
        self.position_embeddings = VocabParallelEmbedding(config.max_position_embeddings, h)
        self.token_type_embeddings = VocabParallelEmbedding(config.type_vocab_size, h)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids, positions, token_type_ids):
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads,
                                          self.num_heads, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim))
                   for t in self.qkv_proj(x).chunk(3, dim=-1))
        return torch.ops.kiln.encoder_attention(q, k, v, self.scale).flatten(1)


class BertLayer(nn.Module):
    """Post-norm: x = LN(x + Attention(x)); x = LN(x + FFN(x))."""

    def __init__(self, config):
        super().__init__()
        h, eps = config.hidden_size, config.layer_norm_eps
        self.attention = nn.Module()
        self.attention.self = BertSelfAttention(config)
        self.attention.output = nn.Module()
        self.attention.output.dense = RowParallelLinear(h, h, bias=True)
        self.attention.output.LayerNorm = LayerNorm(h, eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = ColumnParallelLinear(h, config.intermediate_size, bias=True)
        self.output = nn.Module()
        self.output.dense = RowParallelLinear(config.intermediate_size, h, bias=True)
        self.output.LayerNorm = LayerNorm(h, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attention.output.dense(self.attention.self(x))
        x = self.attention.output.LayerNorm(x + attn)
        ffn = self.output.dense(F.gelu(self.intermediate.dense(x)))
        return self.output.LayerNorm(x + ffn)


class BertModel(nn.Module):
    packed_modules = {"query": ("qkv_proj", "q"), "key": ("qkv_proj", "k"),
                      "value": ("qkv_proj", "v")}
    skipped_tensors = ("position_ids",)  # a buffer some checkpoints saved
    is_pooling_model = True

    def __init__(self, config):
        super().__init__()
        if config.hidden_act != "gelu":
            raise ValueError(f"kiln's BERT implements hidden_act='gelu', the checkpoint asks "
                             f"for {config.hidden_act!r}")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(config)
                                           for _ in range(config.num_hidden_layers))
        self.pooler = nn.Module()
        self.pooler.dense = ColumnParallelLinear(config.hidden_size, config.hidden_size,
                                                 bias=True)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, call_layer=None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, H] of a flat batch; attention metadata comes from
        attention_context. `call_layer(layer, hidden)`, when given, runs each layer (the
        compiler passes its compiled layer call here)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, positions, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x) if call_layer is None else call_layer(layer, x)
        return x

    def pool_cls(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler.dense(cls_hidden))


class BertForSequenceClassification(nn.Module):
    """A cross-encoder: both texts in one sequence, the classifier reads the pooled [CLS]."""

    packed_modules = BertModel.packed_modules
    skipped_tensors = BertModel.skipped_tensors
    is_pooling_model = True

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.classifier = ColumnParallelLinear(config.hidden_size, config.num_labels, bias=True)

    def forward(self, input_ids, positions, call_layer=None, token_type_ids=None):
        return self.bert(input_ids, positions, call_layer, token_type_ids)

    def classify(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_labels] from the [CLS] states [B, H] of a batch."""
        return self.classifier(self.bert.pool_cls(cls_hidden))
