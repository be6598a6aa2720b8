"""`ReferenceModel`: the frozen policy the KL term is measured against.

Same unpadding, packing and chunked logprob code as the trainer (`forge.trainer`), under
`torch.no_grad`, bf16 weights on GPU and float32 on CPU (`with_gpus: false`). An app whose
loss has `needs_ref == False` never creates it.

    ref = await ReferenceModel.options(with_gpus=True).as_service(model={"path": ...})
    ref_logprobs = await ref.forward.route(inputs, targets)            # trainer batch -> [B, R]
    ref_logprobs = await ref.forward.route(tokens, response_mask)      # [B, P+R], [B, R] -> [B, R]
    ref_logprobs = await ref.forward.route(input_ids, max_req_tokens)  # torchforge's call
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from torch import Tensor

from forge.actors.trainer import with_tokenizer_pad_id
from forge.controller import ForgeActor, endpoint
from forge.trainer.engine import build_model
from forge.trainer.packing import pack, sequences_from_rl_batch
from forge.trainer.step import LogprobModel, run_microbatch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ReferenceModel(ForgeActor):
    def __init__(self, model: dict[str, Any] | str | None = None, training: dict[str, Any] | None = None,
                 compile: Any = None, **unused: Any):
        self.model_spec = {"path": model} if isinstance(model, str) else dict(model or {"tiny": "qwen2", "seed": 0})
        if "hf_assets_path" in self.model_spec:
            self.model_spec.setdefault("path", self.model_spec.pop("hf_assets_path"))
        t = with_tokenizer_pad_id(training, self.model_spec)
        self.temperature = float(t.get("temperature", 1.0))
        self.max_tokens = int(t.get("max_tokens_per_microbatch", 8192))
        self.chunk_size = int(t.get("logprob_chunk_size", 1024))
        self.pad_id = t.get("pad_id")
        self.dtype_name = t.get("dtype", "bfloat16")
        if self.dtype_name not in _DTYPES:
            raise ValueError(f"ref_model training.dtype must be one of {sorted(_DTYPES)}, got {self.dtype_name!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.compile = bool(compile.get("enable", False) if isinstance(compile, dict) else compile)
        self.module: LogprobModel | None = None

    async def setup(self) -> None:
        def build() -> LogprobModel:
            model = build_model(self.model_spec, self.device)
            dt = _DTYPES[self.dtype_name] if self.device.type == "cuda" else torch.float32
            model.to(dt).eval().requires_grad_(False)
            if self.compile:
                from forge.models.parallel import maybe_compile

                maybe_compile(model)
            if self.pad_id is None:
                self.pad_id = model.args.pad_token_id
            return LogprobModel(model, self.temperature, self.chunk_size)

        self.module = await asyncio.to_thread(build)

    @endpoint
    async def forward(self, tokens_or_inputs: Any, response_mask_or_targets: Any = None, *,
                      prompt_mask: Tensor | None = None, return_logprobs: bool = True,
                      max_req_tokens: int | None = None) -> Tensor:
        """Reference logprobs `[B, R]` (float32, CPU; 0 where the response mask is 0).
        `max_req_tokens=` is torchforge's keyword for the second argument of (input_ids, max_req_tokens)."""
        if not return_logprobs:
            raise ValueError("ReferenceModel.forward only returns logprobs (return_logprobs=True)")
        if max_req_tokens is not None:
            if response_mask_or_targets is not None:
                raise TypeError("ReferenceModel.forward: pass max_req_tokens once (positionally or by keyword)")
            response_mask_or_targets = int(max_req_tokens)
        a, b = tokens_or_inputs, response_mask_or_targets
        if isinstance(a, list):  # trainer batch
            inp, tgt = a[0], b[0]
            tokens, pm = inp["tokens"], inp.get("prompt_mask")
            mask = tgt.get("response_mask", tgt["padding_mask"])
        elif isinstance(b, int):  # torchforge: (input_ids, max_req_tokens) -> score every response column
            tokens, pm = a, prompt_mask
            mask = torch.ones(a.shape[0], a.shape[1] - b)
        elif isinstance(b, Tensor):
            tokens, pm, mask = a, prompt_mask, b
        else:
            raise TypeError("ReferenceModel.forward takes (inputs, targets), (tokens, response_mask) or "
                            f"(input_ids, max_req_tokens); got ({type(a).__name__}, {type(b).__name__})")
        return await asyncio.to_thread(self._logprobs, tokens, mask, pm)

    @torch.no_grad()
    def _logprobs(self, tokens: Tensor, mask: Tensor, prompt_mask: Tensor | None) -> Tensor:
        assert self.module is not None, "setup() has not run"
        b, r = mask.shape
        seqs = sequences_from_rl_batch(tokens, r, mask, prompt_mask, self.pad_id)
        out = torch.zeros(b, r, dtype=torch.float32)
        pad = 128 if self.device.type == "cuda" else 1
        for mb in pack(seqs, self.max_tokens, pad):
            lp, _ = run_microbatch(self.module, mb.to(self.device), r)
            out[mb.rows] = lp.float().cpu()
        return out
