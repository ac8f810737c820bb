"""BERT encoders (Devlin et al., 2019), as sentence-embedding models use them: token,
position and segment embeddings summed and normalised, then post-norm transformer blocks
with bidirectional attention over a padded batch. `BertForSequenceClassification` adds the
pooler (tanh of a projection of the [CLS] state) and a linear classifier: a cross-encoder.

Encoders keep no KV cache; the pooling runner (runtime/pooling.py) calls them on padded
batches with an attention mask."""

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
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class BertEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, h)
        self.position_embeddings = VocabParallelEmbedding(config.max_position_embeddings, h)
        self.token_type_embeddings = VocabParallelEmbedding(config.type_vocab_size, h)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads,
                                          self.num_heads, bias=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
                   for t in self.qkv_proj(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).flatten(2)


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn = self.attention.output.dense(self.attention.self(x, mask))
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

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, H] of a padded batch; padding positions are masked out."""
        mask = attention_mask[:, None, None, :].bool()
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    def pool_cls(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler.dense(hidden[:, 0]))


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

    def forward(self, input_ids, token_type_ids, attention_mask) -> torch.Tensor:
        return self.bert(input_ids, token_type_ids, attention_mask)

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_labels] from the hidden states of a batch."""
        return self.classifier(self.bert.pool_cls(hidden))
