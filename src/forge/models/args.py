"""`ModelArgs`: the decoder's hyper-parameters, read from (and written to) HF `config.json`."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# HF `architectures[0]` / `model_type` -> our family name
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
HF_ARCH_OF = {v: k for k, v in ARCHITECTURES.items()}


# What transformers' LlamaConfig / Qwen2Config / Qwen3Config assume for a key config.json leaves
# out. HF reads a missing `tie_word_embeddings` as untied for all three (PretrainedConfig's own
# default, True, is overridden), so reading it as tied would silently drop `lm_head.weight`.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": False, "rope_theta": 10000.0, "rms_norm_eps": 1e-6},
    "qwen2": {"tie_word_embeddings": False, "rope_theta": 10000.0, "rms_norm_eps": 1e-6},
    "qwen3": {"tie_word_embeddings": False, "rope_theta": 10000.0, "rms_norm_eps": 1e-6},
}
REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_defaults_reported: set[tuple[str, str]] = set()  # (config file, key): say each default once


class UnknownArchitectureError(ValueError):
    pass


@dataclass
class ModelArgs:
    family: str = "qwen2"  # llama | qwen2 | qwen3
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # q/k/v bias (Qwen2 has it, o_proj never)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)  # other HF keys, written back on save

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.family not in HF_ARCH_OF:
            raise UnknownArchitectureError(
                f"unknown model family '{self.family}'; forge supports {sorted(HF_ARCH_OF)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def num_params(self, include_embedding: bool = True) -> int:
        h, i, L, v = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        d, nq, nkv = self.head_dim, self.num_attention_heads, self.num_key_value_heads
        attn = h * d * nq * 2 + h * d * nkv * 2
        per_layer = attn + 3 * h * i + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + h + (emb if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (fwd+bwd = 6N plus attention), the usual MFU convention."""
        n = self.num_params(include_embedding=False) + self.vocab_size * self.hidden_size
        attn = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len / 2
        return 6 * n + attn

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelArgs:
        archs = cfg.get("architectures") or []
        family = None
        for a in archs:
            family = family or ARCHITECTURES.get(a)
        family = family or MODEL_TYPES.get(cfg.get("model_type", ""))
        if family is None:
            raise UnknownArchitectureError(
                f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; forge's decoder "
                f"covers {sorted(ARCHITECTURES)} (model_type llama/qwen2/qwen3)"
            )
        known = {
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "rope_scaling", "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id",
            "eos_token_id", "pad_token_id", "torch_dtype",
        }
        kw = {k: cfg[k] for k in known if k in cfg and cfg[k] is not None}
        # the shapes have no default worth taking: ModelArgs' toy ones only turn a missing key into
        # a baffling weight-shape mismatch later
        missing = [k for k in REQUIRED_HF_KEYS if k not in kw]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing} (the model's shapes; "
                             f"a {family} config.json from transformers always has them)")
        if "rope_theta" not in kw and isinstance(cfg.get("rope_parameters"), dict):
            # transformers >= 5 writes rope settings under rope_parameters
            rp = dict(cfg["rope_parameters"])
            if "rope_theta" in rp:
                kw["rope_theta"] = rp.pop("rope_theta")
            if rp.get("rope_type", "default") != "default":
                kw["rope_scaling"] = rp
        for key, value in HF_DEFAULTS[family].items():
            if key not in kw:
                kw[key] = value
                if (source, key) not in _defaults_reported:
                    _defaults_reported.add((source, key))
                    log.warning("%s: no '%s'; using transformers' %s default %r", source, key, family, value)
        kw.setdefault("num_key_value_heads", kw.get("num_attention_heads", 4))
        if family == "qwen2":
            kw.setdefault("attention_bias", True)  # Qwen2's q/k/v always carry a bias
        if family == "qwen3":
            kw["qk_norm"] = True
        if "torch_dtype" not in kw and isinstance(cfg.get("dtype"), str):
            kw["torch_dtype"] = cfg["dtype"]
        extra = {k: v for k, v in cfg.items() if k not in known and k not in ("architectures", "model_type")}
        return cls(family=family, extra=extra, **kw)

    def to_hf_config(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        family = d.pop("family")
        d.pop("qk_norm")
        if family == "qwen2":
            d.pop("attention_bias")  # Qwen2 config has no such key; bias is implied
            d.pop("mlp_bias")
        out = {**{k: v for k, v in extra.items() if k not in ("rope_parameters", "dtype")}, **d}
        out["architectures"] = [HF_ARCH_OF[family]]
        out["model_type"] = family
        return {k: v for k, v in out.items() if v is not None}
