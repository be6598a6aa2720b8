"""Decode GEMMs through cuBLASLt with the algorithm picked by timing (CUDA, Linux).

torch runs each GEMM with the first algorithm cuBLASLt's heuristic proposes for its shape. At a
decode batch of a few hundred rows that pick is often not the fastest: timing the heuristic's other
candidates on this GPU measured 4-10% faster kernels for the Qwen2.5-0.5B decode GEMMs
(bench/cublaslt_algos.py, docs/perf/NOTES_generate.md). The decode step's shapes are fixed (one per
CUDA-graph batch size), so `GemmTuner` times the candidates once, before the graphs are captured,
over the model's own weights (every layer's, so each is read from HBM as in a decode step), and
keeps an algorithm only where it beats `F.linear` by a margin; everything else stays `F.linear`.

The library is the libcublasLt torch itself loaded, called through ctypes with the same compute
type (float32 accumulation). Split-K algorithms that reduce in the output dtype are excluded: only
float32 partial sums, so a tuned GEMM differs from `F.linear` only in summation order. Each choice
is checked against `F.linear` on the real weights before it is kept.
"""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from forge.engine.timing import graph_time_us

log = logging.getLogger(__name__)

_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_COMPUTE_32F = 68
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_EPILOGUE_DEFAULT, _EPILOGUE_BIAS = 1, 4
_PREF_MAX_WORKSPACE, _PREF_REDUCTION_SCHEME_MASK = 1, 3
_REDUCTION_COMPUTE_TYPE = 2  # split-K partials kept in float32 (not INPLACE / OUTPUT_TYPE: bf16 partials)
_OP_N, _OP_T = 0, 1
# cublasLtMatmulAlgoCapAttributes_t / cublasLtMatmulAlgoConfigAttributes_t
_CAP_SPLITK, _CAP_REDUCTION_MASK, _CAP_SWIZZLE, _CAP_TILE_IDS, _CAP_CUSTOM_MAX, _CAP_STAGES_IDS = 0, 1, 2, 6, 7, 13
_CFG_ID, _CFG_TILE, _CFG_SPLITK, _CFG_REDUCTION, _CFG_SWIZZLE, _CFG_CUSTOM, _CFG_STAGES = 0, 1, 2, 3, 4, 5, 6
_CFG_INNER_SHAPE, _CFG_CLUSTER_SHAPE = 7, 8  # uint16 values
_CONFIG_FIELDS = (("id", _CFG_ID, ctypes.c_int32), ("tile", _CFG_TILE, ctypes.c_uint32),
                  ("split_k", _CFG_SPLITK, ctypes.c_uint32), ("reduction", _CFG_REDUCTION, ctypes.c_uint32),
                  ("swizzle", _CFG_SWIZZLE, ctypes.c_uint32), ("custom", _CFG_CUSTOM, ctypes.c_uint32),
                  ("stages", _CFG_STAGES, ctypes.c_uint32), ("inner_shape", _CFG_INNER_SHAPE, ctypes.c_uint16),
                  ("cluster_shape", _CFG_CLUSTER_SHAPE, ctypes.c_uint16))
_DTYPES = {torch.bfloat16: _CUDA_R_16BF, torch.float16: _CUDA_R_16F}

_vp, _sz = ctypes.c_void_p, ctypes.c_size_t


class _Heuristic(ctypes.Structure):  # cublasLtMatmulHeuristicResult_t
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


_LIB: ctypes.CDLL | None = None
_LIB_TRIED = False


def load(device: torch.device | None = None) -> ctypes.CDLL | None:
    """The libcublasLt this process's torch loaded (None where there is none, e.g. no CUDA / not Linux).
    `device`: where the one small GEMM that makes torch load it runs (default: the current device), so
    that no other GPU gets a context."""
    global _LIB, _LIB_TRIED
    if _LIB_TRIED:
        return _LIB
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return None
    _LIB_TRIED = True
    try:
        a = torch.ones(8, 8, device=device if device is not None else "cuda", dtype=torch.bfloat16)
        F.linear(a, a, a[0])  # makes torch load cuBLASLt (the bias epilogue runs there)
        torch.cuda.synchronize(a.device)
        with open("/proc/self/maps") as f:
            path = next((ln.split()[-1] for ln in f if "libcublasLt.so" in ln), None)
        if path is None:
            return None
        lib = ctypes.CDLL(path)
        sigs = {
            "cublasLtCreate": [_vp],
            "cublasLtDestroy": [_vp],
            "cublasLtMatmulDescCreate": [_vp, ctypes.c_int, ctypes.c_int],
            "cublasLtMatmulDescDestroy": [_vp],
            "cublasLtMatmulDescSetAttribute": [_vp, ctypes.c_int, _vp, _sz],
            "cublasLtMatrixLayoutCreate": [_vp, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
            "cublasLtMatrixLayoutDestroy": [_vp],
            "cublasLtMatmulPreferenceCreate": [_vp],
            "cublasLtMatmulPreferenceDestroy": [_vp],
            "cublasLtMatmulPreferenceSetAttribute": [_vp, ctypes.c_int, _vp, _sz],
            "cublasLtMatmulAlgoGetHeuristic": [_vp, _vp, _vp, _vp, _vp, _vp, _vp, ctypes.c_int, _vp, _vp],
            "cublasLtMatmul": [_vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp, _sz, _vp],
            # the search beyond the heuristic's list (LtMatmul.configs)
            "cublasLtMatmulAlgoGetIds": [_vp] + [ctypes.c_int] * 7 + [_vp, _vp],
            "cublasLtMatmulAlgoInit": [_vp] + [ctypes.c_int] * 7 + [_vp],
            "cublasLtMatmulAlgoCapGetAttribute": [_vp, ctypes.c_int, _vp, _sz, _vp],
            "cublasLtMatmulAlgoConfigSetAttribute": [_vp, ctypes.c_int, _vp, _sz],
            "cublasLtMatmulAlgoConfigGetAttribute": [_vp, ctypes.c_int, _vp, _sz, _vp],
            "cublasLtMatmulAlgoCheck": [_vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp],
        }
        for name, args in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        _LIB = lib
    except Exception as e:  # pragma: no cover - depends on the CUDA install
        log.info("cuBLASLt tuning unavailable: %s", e)
        _LIB = None
    return _LIB


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with status {status}")


class LtMatmul:
    """y[M, N] = x[M, K] @ w[N, K].T (+ bias) for one (M, N, K) with a given cuBLASLt algorithm;
    `accumulate`: y += x @ w.T in place (beta = 1, C = D = the given `out`).

    Row-major tensors seen column-major: y^T[N, M] = op_T(w^T[K, N]) @ x^T[K, M]. x, w and y must
    have contiguous rows (leading dimension K, K and N)."""

    def __init__(self, lib: ctypes.CDLL, handle: ctypes.c_void_p, m: int, n: int, k: int, bias: bool,
                 dtype: torch.dtype, workspace: torch.Tensor, accumulate: bool = False):
        if bias and accumulate:
            raise ValueError("LtMatmul: accumulate with a bias is not supported")
        self.lib, self.handle, self.ws = lib, handle, workspace
        self.m, self.n, self.k, self.has_bias, self.dtype = m, n, k, bias, dtype
        self.accumulate = accumulate
        self.desc, self.pref = _vp(), _vp()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _CUDA_R_32F), "desc")
        self._set(_DESC_TRANSA, ctypes.c_int32(_OP_T))
        self._set(_DESC_TRANSB, ctypes.c_int32(_OP_N))
        self._set(_DESC_EPILOGUE, ctypes.c_int32(_EPILOGUE_BIAS if bias else _EPILOGUE_DEFAULT))
        t = _DTYPES[dtype]
        self.layouts = []
        for rows, cols, ld in ((k, n, k), (k, m, k), (n, m, n)):
            h = _vp()
            _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(h), t, rows, cols, ld), "layout")
            self.layouts.append(h)
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(self.pref)), "preference")
        for attr, val in ((_PREF_MAX_WORKSPACE, ctypes.c_uint64(workspace.numel())),
                          (_PREF_REDUCTION_SCHEME_MASK, ctypes.c_uint32(_REDUCTION_COMPUTE_TYPE))):
            _check(lib.cublasLtMatmulPreferenceSetAttribute(self.pref, attr, ctypes.byref(val),
                                                            ctypes.sizeof(val)), "preference attribute")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(1.0 if accumulate else 0.0)

    def _set(self, attr: int, val) -> None:
        _check(self.lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(val), ctypes.sizeof(val)),
               "desc attribute")

    def candidates(self, count: int = 16) -> list[_Heuristic]:
        res = (_Heuristic * count)()
        got = ctypes.c_int(0)
        a, b, c = self.layouts
        _check(self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, a, b, c, c, self.pref, count,
                                                       ctypes.cast(res, _vp), ctypes.byref(got)), "heuristic")
        return [res[i] for i in range(got.value) if res[i].state == 0
                and res[i].workspace_size <= self.ws.numel()]

    def describe(self, algo: _Heuristic) -> dict[str, int]:
        """The configuration an algorithm carries (id, tile, split-K, ...), for logs and the bench."""
        out, written = {}, _sz(0)
        for name, attr, ctype in _CONFIG_FIELDS:
            v = ctype(0)
            if self.lib.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo.algo), attr, ctypes.byref(v),
                                                             ctypes.sizeof(v), ctypes.byref(written)) == 0:
                out[name] = int(v.value)
        return out

    def _cap(self, algo, attr: int, ctype=ctypes.c_int32, array: bool = False):
        written = _sz(0)
        if array:  # ask for the size first
            if self.lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, None, 0,
                                                          ctypes.byref(written)) != 0:
                return []
            n = written.value // ctypes.sizeof(ctype)
            buf = (ctype * max(n, 1))()
            if n == 0 or self.lib.cublasLtMatmulAlgoCapGetAttribute(
                    ctypes.byref(algo), attr, buf, ctypes.sizeof(buf), ctypes.byref(written)) != 0:
                return []
            return [int(buf[i]) for i in range(n)]
        v = ctype(0)
        if self.lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, ctypes.byref(v), ctypes.sizeof(v),
                                                      ctypes.byref(written)) != 0:
            return 0
        return int(v.value)

    def configs(self, bases: list[_Heuristic] = (), split_ks: tuple[int, ...] = (1, 2, 3, 4, 6, 8),
                max_custom: int = 7, clusters: range = range(16), budget_s: float | None = None) -> list[_Heuristic]:
        """Configurations cuBLASLt accepts for this GEMM beyond the heuristic's short list, each checked
        by cublasLtMatmulAlgoCheck; the caller times them. For every algorithm id
        (cublasLtMatmulAlgoGetIds): where the heuristic proposed that id (`bases`), its proposal is the
        template and tile x split-K x custom option x cluster shape vary (stages kept: the Hopper kernels'
        proposals all carry one stages id); for the other ids, tile x stages x split-K x CTA swizzle vary
        from cublasLtMatmulAlgoInit's defaults. Split-K only with float32 partials. `budget_s`: stop
        enumerating after this long (`self.truncated` says whether it did)."""
        deadline = None if budget_s is None else time.perf_counter() + budget_s
        self.truncated = False
        lib, t = self.lib, _DTYPES[self.dtype]
        types = (_COMPUTE_32F, _CUDA_R_32F, t, t, t, t)
        ids, got = (ctypes.c_int * 512)(), ctypes.c_int(0)
        _check(lib.cublasLtMatmulAlgoGetIds(self.handle, *types, 512, ids, ctypes.byref(got)), "algo ids")
        templates = {}
        for h in bases:
            templates.setdefault(self.describe(h).get("id"), h.algo)
        a, b, c = self.layouts
        found: list[_Heuristic] = []
        seen: set[bytes] = set()

        def check(template, settings) -> None:
            algo = (ctypes.c_uint64 * 8)(*template)
            for attr, val, ctype in settings:
                v = ctype(val)
                if lib.cublasLtMatmulAlgoConfigSetAttribute(ctypes.byref(algo), attr, ctypes.byref(v),
                                                            ctypes.sizeof(v)) != 0:
                    return
            key = bytes(algo)
            if key in seen:
                return
            seen.add(key)
            res = _Heuristic()
            if lib.cublasLtMatmulAlgoCheck(self.handle, self.desc, a, b, c, c, ctypes.byref(algo),
                                           ctypes.byref(res)) != 0 or res.state != 0:
                return
            if res.workspace_size <= self.ws.numel():
                res.algo = algo  # the configured algorithm, whatever the check wrote back
                found.append(res)

        u32, u16 = ctypes.c_uint32, ctypes.c_uint16
        for algo_id in ids[:got.value]:
            if deadline is not None and time.perf_counter() > deadline:
                self.truncated = True
                break
            init = (ctypes.c_uint64 * 8)()
            if lib.cublasLtMatmulAlgoInit(self.handle, *types, algo_id, ctypes.byref(init)) != 0:
                continue
            tiles = self._cap(init, _CAP_TILE_IDS, u32, array=True) or [0]
            can_split = self._cap(init, _CAP_SPLITK) and self._cap(init, _CAP_REDUCTION_MASK, u32) \
                & _REDUCTION_COMPUTE_TYPE
            sks = [k for k in split_ks if k == 1 or can_split]
            split = [[(_CFG_SPLITK, k, u32), (_CFG_REDUCTION, _REDUCTION_COMPUTE_TYPE if k > 1 else 0, u32)]
                     for k in sks]
            if algo_id in templates:
                customs = range(min(self._cap(init, _CAP_CUSTOM_MAX), max_custom) + 1)
                for tile in tiles:
                    if deadline is not None and time.perf_counter() > deadline:
                        self.truncated = True
                        break
                    for sk in split:
                        for custom in customs:
                            for cl in clusters:
                                check(templates[algo_id], [(_CFG_TILE, tile, u32), *sk, (_CFG_CUSTOM, custom, u32),
                                                           (_CFG_CLUSTER_SHAPE, cl, u16)])
            else:
                stages = self._cap(init, _CAP_STAGES_IDS, u32, array=True) or [0]
                swz = [0, 1] if self._cap(init, _CAP_SWIZZLE, u32) else [0]
                for tile in tiles:
                    for stage in stages:
                        for sk in split:
                            for sw in swz:
                                check(init, [(_CFG_TILE, tile, u32), (_CFG_STAGES, stage, u32), *sk,
                                             (_CFG_SWIZZLE, sw, u32)])
        return found

    def __call__(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, algo: _Heuristic,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        if self.accumulate and out is None:
            raise ValueError("LtMatmul(accumulate=True) needs out= (the tensor it adds into)")
        y = out if out is not None else torch.empty(self.m, self.n, dtype=self.dtype, device=x.device)
        if self.has_bias:  # read when the matmul is enqueued (and baked into a graph being captured)
            self._set(_DESC_BIAS_POINTER, _vp(bias.data_ptr()))
        a, b, c = self.layouts
        _check(self.lib.cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(self.alpha), _vp(w.data_ptr()), a, _vp(x.data_ptr()), b,
            ctypes.byref(self.beta), _vp(y.data_ptr()), c, _vp(y.data_ptr()), c, ctypes.byref(algo.algo),
            _vp(self.ws.data_ptr()), algo.workspace_size, _vp(torch.cuda.current_stream(x.device).cuda_stream)),
            "matmul")
        return y

    def close(self) -> None:
        for h in self.layouts:
            self.lib.cublasLtMatrixLayoutDestroy(h)
        self.lib.cublasLtMatmulPreferenceDestroy(self.pref)
        self.lib.cublasLtMatmulDescDestroy(self.desc)
        self.layouts = []


@dataclass
class Choice:
    op: LtMatmul | None  # None: F.linear was fastest
    algo: _Heuristic | None
    us: float  # per call, tuned
    us_torch: float  # per call, F.linear


@dataclass
class GemmTuner:
    """Per (kind, M, N, K, bias, accumulate) GEMM: the fastest of F.linear (or, accumulating into the
    output, `addmm_`) and cuBLASLt's candidates, timed once."""

    device: torch.device
    dtype: torch.dtype
    margin: float = 0.02  # keep a candidate only if it is this much faster than F.linear
    workspace_bytes: int = 32 << 20
    choices: dict[tuple, Choice] = field(default_factory=dict)

    def __post_init__(self):
        self.lib = load(self.device)
        self.handle = _vp()
        if self.lib is None:
            raise RuntimeError("cuBLASLt is not available in this process")
        _check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "create")
        self.ws = torch.empty(self.workspace_bytes, dtype=torch.uint8, device=self.device)

    @staticmethod
    def supported(device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cuda" and dtype in _DTYPES and load(device) is not None

    @torch.inference_mode()
    def tune(self, kind: str, x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor | None]],
             accumulate: bool = False) -> Choice:
        """Time F.linear and each candidate over all `weights` (one call per weight, as a decode step
        runs one per layer) on activations x [M, K]; keep the fastest that matches F.linear.
        `accumulate`: the GEMM adds into its output (`add_linear`); no bias then (else F.linear stays)."""
        m, k = x.shape
        n = weights[0][0].shape[0]
        bias = weights[0][1] is not None
        key = (kind, m, n, k, bias, accumulate)
        if key in self.choices:
            return self.choices[key]
        out = torch.randn(m, n, device=x.device).to(x.dtype) if accumulate else None
        if accumulate:
            base = graph_time_us(lambda: [out.addmm_(x, w.t()) for w, _ in weights]) / len(weights)
        else:
            base = graph_time_us(lambda: [F.linear(x, w, b) for w, b in weights]) / len(weights)
        best = Choice(None, None, base, base)
        if accumulate and bias:
            self.choices[key] = best
            return best
        op = LtMatmul(self.lib, self.handle, m, n, k, bias, self.dtype, self.ws, accumulate=accumulate)
        start = out.clone() if accumulate else None
        ref = F.linear(x, weights[0][0], weights[0][1]).float() + (start.float() if accumulate else 0.0)
        scale = ref.abs().max().clamp_min(1e-30)
        for algo in op.candidates():
            try:
                got = op(x, weights[0][0], weights[0][1], algo, out=start.clone() if accumulate else None)
                err = float((got.float() - ref).abs().max() / scale)
                if not err < 2e-2:  # a bf16 ulp or two from summation order; anything else is not this GEMM
                    continue
                us = graph_time_us(lambda algo=algo: [op(x, w, b, algo, out=out) for w, b in weights]) / len(weights)
            except RuntimeError as e:
                log.debug("cuBLASLt candidate for %s failed: %s", key, e)
                continue
            if us < best.us:
                best = Choice(op, algo, us, base)
        if best.op is None or best.us > base * (1 - self.margin):
            best = Choice(None, None, base, base)
            op.close()
        self.choices[key] = best
        return best

    def linear(self, kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        c = self.choices.get((kind, x.shape[0], w.shape[0], x.shape[1], b is not None, False))
        if c is None or c.op is None or not (x.is_contiguous() and w.is_contiguous()):
            return F.linear(x, w, b)
        return c.op(x, w, b, c.algo)

    def add_linear(self, kind: str, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
        """out += x @ w.T in place, by the algorithm `tune(..., accumulate=True)` kept (or addmm_)."""
        c = self.choices.get((kind, x.shape[0], w.shape[0], x.shape[1], False, True))
        if c is None or c.op is None or not (x.is_contiguous() and w.is_contiguous() and out.is_contiguous()):
            out.addmm_(x, w.t())
            return
        c.op(x, w, None, c.algo, out=out)

    def summary(self) -> dict[str, float]:
        """Tuned vs F.linear microseconds summed over the tuned shapes (for logs and the bench)."""
        return {"tuned_us": sum(c.us for c in self.choices.values()),
                "torch_us": sum(c.us_torch for c in self.choices.values()),
                "shapes": len(self.choices), "replaced": sum(c.op is not None for c in self.choices.values())}

    def close(self) -> None:
        for c in self.choices.values():
            if c.op is not None:
                c.op.close()
        self.choices.clear()
        if self.lib is not None and self.handle:
            self.lib.cublasLtDestroy(self.handle)
            self.handle = _vp()
