"""A checkpoint's config.json read into plain attributes, with the defaults transformers'
config classes fill in for the architectures kiln builds.

kiln reads the JSON itself instead of calling `AutoConfig`: importing transformers' config
machinery costs seconds at every start, and kiln needs only the fields below. The defaults
mirror transformers' (tests compare the two on minimal configs)."""

import json
from pathlib import Path
from types import SimpleNamespace

from . import ARCHITECTURES, supported_architectures

_COMMON = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None,
    "head_dim": None, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    "sliding_window": None, "layer_types": None, "bos_token_id": None, "eos_token_id": None,
}
_QWEN = {"vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
         "max_position_embeddings": 32768, "use_sliding_window": False,
         "sliding_window": 4096, "max_window_layers": 28}
_DEFAULTS = {
    "llama": {"bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"intermediate_size": 14336, "num_key_value_heads": 8,
                "max_position_embeddings": 4096 * 32, "sliding_window": 4096,
                "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": _QWEN,
    "qwen3": {**_QWEN, "head_dim": 128},
    "bert": {"vocab_size": 30522, "hidden_size": 768, "intermediate_size": 3072,
             "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 512,
             "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
             "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None},
}


class ModelArchConfig(SimpleNamespace):
    """Attribute access like a transformers config; `to_dict()` for cache keys."""

    def to_dict(self) -> dict:
        return dict(vars(self))


def parse_config(raw: dict, where: str = "config.json") -> ModelArchConfig:
    """The architecture-relevant fields of a config.json, defaults applied and derived
    fields (head_dim, kv heads, per-layer attention types, rope parameters) filled in."""
    architectures = raw.get("architectures") or []
    known = [a for a in architectures if a in ARCHITECTURES]
    if not known:
        raise ValueError(
            f"architecture {architectures or raw.get('model_type')!r} in {where} is not "
            f"supported by kiln; supported: {', '.join(supported_architectures())}")
    model_type = raw.get("model_type")
    if model_type not in _DEFAULTS:
        raise ValueError(f"model_type {model_type!r} in {where} does not match architecture "
                         f"{known[0]}; expected one of {', '.join(sorted(_DEFAULTS))}")
    values = {**_COMMON, **_DEFAULTS[model_type]}
    values.update({k: v for k, v in raw.items() if k in values})
    values.update(architectures=[known[0]], model_type=model_type,
                  dtype=raw.get("dtype") or raw.get("torch_dtype"))
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings"):
        if not isinstance(values[name], int) or values[name] < 1:
            raise ValueError(f"invalid model config {where}: {name} must be a positive int, "
                             f"got {values[name]!r}")
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    if values["head_dim"] is None:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    if values["num_attention_heads"] % values["num_key_value_heads"]:
        raise ValueError(f"invalid model config {where}: num_attention_heads="
                         f"{values['num_attention_heads']} is not a multiple of "
                         f"num_key_value_heads={values['num_key_value_heads']}")
    if "use_sliding_window" in values:  # Qwen: a window only when switched on, upper layers
        if not values["use_sliding_window"]:
            values["sliding_window"] = None
        if values["layer_types"] is None:
            values["layer_types"] = [
                "sliding_attention" if values["sliding_window"] is not None
                and i >= values["max_window_layers"] else "full_attention"
                for i in range(values["num_hidden_layers"])]
    values["rope_parameters"] = _rope_parameters(raw)
    values["num_labels"] = len(raw.get("id2label") or {}) or raw.get("num_labels", 2)
    return ModelArchConfig(**values)


def _rope_parameters(raw: dict) -> dict:
    """transformers 5 keeps these in `rope_parameters`; older files have `rope_theta` and
    `rope_scaling` (whose kind may be under "type")."""
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if "type" in rope:
        rope.setdefault("rope_type", rope.pop("type"))
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    return rope


def read_config(folder: str | Path) -> ModelArchConfig:
    """The checkpoint's config, after checking that kiln can build it."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise OSError(f"no config.json in model folder {folder}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return parse_config(raw, str(path))
