"""HF checkpoint I/O: forge <-> transformers in both directions, sharded, dtypes, and error messages."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from forge.models import (
    CheckpointError,
    UnknownArchitectureError,
    build_tiny_model,
    load_args,
    load_model,
    load_tokenizer,
    save_model,
    write_tiny_checkpoint,
)
from forge.models.hf_io import resolve_model_path


def _tokens(seed: int, t: int = 40) -> torch.Tensor:
    return torch.randint(0, 512, (2, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_save_then_transformers_loads_same_logits(tmp_path, family, tied):
    model = build_tiny_model(family, seed=1, tie_word_embeddings=tied).eval()
    save_model(model, tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert ("lm_head.weight" in keys) == (not tied)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    x = _tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_load_transformers_saved_sharded(tmp_path, family):
    src = build_tiny_model(family, seed=5).eval()
    hf_dir = tmp_path / "hf"
    save_model(src, tmp_path / "ours")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    hf.save_pretrained(hf_dir, max_shard_size="100KB")  # transformers' own layout, several shards
    assert (hf_dir / "model.safetensors.index.json").exists()
    assert len(list(hf_dir.glob("*.safetensors"))) > 1
    model = load_model(hf_dir)
    assert model.args.family == family
    x = _tokens(3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=5e-5, rtol=1e-4)


def test_sharded_save_roundtrip_bf16(tmp_path):
    model = build_tiny_model("qwen3", seed=2)
    save_model(model, tmp_path, dtype=torch.bfloat16, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = load_model(tmp_path)  # dtype None -> checkpoint's dtype
    assert next(loaded.parameters()).dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v.to(torch.bfloat16))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tie survives meta-device init
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = _tokens(4)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path, dtype="float32")(x), hf(x).logits, atol=5e-5, rtol=1e-4)
    # saving again into the same dir unsharded leaves no stale shards behind
    save_model(model, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_tied_checkpoint_with_lm_head_is_accepted(tmp_path):
    model = build_tiny_model("qwen2", seed=3)
    save_model(model, tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(tmp_path / "model.safetensors"))
    loaded = load_model(tmp_path)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_write_tiny_checkpoint_is_a_real_hf_dir(tmp_path):
    d = write_tiny_checkpoint(tmp_path / "tiny", "qwen3", seed=0)
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    tok = load_tokenizer(d)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert load_args(d).vocab_size == len(tok)
    AutoModelForCausalLM.from_pretrained(d)


# ---- errors ---------------------------------------------------------------------------------

def test_error_missing_directory(tmp_path):
    (tmp_path / "other_model").mkdir()
    with pytest.raises(FileNotFoundError, match=r"does not exist.*other_model"):
        load_model(tmp_path / "nope")


def test_error_missing_weights_lists_contents(tmp_path):
    write_tiny_checkpoint(tmp_path, "qwen2")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors.*config\.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json.*tokenizer\.json"):
        load_args(tmp_path)


def test_error_missing_shard(tmp_path):
    save_model(build_tiny_model("qwen2"), tmp_path, max_shard_size="50KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(tmp_path)


def test_error_unknown_architecture(tmp_path):
    write_tiny_checkpoint(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnknownArchitectureError, match=r"config\.json: unsupported architecture .*MixtralForCausalLM.*Qwen3ForCausalLM"):
        load_model(tmp_path)


def test_error_shape_mismatch_names_key_and_shapes(tmp_path):
    write_tiny_checkpoint(tmp_path, "qwen2")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight.*\(176, 64\).*\(100, 64\)|"
                                              r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight.*\(64, 176\).*\(64, 100\)"):
        load_model(tmp_path)


def test_error_missing_and_unexpected_keys(tmp_path):
    write_tiny_checkpoint(tmp_path, "llama")
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # tolerated: old exports carry it
    save_file(sd, str(tmp_path / "model.safetensors"))
    load_model(tmp_path)
    del sd["lm_head.weight"]  # untied llama: lm_head is required
    sd["model.extra.weight"] = torch.ones(3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \['lm_head\.weight'\].*unexpected keys \['model\.extra\.weight"):
        load_model(tmp_path)


def test_hf_uri_resolves_from_local_cache_or_explains(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    with pytest.raises(FileNotFoundError, match=r"hf://Qwen/Qwen3-1.7B.*not in the local Hugging Face cache.*local directory"):
        resolve_model_path("hf://Qwen/Qwen3-1.7B")
    # a cache entry laid out the way huggingface_hub writes it resolves offline
    snap = tmp_path / "hf_home" / "hub" / "models--org--tiny" / "snapshots" / ("a" * 40)
    write_tiny_checkpoint(snap, "qwen2")
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    assert resolve_model_path("hf://org/tiny") == snap
    assert load_model("hf://org/tiny").args.family == "qwen2"


def test_error_truncated_safetensors_names_the_file(tmp_path):
    write_tiny_checkpoint(tmp_path, "qwen2")
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    cut = int(torch.randint(len(data) // 4, len(data) - 16, (1,)))
    f.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        load_model(tmp_path)


def test_error_non_finite_weights_name_tensor_and_file(tmp_path):
    write_tiny_checkpoint(tmp_path, "llama")
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    key = sorted(k for k in sd if k.endswith("mlp.up_proj.weight"))[0]
    t = sd[key].clone()
    idx = torch.randint(0, t.numel(), (3,))
    t.view(-1)[idx[0]] = float("nan")
    t.view(-1)[idx[1]] = float("inf")
    sd[key] = t
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{key}'.*NaN.*inf"):
        load_model(tmp_path)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_missing_config_keys_take_transformers_defaults(tmp_path, family, caplog):
    """config.json without tie_word_embeddings is untied in transformers (Llama/Qwen2/Qwen3): read
    as tied, lm_head.weight was silently dropped. rope_theta/rms_norm_eps take HF's defaults, said once."""
    write_tiny_checkpoint(tmp_path, family, tie_word_embeddings=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for k in ("tie_word_embeddings", "rope_theta", "rms_norm_eps"):
        cfg.pop(k, None)
    cfg.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level("WARNING", logger="forge.models.args"):
        model = load_model(tmp_path)
        load_args(tmp_path)  # a second read says nothing new
    args = model.args
    assert (args.tie_word_embeddings, args.rope_theta, args.rms_norm_eps) == (False, 10000.0, 1e-6)
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(model.lm_head.weight.detach(), sd["lm_head.weight"].to(model.lm_head.weight.dtype))
    said = [r.getMessage() for r in caplog.records]
    assert sum("tie_word_embeddings" in m for m in said) == 1 and any("rope_theta" in m for m in said)
    assert sum("rms_norm_eps" in m for m in said) == 1
