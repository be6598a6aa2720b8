"""`Generator`: the rollout service, forge's built-in engine behind torchforge's Policy API.

    generator = await Generator.options(with_gpus=True).as_service(
        model="/ckpt/Qwen2.5-0.5B", engine={"max_num_seqs": 256}, sampling={"temperature": 1.0})
    completions = await generator.generate.route("2+2=", n=8)        # list[Completion]
    await generator.update_weights.fanout(step, state_dict)          # in place, version recorded

One worker thread drives the `LLMEngine`; every `generate` call (from any number of concurrent
callers) becomes a request of that engine, so concurrent calls batch together (continuous
batching across service calls). torchforge's `engine_args` / `sampling_params` (vLLM names)
are accepted too.

Weight updates never mix versions within one completion: an update waits in the command
queue, admission of requests queued after it pauses, requests already in flight finish on the
old weights (the engine keeps decoding them), then the new weights are copied in place
(`copy_` under no_grad into the existing parameters, no re-allocation; the KV cache and CUDA
graphs stay valid) and admission resumes. Every `Completion.generator_version` is the version
that produced all of its tokens.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from forge.config.compat import ENGINE_ARGS_MODEL, translate_engine_args, translate_sampling_params
from forge.controller import ForgeActor, endpoint
from forge.engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from forge.engine.tp import load_shards
from forge.models.decoder import CausalLM
from forge.models.lora import AdapterMerger, is_adapter_update
from forge.observability import Reduce, record_metric
from forge.types import Completion
from forge.weight_sync import WeightSyncError, available_version

log = logging.getLogger(__name__)


class Generator(ForgeActor):
    # a restarted replica fetches the weights version it held (the transport still has it), never
    # serves the constructor's weights under a newer run's rollouts
    restart_policy = "restore"

    def __init__(self, model: str | Path | CausalLM | None = None, engine: dict | EngineConfig | None = None,
                 sampling: dict | SamplingParams | None = None, tokenizer: Any = None, version: int = 0,
                 engine_args: dict | None = None, sampling_params: dict | None = None,
                 weight_sync: dict | None = None):
        cfg = _engine_config(engine, engine_args)
        if cfg.tensor_parallel_size != self.world_size:
            raise ValueError(f"Generator: a replica of procs={self.world_size} runs the engine tensor-parallel over its "
                             f"procs; tensor_parallel_size={cfg.tensor_parallel_size} must equal procs "
                             f"(engine_args.tensor_parallel_size / engine.tensor_parallel_size)")
        if cfg.tensor_parallel_size > 1 and (weight_sync or {}).get("transport") == "broadcast":
            raise ValueError("Generator: weight_sync transport 'broadcast' sends one full copy per replica; with "
                             f"tensor_parallel_size={cfg.tensor_parallel_size} use shm, cuda_ipc or inproc (each rank "
                             "copies its own shard of the published weights)")
        if model is None and engine_args and ENGINE_ARGS_MODEL in engine_args:
            model = engine_args[ENGINE_ARGS_MODEL]
        if model is None:
            raise ValueError("Generator needs `model`: a local checkpoint directory or a CausalLM")
        if cfg.device is None and self.device.type == "cuda":
            cfg.device = self.device
        if isinstance(model, CausalLM):
            net = model
        elif cfg.tensor_parallel_size > 1:  # each rank reads only its shard of the checkpoint
            from forge.engine.tp import TPGroup, load_model_shard

            dev = torch.device(cfg.device or self.device)
            net = load_model_shard(model, TPGroup.join(cfg.tensor_parallel_size, dev), device=dev)
            tokenizer = model if tokenizer is None else tokenizer
        else:
            from forge.models.hf_io import load_model

            net = load_model(model, device=cfg.device or self.device)
            tokenizer = model if tokenizer is None else tokenizer
        self.tokenizer = _load_tokenizer(tokenizer)
        self.defaults = _sampling_params(sampling, sampling_params)
        eos = set(net.args.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.engine = LLMEngine(net, cfg, eos_token_ids=sorted(eos), tokenizer=self.tokenizer)
        self.version = int(version)
        self._fetched = True  # the current weights can be fetched again by version (restart="restore")
        self._commands: deque = deque()
        self._cv = threading.Condition()
        self._futures: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future, int]] = {}
        self._stop = False
        # tensor parallel: rank 0 drives the engine; the other ranks run its forwards (LLMEngine.follow)
        # and their endpoints only follow rank 0's (generate returns nothing, updates load this rank's shard)
        self.follower = self.engine.tp is not None and not self.engine.tp.leader
        self._updates: dict[int, Any] = {}  # follower: version -> its weights (or the error fetching them)
        loop_fn = self._follow if self.follower else self._loop
        self._thread = threading.Thread(target=loop_fn, name="forge-generator", daemon=True)
        self._thread.start()
        self.weight_sync = dict(weight_sync or {})
        self._receiver: Any = None  # broadcast: joins the trainer's group at the first update
        self._merger = AdapterMerger(self.engine.model)  # LoRA updates: merged from the kept base weights

    # ---- endpoints --------------------------------------------------------------------------
    @endpoint
    async def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                       token_ids: Iterable[int] | torch.Tensor | None = None, n: int | None = None,
                       sampling: dict | SamplingParams | None = None,
                       sampling_params: dict | SamplingParams | None = None,
                       priority: int = 0) -> list[Completion]:
        """Exactly one of `prompt` (text, tokenized as is), `messages` (chat, rendered with the
        tokenizer's template plus the generation prompt) or `token_ids`. Returns n Completions:
        `n`, else the per-call sampling's `n`, else the configured `sampling_params.n` (torchforge's
        `policy.generate.route(prompt)` gets the group). `sampling_params=` is torchforge's name
        for `sampling=`; `priority` (vLLM's) must be 0: forge's scheduler serves requests in order."""
        if self.follower:
            return []  # rank 0 answers for the replica; this rank ran its forwards in `_follow`
        given = [x is not None for x in (prompt, messages, token_ids)]
        if sum(given) != 1:
            raise ValueError("generate: pass exactly one of prompt=, messages=, token_ids=")
        if sampling is not None and sampling_params is not None:
            raise ValueError("generate: pass sampling= or sampling_params= (torchforge's name), not both")
        if priority != 0:
            raise ValueError(f"generate(priority={priority!r}): forge's scheduler serves requests first come, "
                             "first served and has no priorities; pass priority=0 (the default)")
        sampling = sampling if sampling is not None else sampling_params
        text, ids = self._encode(prompt, messages, token_ids)
        over = dict(sampling.__dict__) if isinstance(sampling, SamplingParams) else dict(sampling or {})
        if n is not None:
            over["n"] = n
        params = self.defaults.replace(**over)
        t0 = time.perf_counter()
        out, version = await self._submit("add", (ids, params))
        dt = time.perf_counter() - t0
        comps = [
            Completion(prompt=text, text=s.text or "", prompt_ids=torch.tensor(out.prompt_ids),
                       token_ids=torch.tensor(s.token_ids, dtype=torch.long),
                       logprobs=torch.tensor(s.logprobs, dtype=torch.float32), stop_reason=s.stop_reason,
                       generator_version=version,
                       metadata={"request_id": out.request_id, "sample_index": s.index, **out.metadata})
            for s in out.outputs
        ]
        ntok = sum(len(c.token_ids) for c in comps)
        record_metric("generator/generate/sum_tokens_generated", ntok, Reduce.SUM)
        record_metric("generator/num_requests", 1, Reduce.SUM)
        record_metric("generator/generate/avg_latency_s", dt, Reduce.MEAN)
        record_metric("generator/generate/avg_response_len", ntok / max(1, len(comps)), Reduce.MEAN)
        return comps

    @endpoint(changes_state=True)
    async def update_weights(self, version: int, state_dict: Any = None) -> int:
        """Copy new weights into the model in place and record `version`.

        `state_dict`: a mapping name -> tensor (HF names, a subset is fine), or an iterable of
        (name, tensor) pairs (streamed), or None to fetch `version` by the `weight_sync` transport
        given at construction: inproc / shm / cuda_ipc read what `Trainer.push_weights(version)` published;
        broadcast takes part in that push (call both at once: it is a collective).
        """
        fetched = state_dict is None
        if self.follower:
            return await self._follower_update(int(version), state_dict)
        if fetched:
            state_dict = await asyncio.to_thread(self._fetch_weights, int(version))
        await self._submit("update", (int(version), state_dict))
        self._fetched = fetched
        return self.version

    @endpoint
    async def state_dict(self) -> dict[str, Any]:
        """What a restarted replica needs to serve the same policy: the weights version."""
        return {"version": self.version, "fetched": self._fetched}

    @endpoint(changes_state=True)
    async def load_state_dict(self, state: dict[str, Any]) -> None:
        """Fetch the weights version `state` names from the transport (after a restart)."""
        version = int(state["version"])
        if version == self.version:
            return
        if not state.get("fetched", True):
            raise WeightSyncError(f"Generator: version {version} was passed to update_weights as a "
                                            "state_dict; a restarted replica cannot fetch it again")
        if self.weight_sync.get("transport") == "broadcast":
            raise WeightSyncError(f"Generator: version {version} arrived by broadcast, a collective "
                                            "with the trainer; one restarted replica cannot receive it alone")
        # the newest published weights, not only the version it held: a replica killed during an
        # update would otherwise serve one version behind until the next sync
        newest = available_version(self.weight_sync.get("name", "policy"), self.weight_sync.get("transport"),
                                   self.weight_sync.get("directory"))
        if newest is not None and newest > version:
            version = newest
        try:
            await self.update_weights(version)
        except WeightSyncError:
            # the trainer pushed again while this replica restarted and `version` is gone:
            # the newest published version is as good (newer, and labelled as what it is)
            newest = available_version(self.weight_sync.get("name", "policy"), self.weight_sync.get("transport"),
                                       self.weight_sync.get("directory"))
            if newest is None or newest <= version:
                raise
            await self.update_weights(newest)

    @endpoint
    async def get_version(self) -> int:
        return self.version

    @endpoint
    async def get_model_state_dict_keys(self) -> list[str]:
        return list(self.engine.model.state_dict().keys())

    async def teardown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        await asyncio.to_thread(self._thread.join, 10.0)

    # ---- tensor-parallel followers (ranks > 0) ----------------------------------------------
    async def _follower_update(self, version: int, state_dict: Any) -> int:
        """Hand this rank's weights of `version` to `_follow`, which loads its shard when rank 0's engine
        thread reaches that update (between two forwards); returns once loaded."""
        if state_dict is None:
            try:
                state_dict = await asyncio.to_thread(self._fetch_weights, version)
            except Exception as e:  # noqa: BLE001 (rank 0 fails the same fetch; the error is this call's too)
                state_dict = e
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            self._updates[version] = (state_dict, loop, fut)
            self._cv.notify_all()
        await fut
        self._fetched = True
        return self.version

    def _follow(self) -> None:
        try:
            self.engine.follow(on_update=self._load_follower_update)
        except Exception:
            log.exception("tensor-parallel follower rank %d stopped", self.engine.tp.rank)
            raise

    def _load_follower_update(self, version: int) -> None:
        with self._cv:
            if not self._cv.wait_for(lambda: version in self._updates, timeout=600.0):
                raise RuntimeError(f"rank 0 loaded weights version {version}; this rank's update_weights({version}) "
                                   "never came (a tensor-parallel replica's update is called on every rank)")
            sd, loop, fut = self._updates.pop(version)
        if isinstance(sd, BaseException):
            loop.call_soon_threadsafe(_set, fut, None, sd)
            raise sd
        try:
            n = self._load_weights(sd, version)
            self.version = version
        except Exception as e:
            loop.call_soon_threadsafe(_set, fut, None, e)
            raise
        loop.call_soon_threadsafe(_set, fut, n, None)

    # ---- helpers ----------------------------------------------------------------------------
    def _load_weights(self, sd: Any, version: int) -> int:
        """Full weights are copied in place; LoRA adapters (a trainer with `model.lora` publishes
        only those) are merged into the base weights, so generation runs at the base model's speed."""
        if isinstance(sd, Mapping) and is_adapter_update(sd.keys()):
            if self.engine.tp is not None:
                raise ValueError("update_weights: LoRA adapter updates are not supported with tensor_parallel_size="
                                 f"{self.engine.tp.size}; publish merged full weights")
            return self._merger.apply(sd)
        self._merger.forget_base()  # full weights are the new base
        return self.engine.load_weights(sd, version)

    def _fetch_weights(self, version: int) -> Any:
        """The published weights of `version`, by the configured transport (see forge.weight_sync).
        With `broadcast` this takes part in the trainer's publish (the app runs both at once)."""
        from forge.weight_sync import WeightSubscriber, WeightSyncError, get_weights

        transport = self.weight_sync.get("transport")
        if transport == "broadcast":
            if self._receiver is None:  # replica r is rank r+1 of the group (the trainer's rank 0 sends)
                kw = {k: v for k, v in self.weight_sync.items()
                      if k in ("addr", "port", "num_receivers", "backend", "timeout_s")}
                self._receiver = WeightSubscriber(self.engine.model, "broadcast", rank=self.replica_id + 1, **kw)
            got, staged = self._receiver.receive()
            if got != version:
                raise WeightSyncError(f"update_weights({version}): the trainer's broadcast carried version {got}")
            return staged
        return get_weights(version, name=self.weight_sync.get("name", "policy"), transport=transport,
                           directory=self.weight_sync.get("directory"), device=self.engine.device)

    def _encode(self, prompt, messages, token_ids) -> tuple[str, list[int]]:
        tok = self.tokenizer
        if token_ids is not None:
            ids = self.engine.prompt_token_ids(token_ids)  # checked before the tokenizer decodes them
            return (tok.decode(ids) if tok is not None else ""), ids
        if tok is None:
            raise ValueError("generate: text prompts / messages need a tokenizer (Generator(tokenizer=path)); "
                             "or pass token_ids=")
        if messages is not None:
            from forge.models.tokenizer import apply_chat_template

            prompt = apply_chat_template(tok, messages, add_generation_prompt=True)
            return prompt, tok.encode(prompt, add_special_tokens=False)
        return prompt, tok.encode(prompt)

    async def _submit(self, kind: str, payload: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            if not self._thread.is_alive():
                raise RuntimeError("generator engine thread is not running")
            self._commands.append((kind, payload, loop, fut))
            self._cv.notify()
        return await fut

    def _loop(self) -> None:
        """The engine thread: admit requests, step, deliver results; updates only when drained."""
        eng = self.engine
        while True:
            with self._cv:
                while not self._stop and not self._commands and not eng.has_unfinished():
                    self._cv.wait()
                if self._stop:
                    eng.shutdown()  # tensor parallel: releases the followers
                    break
                ready = []
                while self._commands and self._commands[0][0] == "add":
                    ready.append(self._commands.popleft())
                update = self._commands[0] if self._commands and not eng.has_unfinished() and not ready else None
                if update is not None:
                    self._commands.popleft()
            for _, (ids, params), loop, fut in ready:
                try:
                    rid = eng.add_request(ids, params)
                    self._futures[rid] = (loop, fut, self.version)
                except Exception as e:  # a bad request fails its caller, never the engine
                    loop.call_soon_threadsafe(_set, fut, None, e)
            if update is not None:
                _, (version, sd), loop, fut = update
                try:
                    t0 = time.perf_counter()
                    n = self._load_weights(sd, version)
                    self.version = version
                    record_metric("generator/update_weights/time_s", time.perf_counter() - t0, Reduce.MEAN)
                    loop.call_soon_threadsafe(_set, fut, n, None)
                except Exception as e:
                    loop.call_soon_threadsafe(_set, fut, None, e)
                continue
            if not eng.has_unfinished():
                continue
            try:
                t0, before = time.perf_counter(), eng.stats["decode_tokens"] + eng.stats["prefill_tokens"]
                outs = eng.step()
                self._record_step(time.perf_counter() - t0, before)
            except Exception as e:  # engine failure: fail every caller in flight, keep the thread alive
                log.exception("generator engine step failed")
                self._fail_all(e)
                continue
            for out in outs:
                self._deliver(out)

    def _record_step(self, dt: float, before: int) -> None:
        s = self.engine.stats
        if s["steps"] % 32 == 0 and dt > 0:
            record_metric("generator/tokens_per_s", (s["decode_tokens"] + s["prefill_tokens"] - before) / dt, Reduce.MEAN)
            record_metric("generator/num_running", len(self.engine.scheduler.running), Reduce.MEAN)
            record_metric("generator/num_waiting", len(self.engine.scheduler.waiting), Reduce.MEAN)

    def _deliver(self, out: RequestOutput) -> None:
        loop, fut, version = self._futures.pop(out.request_id)
        loop.call_soon_threadsafe(_set, fut, (out, version), None)

    def _fail_all(self, e: Exception) -> None:
        for rid in list(self._futures):
            loop, fut, _ = self._futures.pop(rid)
            loop.call_soon_threadsafe(_set, fut, None, e)
        eng = self.engine
        eng.drop_in_flight()
        for seq in list(eng.scheduler.running) + list(eng.scheduler.waiting):
            eng.scheduler.blocks.release(seq)
        eng.scheduler.running.clear()
        eng.scheduler.waiting.clear()
        eng.requests.clear()


def _set(fut: asyncio.Future, value: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


def load_weights_in_place(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor] | Iterable) -> int:
    """`copy_` each given tensor into the parameter/buffer of that name; returns how many were copied.

    Unknown names and shape mismatches are errors (nothing partial is silently accepted).
    """
    return load_shards(model, state_dict)


def _load_tokenizer(tok: Any) -> Any:
    if tok is None or not isinstance(tok, (str, Path)):
        return tok
    from forge.models.tokenizer import load_tokenizer

    try:
        return load_tokenizer(tok)
    except FileNotFoundError:
        log.warning("no tokenizer at %s: the generator takes token_ids only", tok)
        return None


def _engine_config(engine: Any, engine_args: dict | None) -> EngineConfig:
    if isinstance(engine, EngineConfig):
        return engine
    d = dict(engine or {})
    mapped, unused = translate_engine_args(engine_args or {})  # vLLM's names (forge.config.compat)
    for k, v in mapped.items():
        d.setdefault(k, v)
    if unused:
        log.warning("Generator: engine_args keys not used by forge's engine: %s", sorted(unused))
    return EngineConfig.from_dict(d)


def _sampling_params(sampling: Any, sampling_params: dict | None) -> SamplingParams:
    if isinstance(sampling, SamplingParams):
        return sampling
    d = dict(sampling or {})
    for k, v in translate_sampling_params(sampling_params or {}).items():  # vLLM's names (forge.config.compat)
        if k in SamplingParams.__dataclass_fields__:
            d.setdefault(k, v)
        else:
            log.warning("Generator: sampling_params key '%s' is not used by forge's engine", k)
    d.setdefault("n", 1)
    return SamplingParams.from_dict(d)
