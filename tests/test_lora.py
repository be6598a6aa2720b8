"""forge's LoRA against HF peft on the tiny HF checkpoints: same adapters -> same logits and
adapter gradients; the peft file format both ways; merging; disabling adapters."""

from __future__ import annotations

import json

import pytest
import torch

from forge.models import build_tiny_model, enable_activation_checkpointing, maybe_compile
from forge.models.lora import (
    AdapterMerger,
    AdapterView,
    LoraConfig,
    adapter_parameters,
    adapters_disabled,
    apply_lora,
    load_peft_adapter,
    merged_state_dict,
    save_merged_hf,
    save_peft_adapter,
)

peft = pytest.importorskip("peft")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402


def hf_twin(model):
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**model.args.to_hf_config()),
                                          attn_implementation="eager", dtype=torch.float32)
    hf.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=True)
    return hf


def randomise_adapters(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def peft_twin(model, cfg: LoraConfig):
    hf = hf_twin(model)
    pc = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=cfg.targets(), lora_dropout=0.0,
                         use_rslora=cfg.rslora, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, pc)
    sd = {("base_model.model." + k).replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
          for k, v in model.state_dict().items() if "lora_" in k}
    missing = pm.load_state_dict(sd, strict=False)
    assert not missing.unexpected_keys
    return pm


CASES = [("qwen2", "all-linear", False), ("llama", ["q_proj", "v_proj", "down_proj"], True),
         ("qwen3", ["k_proj", "o_proj", "gate_proj", "up_proj"], False)]


@pytest.mark.parametrize("family,targets,rslora", CASES)
def test_forward_backward_match_peft(family, targets, rslora):
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, alpha=8, target_modules=targets, rslora=rslora)
    model = build_tiny_model(family, seed=1)
    apply_lora(model, cfg)
    randomise_adapters(model, 2)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    pm = peft_twin(model, cfg)
    tokens = torch.randint(0, model.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    ours, ref = model(tokens), pm(input_ids=tokens).logits
    assert ref.std() > 0.1
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(ours.shape, generator=torch.Generator().manual_seed(4))
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    peft_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                  for n, p in pm.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(peft_grads) and len(ours_grads) > 0
    for n, g in ours_grads.items():
        err = (g - peft_grads[n]).abs().max() / peft_grads[n].abs().max()
        assert err < 1e-5, (n, float(err))
    # disabled adapters = the base model, which peft's disable_adapter context agrees with
    with torch.no_grad(), adapters_disabled(model), pm.disable_adapter():
        base = model(tokens)
        torch.testing.assert_close(base, pm(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)
    assert (base - ref).abs().max() > 1e-2  # the adapters do change the logits
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref.detach(), atol=1e-5, rtol=1e-5)  # back on


def test_checkpointing_compile_packing_keep_lora():
    cfg = LoraConfig(r=4, alpha=16, target_modules="all-linear")
    ref = build_tiny_model("qwen2", seed=5)
    apply_lora(ref, cfg)
    randomise_adapters(ref, 6)
    other = build_tiny_model("qwen2", seed=5)
    apply_lora(other, cfg)
    other.load_state_dict(ref.state_dict())
    enable_activation_checkpointing(other)
    maybe_compile(other, backend="eager")
    other.train()
    g = torch.Generator().manual_seed(7)
    docs = [torch.randint(0, 512, (n,), generator=g) for n in (9, 20)]
    tokens = torch.cat(docs).unsqueeze(0)
    pos = torch.cat([torch.arange(len(d)) for d in docs]).unsqueeze(0)
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)]).unsqueeze(0)
    a = ref(tokens, pos, doc_ids)
    b = other(tokens, pos, doc_ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for p, q in zip(adapter_parameters(ref), adapter_parameters(other)):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)
    singles = torch.cat([ref(d.unsqueeze(0))[0] for d in docs])
    torch.testing.assert_close(a[0], singles, atol=1e-5, rtol=1e-5)


def test_peft_round_trip(tmp_path):
    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear")
    model = build_tiny_model("llama", seed=8)
    apply_lora(model, cfg)
    randomise_adapters(model, 9)
    base_dir = tmp_path / "base"
    hf = hf_twin(model)
    hf.save_pretrained(base_dir)
    save_peft_adapter(model, tmp_path / "ours", base_model_name_or_path=str(base_dir))
    conf = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["peft_type"] == "LORA"
    # forge-saved -> peft
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager"),
                                        tmp_path / "ours")
    tokens = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        ours = model(tokens)
        torch.testing.assert_close(pm(input_ids=tokens).logits, ours, atol=1e-5, rtol=1e-5)
    # peft-saved -> forge (a fresh base model; the adapter config comes from the directory)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.01)
    pm.save_pretrained(tmp_path / "theirs")
    fresh = build_tiny_model("llama", seed=8)
    got = load_peft_adapter(fresh, tmp_path / "theirs")
    assert got.r == 4 and got.alpha == 8
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), pm(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)
    # merged HF export = the adapted model, loadable by transformers
    save_merged_hf(fresh, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=tokens).logits, fresh(tokens), atol=1e-5, rtol=1e-5)


def test_merger_merges_from_base_each_version():
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"])
    trained = build_tiny_model("qwen3", seed=11)
    apply_lora(trained, cfg)
    engine_model = build_tiny_model("qwen3", seed=11)
    merger = AdapterMerger(engine_model)
    tokens = torch.randint(0, 512, (1, 25), generator=torch.Generator().manual_seed(12))
    for version in range(2):  # two versions: the second merges from the base, never on top of the first
        randomise_adapters(trained, 20 + version)
        merger.apply(dict(AdapterView(trained).named_parameters()))
        with torch.no_grad():
            torch.testing.assert_close(engine_model(tokens), trained(tokens), atol=1e-5, rtol=1e-5)
        sd = merged_state_dict(trained)
        for n, t in engine_model.state_dict().items():
            torch.testing.assert_close(t, sd[n], atol=1e-6, rtol=1e-6)
    view = AdapterView(trained)
    assert all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n, _ in view.named_parameters())
    assert view.nbytes() < sum(p.numel() * 4 for p in engine_model.parameters()) / 5


def test_config_errors():
    with pytest.raises(ValueError, match="lm_head"):
        LoraConfig(target_modules=["lm_head"])
    with pytest.raises(ValueError, match="lora.r"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="unknown key"):
        LoraConfig.from_dict({"rank": 4})
    assert LoraConfig(r=16, alpha=32, rslora=True).scale == pytest.approx(8.0)


def test_base_dtype_bf16_keeps_adapters_fp32():
    model = build_tiny_model("qwen2", seed=13)
    apply_lora(model, LoraConfig(r=4, alpha=8, base_dtype="bfloat16"))
    randomise_adapters(model, 14)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.requires_grad for p in adapter_parameters(model))
    tokens = torch.randint(0, 512, (1, 12))
    model.model.embed_tokens.float()  # activations fp32, base linears bf16
    model.model.norm.float()
    for layer in model.model.layers:
        layer.input_layernorm.float()
        layer.post_attention_layernorm.float()
    out = model(tokens)
    out.sum().backward()
    assert all(p.grad is not None for p in adapter_parameters(model))
