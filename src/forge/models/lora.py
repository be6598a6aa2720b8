"""LoRA: low-rank adapters on the decoder's linear layers, applied from outside the decoder.

    cfg = LoraConfig(r=32, alpha=64, target_modules="all-linear")
    apply_lora(model, cfg)                 # base frozen, adapters fp32 and trainable
    with adapters_disabled(model): ...     # the base model (the reference policy), no second copy
    save_peft_adapter(model, cfg, dir)     # adapter_model.safetensors + adapter_config.json (HF peft)
    load_peft_adapter(model, dir)          # continue training a peft adapter
    merged_state_dict(model)               # W + scale * B @ A under HF names (export, engines)

A targeted `nn.Linear` keeps its identity and parameter names (`...q_proj.weight` stays an HF
name, so base loading, FSDP2, weight sync and HF export see the same keys) and gains two child
linears `lora_A` [r, in] and `lora_B` [out, r]: its state-dict keys are peft's minus the
`base_model.model.` prefix and the adapter name, so the peft format is a rename.
The output is `base(x) + scale * lora_B(lora_A(dropout(x)))`, peft's formula; `scale` is
alpha / r (alpha / sqrt(r) with rslora).

Weight sync ships only the adapters (`AdapterView`): `lora_A` and `lora_B` already multiplied by
the scale, so a receiver merges `W = W_base + B @ A` with no config of its own (`AdapterMerger`
keeps the base to merge each version from, so merging twice never accumulates).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from forge.models.decoder import CausalLM

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoraConfig:
    """LoRA adapters on the trained model (peft's LoraConfig names in brackets)."""

    r: int = 16  # adapter rank [r]
    alpha: float = 32.0  # scale = alpha / r (alpha / sqrt(r) with rslora) [lora_alpha]
    dropout: float = 0.0  # dropout on the adapter's input while training [lora_dropout]
    # all-linear, or a list of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj (or full module names)
    target_modules: Any = "all-linear"
    rslora: bool = False  # scale alpha / sqrt(r) (rank-stabilised LoRA) [use_rslora]
    base_dtype: str | None = None  # keep the frozen base weights in this dtype (e.g. bfloat16); adapters stay fp32
    init_from: str | None = None  # a peft adapter directory to continue training from (its r/alpha/targets must match)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora.r must be an integer >= 1, got {self.r!r}")
        if not self.alpha or self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.base_dtype is not None and self.base_dtype not in _DTYPES:
            raise ValueError(f"lora.base_dtype must be one of {sorted(_DTYPES)} or null, got {self.base_dtype!r}")
        self.targets()

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def targets(self) -> list[str]:
        """Target names (short `q_proj` or full `model.layers.0.self_attn.q_proj`), as peft matches them."""
        t = self.target_modules
        if isinstance(t, str):
            if t == "all-linear":
                return list(LINEAR_NAMES)
            t = [s.strip() for s in t.split(",") if s.strip()]
        if not isinstance(t, (list, tuple)) or not t or not all(isinstance(x, str) for x in t):
            raise ValueError(f"lora.target_modules must be 'all-linear' or a non-empty list of module names, got {t!r}")
        for name in t:
            if name.split(".")[-1] not in LINEAR_NAMES:
                raise ValueError(f"lora.target_modules: '{name}' is not one of the decoder's linear layers "
                                 f"{list(LINEAR_NAMES)} (or 'all-linear'); lm_head and embeddings are not adapted")
        return list(t)

    def matches(self, module_name: str) -> bool:
        return any(module_name == t or module_name.endswith("." + t) for t in self.targets())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | LoraConfig, where: str = "lora") -> LoraConfig:
        if isinstance(d, LoraConfig):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"{where} must be a mapping like {{r: 32, alpha: 64, target_modules: all-linear}}, got {d!r}")
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(names)}")
        return cls(**dict(d))


class LoraLinear(nn.Linear):
    """An `nn.Linear` with an adapter (made by `LoraLinear.wrap`: same object, same `weight`/`bias`)."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_dropout: nn.Module
    scale: float
    lora_enabled: bool

    @classmethod
    def wrap(cls, linear: nn.Linear, r: int, scale: float, dropout: float) -> LoraLinear:
        dev = linear.weight.device
        linear.__class__ = cls  # keep the object: its parameters and hooks stay where they are
        linear.lora_A = nn.Linear(linear.in_features, r, bias=False, device=dev, dtype=torch.float32)
        linear.lora_B = nn.Linear(r, linear.out_features, bias=False, device=dev, dtype=torch.float32)
        linear.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        linear.scale = float(scale)
        linear.lora_enabled = True
        linear.reset_lora()
        return linear

    @torch.no_grad()
    def reset_lora(self) -> None:
        """peft's default init: A Kaiming-uniform, B zero (the adapted model starts as the base)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype == w.dtype or autocast:
            out = F.linear(x, w, self.bias)
        else:  # base kept in bf16 while activations are fp32 (lora.base_dtype on CPU / without autocast)
            out = F.linear(x.to(w.dtype), w, self.bias).to(x.dtype)
        if not self.lora_enabled:
            return out
        a = self.lora_A.weight
        h = self.lora_dropout(x)
        if h.dtype != a.dtype and not autocast:
            h = h.to(a.dtype)
        return out + (self.lora_B(self.lora_A(h)) * self.scale).to(out.dtype)

    def delta(self) -> torch.Tensor:
        """scale * B @ A in fp32 (full tensors: collective under FSDP2)."""
        a, b = _full(self.lora_A.weight).float(), _full(self.lora_B.weight).float()
        return (b @ a) * self.scale


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _causal_lm(model: nn.Module) -> CausalLM:
    """The CausalLM inside a LogprobModel / engine-like wrapper."""
    if isinstance(model, CausalLM):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, CausalLM):
        return inner
    raise TypeError(f"expected a forge CausalLM (or a wrapper holding one as .model), got {type(model).__name__}")


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """name -> adapted linear (HF module names, e.g. `model.layers.0.self_attn.q_proj`)."""
    return {n: m for n, m in _causal_lm(model).named_modules() if isinstance(m, LoraLinear)}


def is_lora(model: nn.Module) -> bool:
    return bool(lora_modules(model))


def apply_lora(model: nn.Module, cfg: LoraConfig) -> dict[str, LoraLinear]:
    """Add adapters to every targeted linear of `model` and freeze everything else.

    Call before torch.compile and FSDP2 (as `TrainEngine` does). Adapters are fp32; with
    `cfg.base_dtype` the frozen base weights are cast to it. Returns name -> adapted module."""
    lm = _causal_lm(model)
    if is_lora(lm):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    targets = [(n, m) for n, m in lm.named_modules()
               if type(m) is nn.Linear and n.split(".")[-1] in LINEAR_NAMES and cfg.matches(n)]
    if not targets:
        raise ValueError(f"lora.target_modules {cfg.target_modules!r} matches no linear layer of the model")
    for p in lm.parameters():
        p.requires_grad_(False)
    if cfg.base_dtype is not None:
        lm.to(_DTYPES[cfg.base_dtype])
    out = {n: LoraLinear.wrap(m, cfg.r, cfg.scale, cfg.dropout) for n, m in targets}
    lm.lora_config = cfg  # what save_peft_adapter / the trainer read back
    return out


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model (adapters off) inside the block: the reference policy without a second copy."""
    mods = list(lora_modules(model).values())
    before = [m.lora_enabled for m in mods]
    for m in mods:
        m.lora_enabled = False
    try:
        yield
    finally:
        for m, b in zip(mods, before):
            m.lora_enabled = b


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """forge keys (`model.layers.0.self_attn.q_proj.lora_A.weight`) -> full fp32 adapter tensors (CPU)."""
    out = {}
    for n, m in lora_modules(model).items():
        out[f"{n}.lora_A.weight"] = _full(m.lora_A.weight).float().cpu().contiguous()
        out[f"{n}.lora_B.weight"] = _full(m.lora_B.weight).float().cpu().contiguous()
    return out


# ---------------------------------------------------------------------------------------- peft format
def peft_config_dict(cfg: LoraConfig, model: nn.Module, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """`adapter_config.json` with the keys peft 0.21 writes (inference_mode true, as its save does)."""
    targets = sorted(set(cfg.targets()))
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
        "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path, "bias": "none",
        "corda_config": None, "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "kasa_config": None,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": cfg.alpha, "lora_bias": False, "lora_dropout": cfg.dropout, "lora_ga_config": None,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "monteclora_config": None, "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16,
        "r": cfg.r, "rank_pattern": {}, "revision": None, "target_modules": targets, "target_parameters": None,
        "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
        "use_qalora": False, "use_rslora": cfg.rslora, "velora_config": None,
    }


def save_peft_adapter(model: nn.Module, path: str | Path, cfg: LoraConfig | None = None,
                      base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` as `PeftModel.save_pretrained` does
    (collective under FSDP2: every rank calls it; files are written once, by rank 0)."""
    from safetensors.torch import save_file

    cfg = cfg or getattr(_causal_lm(model), "lora_config", None)
    if cfg is None:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters (apply_lora first)")
    tensors = {PEFT_PREFIX + k: v for k, v in adapter_state_dict(model).items()}
    if _rank() == 0:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / ADAPTER_FILE), metadata={"format": "pt"})
        conf = peft_config_dict(cfg, model, base_model_name_or_path)
        (out / ADAPTER_CONFIG).write_text(json.dumps(conf, indent=2, sort_keys=True))
    return Path(path)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


_UNSUPPORTED_PEFT = {"use_dora": False, "bias": "none", "modules_to_save": None, "layers_to_transform": None,
                     "fan_in_fan_out": False, "lora_bias": False, "layer_replication": None,
                     "target_parameters": None, "trainable_token_indices": None}


def read_peft_config(path: str | Path) -> LoraConfig:
    """The LoraConfig of a peft adapter directory; peft features forge does not implement are refused."""
    f = Path(path) / ADAPTER_CONFIG
    if not f.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in '{path}' (a peft adapter directory holds it and {ADAPTER_FILE})")
    conf = json.loads(f.read_text())
    if conf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{f}: peft_type {conf.get('peft_type')!r}; forge loads LORA adapters only")
    for key, ok in _UNSUPPORTED_PEFT.items():
        v = conf.get(key, ok)
        if v not in (ok, None, [], {}, False) or (ok is False and v):
            raise ValueError(f"{f}: {key}={v!r} is not supported by forge's LoRA (expected {ok!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if conf.get(key):
            raise ValueError(f"{f}: per-module {key} {conf[key]!r} is not supported (one r and alpha for all)")
    targets = conf.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise ValueError(f"{f}: target_modules regex {targets!r} is not supported; give a list of module names")
    return LoraConfig(r=int(conf["r"]), alpha=float(conf["lora_alpha"]), dropout=float(conf.get("lora_dropout") or 0.0),
                      target_modules=targets, rslora=bool(conf.get("use_rslora", False)))


@torch.no_grad()
def load_adapter_weights(model: nn.Module, path: str | Path) -> int:
    """Copy a peft adapter's tensors into the model's adapters (every adapter exactly once)."""
    from safetensors.torch import load_file

    f = Path(path) / ADAPTER_FILE
    if not f.is_file():
        raise FileNotFoundError(f"no {ADAPTER_FILE} in '{path}'")
    mods = lora_modules(model)
    params = {f"{n}.{ab}.weight": getattr(m, ab).weight for n, m in mods.items() for ab in ("lora_A", "lora_B")}
    seen = set()
    for key, t in load_file(str(f)).items():
        k = key.removeprefix(PEFT_PREFIX).replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        p = params.get(k)
        if p is None:
            raise ValueError(f"{f}: tensor '{key}' fits no adapter of the model (adapted: {len(mods)} modules)")
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{f}: '{key}' has shape {tuple(t.shape)}, the model's adapter {tuple(p.shape)}")
        if hasattr(p, "distribute_tensor") or hasattr(p, "full_tensor"):
            from torch.distributed.tensor import distribute_tensor

            p.copy_(distribute_tensor(t.to(p.dtype), p.device_mesh, p.placements))
        else:
            p.copy_(t.to(device=p.device, dtype=p.dtype))
        seen.add(k)
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"{f}: no tensor for {missing[:4]}{' ...' if len(missing) > 4 else ''} ({len(missing)})")
    return len(seen)


def load_peft_adapter(model: nn.Module, path: str | Path, cfg: LoraConfig | None = None) -> LoraConfig:
    """Apply the adapter config of a peft directory to `model` (if it has none yet) and load its weights."""
    peft_cfg = read_peft_config(path)
    if not is_lora(model):
        cfg = cfg or peft_cfg
        apply_lora(model, cfg)
    have = _causal_lm(model).lora_config
    if (have.r, float(have.alpha), have.rslora) != (peft_cfg.r, float(peft_cfg.alpha), peft_cfg.rslora):
        raise ValueError(f"peft adapter '{path}' has r={peft_cfg.r} alpha={peft_cfg.alpha} rslora={peft_cfg.rslora}; "
                         f"the configured lora has r={have.r} alpha={have.alpha} rslora={have.rslora}")
    load_adapter_weights(model, path)
    return have


# ---------------------------------------------------------------------------------------- merging
def merged_items(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) of the base model with every adapter merged in (`W + scale B@A`,
    computed in fp32, cast to the base dtype); adapter keys left out. Collective under FSDP2."""
    lm = _causal_lm(model)
    mods = lora_modules(lm)
    for name, t in lm.state_dict().items():
        if name.endswith(_SUFFIXES):
            continue
        full = _full(t)
        owner = name.removesuffix(".weight")
        if name.endswith(".weight") and owner in mods:
            m = mods[owner]
            full = (full.float() + m.delta().to(full.device)).to(full.dtype)
        yield name, full


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return {n: t.to("cpu", dtype=dtype or t.dtype).clone() for n, t in merged_items(model)}


def merged_model(model: nn.Module) -> CausalLM:
    """A plain CausalLM (no adapters) holding the merged weights, on the model's device (one process)."""
    lm = _causal_lm(model)
    dev = next(lm.parameters()).device
    with torch.device("meta"):
        out = CausalLM(lm.args)
    out.to_empty(device=dev)
    out.tie_weights()
    from forge.models.hf_io import reset_buffers

    reset_buffers(out)
    out.load_state_dict(merged_state_dict(lm), strict=False)  # tied lm_head is the embeddings
    return out


def save_merged_hf(model: nn.Module, path: str | Path, dtype: Any = None) -> Path | None:
    """An HF model directory of the merged model (collective under FSDP2; rank 0 writes)."""
    from forge.models.hf_io import save_model, to_dtype

    lm = _causal_lm(model)
    with torch.device("meta"):
        host = CausalLM(lm.args)
    host.to_empty(device="cpu")
    host.tie_weights()
    sd = host.state_dict()
    for name, t in merged_items(lm):
        if _rank() == 0:
            sd[name].copy_(t.detach().cpu())
    out = save_model(host, path, dtype=to_dtype(dtype)) if _rank() == 0 else None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out


# ---------------------------------------------------------------------------------------- weight sync
class AdapterView(nn.Module):
    """What a weight publisher sees when LoRA is on: only the adapters, `lora_B` pre-multiplied by
    the scale (`name -> tensor` through `named_parameters`, the one method the transports read).
    Under FSDP2 the tensors are DTensors and the transports gather them as usual."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._mods = lora_modules(model)  # plain dict: not registered, so not a submodule
        if not self._mods:
            raise ValueError("AdapterView: the model has no LoRA adapters")

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:  # type: ignore[override]
        for n, m in self._mods.items():
            yield f"{n}.lora_A.weight", m.lora_A.weight.detach()
            yield f"{n}.lora_B.weight", m.lora_B.weight.detach() * m.scale

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.named_parameters())


def is_adapter_update(names: Any) -> bool:
    """Whether published names are adapters (every name ends in `.lora_A.weight` / `.lora_B.weight`)."""
    names = list(names)
    return bool(names) and all(n.endswith(_SUFFIXES) for n in names)


class AdapterMerger:
    """The receiving side: `W = W_base + B @ A` per adapted weight (B carries the scale, see
    `AdapterView`), merged in fp32 into the engine's weights in place. The base of each adapted
    weight is kept (a copy of those weights only) so each version merges from the base."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.base: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def apply(self, adapters: Mapping[str, torch.Tensor]) -> int:
        params = dict(self.model.named_parameters())
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for k, t in adapters.items():
            for s in _SUFFIXES:
                if k.endswith(s):
                    pairs.setdefault(k[: -len(s)], {})[s] = t
                    break
            else:
                raise KeyError(f"adapter update: '{k}' is not a lora_A/lora_B weight")
        for owner, ab in pairs.items():
            if len(ab) != 2:
                raise KeyError(f"adapter update: '{owner}' has only {sorted(ab)}; lora_A and lora_B travel together")
            w = params.get(owner + ".weight")
            if w is None:
                raise KeyError(f"adapter update: no weight '{owner}.weight' in the receiving model")
            base = self.base.get(owner)
            if base is None:
                base = self.base[owner] = w.detach().clone()
            a, b = ab[".lora_A.weight"].to(w.device, torch.float32), ab[".lora_B.weight"].to(w.device, torch.float32)
            if (b.shape[0], a.shape[1]) != tuple(w.shape) or b.shape[1] != a.shape[0]:
                raise ValueError(f"adapter update: '{owner}' B {tuple(b.shape)} @ A {tuple(a.shape)} does not fit "
                                 f"the weight {tuple(w.shape)}")
            w.copy_(torch.addmm(base.float(), b, a).to(w.dtype))
        for owner in set(self.base) - set(pairs):  # adapted before, not now: back to the base
            params[owner + ".weight"].copy_(self.base[owner])
        return len(adapters)

    def forget_base(self) -> None:
        """Full weights were loaded: they are the new base."""
        self.base.clear()


__all__ = ["ADAPTER_CONFIG", "ADAPTER_FILE", "AdapterMerger", "AdapterView", "LINEAR_NAMES", "LoraConfig", "LoraLinear",
           "adapter_parameters", "adapter_state_dict", "adapters_disabled", "apply_lora", "is_adapter_update", "is_lora",
           "load_adapter_weights", "load_peft_adapter", "lora_modules", "merged_items", "merged_model", "merged_state_dict",
           "read_peft_config", "save_merged_hf", "save_peft_adapter"]

