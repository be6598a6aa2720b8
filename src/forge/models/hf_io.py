"""HF checkpoint I/O: read and write `config.json` + safetensors (single file or sharded + index).

Loading builds the model on the meta device and then fills it tensor by tensor from the
safetensors files, so a model is never held twice in memory. Saving writes exactly what
`transformers.AutoModelForCausalLM.from_pretrained` expects.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from forge.models.args import ModelArgs
from forge.models.decoder import CausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Keys some checkpoints carry that are not parameters (old Llama exports saved rotary buffers).
_IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: missing/unexpected key or shape mismatch."""


def to_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _listing(d: Path) -> str:
    names = sorted(p.name for p in d.iterdir())
    return ", ".join(names[:30]) + (f", ... ({len(names)} entries)" if len(names) > 30 else "") or "(empty)"


def resolve_model_path(path: str | Path) -> Path:
    """A local directory, or `hf://org/name[@revision]` looked up in the local HF cache (offline).

    torchforge configs write `hf://${model}`: with a local `model` that is `hf:///models/x`,
    which is the local directory. A bare hub id (`Qwen/Qwen3-1.7B`) that is no local directory
    but is in the HF cache resolves from the cache, as torchforge would."""
    s = str(path)
    if s.startswith("hf://"):
        rest = s[len("hf://"):]
        local = Path(rest).expanduser()
        if local.is_dir():
            return local
        repo, _, rev = rest.partition("@")
        if rest.startswith(("/", "~", ".")):
            raise FileNotFoundError(f"model '{s}': '{local}' is not a directory (hf:// followed by a local path "
                                    f"means that directory)")
        cached = _from_hf_cache(repo, rev)
        if isinstance(cached, Path):
            return cached
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise FileNotFoundError(
            f"model '{s}' is not in the local Hugging Face cache (HF_HOME={home}) and forge never "
            f"downloads. Download it elsewhere (`huggingface-cli download {repo}`) and set HF_HOME, "
            f"or point the config at a local directory holding config.json + *.safetensors "
            f"(e.g. --model /data/{repo.split('/')[-1]}). ({cached})"
        )
    d = Path(s).expanduser()
    if not d.exists():
        if _HUB_ID.match(s):  # `Qwen/Qwen3-1.7B`: torchforge's `model:` value
            cached = _from_hf_cache(*s.partition("@")[::2])
            if isinstance(cached, Path):
                return cached
            raise FileNotFoundError(
                f"model '{s}' is neither a local directory nor in the local Hugging Face cache "
                f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); forge never downloads: "
                f"`huggingface-cli download {s}` elsewhere and set HF_HOME, or pass a local directory")
        parent = d.parent if d.parent.exists() else None
        hint = f"; {parent} holds: {_listing(parent)}" if parent else ""
        raise FileNotFoundError(f"model directory '{d}' does not exist{hint}")
    if not d.is_dir():
        raise NotADirectoryError(f"model path '{d}' is a file; pass the directory that holds config.json")
    return d


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def _from_hf_cache(repo: str, rev: str | None) -> Path | str:
    """The cached snapshot of `repo`, or why there is none (the exception's type name)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=rev or None, local_files_only=True))
    except Exception as e:  # not cached (LocalEntryNotFoundError) or a malformed repo id
        return type(e).__name__


def load_args(path: str | Path) -> ModelArgs:
    d = resolve_model_path(path)
    cfg_file = d / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"no config.json in '{d}'; found: {_listing(d)}")
    return ModelArgs.from_hf_config(json.loads(cfg_file.read_text()), source=str(cfg_file))


def _weight_files(d: Path) -> list[Path]:
    index = d / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}; found: {_listing(d)}")
        return files
    if (d / SINGLE_FILE).exists():
        return [d / SINGLE_FILE]
    shards = sorted(d.glob("*.safetensors"))
    if shards:
        return shards
    bins = [p.name for p in d.glob("pytorch_model*.bin")]
    hint = (f" It has PyTorch .bin weights ({bins[0]}...); convert them once with transformers: "
            f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)." if bins else "")
    raise FileNotFoundError(f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors in '{d}'; found: {_listing(d)}.{hint}")


def iter_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield `(key, tensor, file)` one tensor at a time from a model directory."""
    from safetensors import safe_open

    for f in _weight_files(resolve_model_path(path)):
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for k in sf.keys():
                    try:
                        t = sf.get_tensor(k)
                    except Exception as e:  # a truncated/corrupt file: say which one
                        raise CheckpointError(f"{f}: cannot read tensor '{k}': {type(e).__name__}: {e} "
                                              "(truncated or corrupt file?)") from e
                    _check_finite(k, t, f)
                    yield k, t, f
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' header errors name neither the file nor the cause
            raise CheckpointError(f"{f}: not a readable safetensors file: {type(e).__name__}: {e} "
                                  "(truncated or corrupt?)") from e


def _check_finite(key: str, t: torch.Tensor, f: Path) -> None:
    """NaN/inf weights never train (every reward is constant, every group filtered): refuse them
    at load, naming the tensor and its file."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise CheckpointError(f"{f}: tensor '{key}' {tuple(t.shape)} holds {n_nan} NaN and {n_inf} inf "
                              "values; refusing to load non-finite weights")


@torch.no_grad()
def load_state_dict_into(model: CausalLM, path: str | Path, strict: bool = True) -> None:
    """Copy a checkpoint's tensors into `model` in place (cast to each parameter's dtype/device)."""
    params = dict(model.state_dict(keep_vars=True))
    tied = model.args.tie_word_embeddings
    seen: set[str] = set()
    unexpected: list[str] = []
    for key, t, f in iter_checkpoint(path):
        if _IGNORED_KEYS.search(key):
            continue
        p = params.get(key)
        if p is None:
            unexpected.append(f"{key} (in {f.name})")
            continue
        if key == "lm_head.weight" and tied:
            continue  # tied: lm_head is embed_tokens; HF does the same (some exporters still write it)
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(
                f"shape mismatch for '{key}': checkpoint {f.name} has {tuple(t.shape)}, model expects "
                f"{tuple(p.shape)} (does config.json match the weights?)"
            )
        p.copy_(t.to(device=p.device, dtype=p.dtype))
        seen.add(key)
    if strict:
        expected = set(params) - ({"lm_head.weight"} if tied else set())
        missing = sorted(expected - seen)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)})")
            if unexpected:
                parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
                             f"({len(unexpected)})")
            raise CheckpointError(f"checkpoint '{path}' does not fit {model.args.family} model: " + "; ".join(parts))


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu") -> CausalLM:
    """Build a `CausalLM` from an HF model directory.

    dtype: None keeps the checkpoint's dtype (config `torch_dtype`/`dtype`, float32 if absent).
    """
    d = resolve_model_path(path)
    args = load_args(d)
    _weight_files(d)  # fail on missing weights before allocating anything
    dt = to_dtype(dtype) or to_dtype(args.torch_dtype if args.torch_dtype in _DTYPES else None) or torch.float32
    with torch.device("meta"):
        model = CausalLM(args).to(dt)
    model.to_empty(device=device)  # allocate, uninitialised; every tensor is overwritten below
    model.tie_weights()  # to_empty gives tied parameters separate storage
    reset_buffers(model)
    load_state_dict_into(model, d)
    return model


def reset_buffers(model: CausalLM) -> None:
    """Recompute non-persistent buffers (RoPE frequencies), which meta init leaves empty."""
    from forge.models.decoder import rope_inv_freq

    rot = model.model.rotary_emb
    rot.inv_freq = rope_inv_freq(model.args).to(rot.inv_freq.device)
    rot._cache = None


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)\s*", size, re.I)
    if not m:
        raise ValueError(f"max_shard_size '{size}' is not like 5GB / 500MB / 1000000")
    unit = m.group(2).upper().replace("I", "")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit])


def _full(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters are DTensors: gather the full tensor (collective, call on every rank)
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach()


def save_model(
    model: CausalLM,
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    tokenizer: Any | None = None,
) -> Path:
    """Write `model` as an HF model directory (config.json, generation_config.json, safetensors).

    Tied embeddings are written once (`model.embed_tokens.weight`, no `lm_head.weight`), as HF does.
    Stale `model*.safetensors` files from an earlier save in the same directory are removed.
    """
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    dt = to_dtype(dtype)
    args = model.args
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and args.tie_word_embeddings:
            continue
        t = _full(v)
        tensors[k] = t.to(device="cpu", dtype=dt or t.dtype).contiguous()
    saved_dtype = dt or next(iter(tensors.values())).dtype

    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n

    for old in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    cfg = args.to_hf_config()
    dtype_name = str(saved_dtype).removeprefix("torch.")
    cfg["torch_dtype"] = dtype_name
    cfg["dtype"] = dtype_name
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    gen = {k: v for k, v in (("bos_token_id", args.bos_token_id), ("eos_token_id", args.eos_token_id),
                              ("pad_token_id", args.pad_token_id)) if v is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
