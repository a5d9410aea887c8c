"""The step implementations side by side: one signature, one state form.

Each takes the tensors that have a gradient this step and does steps 2-4 of spec section 2 for
them (the base update, the trace, the terms of z), writing z per block into a flat buffer:

    impl.step(items, alpha, gamma, z)

    items  a `TensorStep` per tensor
    alpha  exp(beta), one entry per block (flat: tensor blocks, rows, or weights); float32, or
           float64 when a parameter is float64
    z      like alpha, zeroed by the caller; gets sum_{i in block} h_i g_i

"foreach" runs anywhere; "fused" is a compiled C loop on CPU and torch.compile on CUDA.
"""

from __future__ import annotations

import ctypes
import functools
import subprocess
import types
import warnings
from typing import NamedTuple

import torch

from . import kernels
from .blocks import Layout
from .kernels import CHUNK, ForeachStep, program

IMPLS = ("auto", "foreach", "fused")
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


class TensorStep(NamedTuple):
    """What a step implementation gets for one tensor with a gradient this step."""

    index: int  # the tensor's place in the optimizer's parameter list (and its layout)
    weight: torch.Tensor  # w, stepped in place (a complex parameter's real view)
    grad: torch.Tensor
    state: dict  # the rule's tensors ("momentum", "normalizer"), "trace", and "curvature" (spec section 9) if asked
    hyperparameters: dict  # lr and the base rule's, of the tensor's param group (one dict per group)
    step_count: int  # t: the steps this tensor has taken, this one included


def keep_nonfinite(z, keep, skipped):
    """The uint8 `keep` mask of the meta update (set: the block keeps its beta and meta state; None:
    no block does) with the blocks whose z is not finite added, counted in `skipped` (a device int64
    scalar; no host sync)."""
    bad = ~torch.isfinite(z)
    skipped += bad.sum()
    return bad.to(torch.uint8) if keep is None else keep | bad.to(torch.uint8)


def meta_update(meta, beta, z, meta_state: dict, hp: dict, t: int, keep=None) -> None:
    """Step 5 in place as torch ops (any device): beta and its meta state from z by the meta rule `meta`
    (a rules.META_RULES entry); blocks where `keep` (uint8, see keep_nonfinite) is set keep theirs."""
    new_beta, new_state = meta.rule(beta, z, meta_state, hp, t)
    kept = keep.view(torch.bool) if keep is not None else None  # 0/1 bytes: the same memory read as bool
    for buf, new in ((beta, new_beta), *((meta_state[k], v) for k, v in new_state.items())):
        if kept is None:
            buf.copy_(new)
        else:
            torch.where(kept, buf, new, out=buf)


class _TorchMetaUpdate:
    """The meta update of the torch implementations (foreach, compiled): `meta_update`'s torch ops."""

    meta = None  # the meta rule

    def meta_update(self, beta, z, meta_state: dict, hp: dict, t: int, keep=None) -> None:
        """Step 5 for every block: beta and its state from z; blocks where `keep` (uint8) is set keep theirs."""
        meta_update(self.meta, beta, z, meta_state, hp, t, keep)


def _subsets(items):
    """Items grouped by (hyperparameters, step count, dtype): one foreach call each."""
    out: dict = {}
    for item in items:
        out.setdefault((id(item.hyperparameters), item.step_count, item.weight.dtype), []).append(item)
    return out.values()


def _streams(prog, subset):
    streams = {"w": [it.weight for it in subset], "g": [it.grad for it in subset]}
    for name in prog.streams[2:]:
        streams[name] = [it.state[name] for it in subset]
    return streams


def _scalar_values(subset, gamma):
    return {**subset[0].hyperparameters, "t": subset[0].step_count, "gamma": gamma}


@functools.lru_cache(maxsize=256)
def _index(blocks: tuple, device: torch.device) -> torch.Tensor:
    """A block-index tensor, made once (a host-to-device copy each step would synchronise)."""
    return torch.tensor(blocks, device=device)


def _reduce_into(layout, z, indices, h, g=None):
    """Write the terms h g of the tensors `indices` (into the layout) into z: summed per block, per
    row, or as they are (g None: h holds the products already)."""
    if layout.kind == "tensor":
        sums = [torch.dot(a.reshape(-1), b.reshape(-1)) if g is not None else a.sum()
                for a, b in zip(h, g if g is not None else h)]
        z.index_add_(0, _index(tuple(layout.starts[i] for i in indices), z.device), torch.stack(sums).to(z.dtype))
        return
    for k, i in enumerate(indices):
        x = h[k] * g[k] if g is not None else h[k]
        if layout.kind == "nodewise" and x.dim() > 1:
            x = x.sum(dim=tuple(range(1, x.dim())))
        view = layout.view(z, i)
        view.copy_(x.view(view.shape))


class ForeachImpl(_TorchMetaUpdate):
    name = "foreach"

    def __init__(self, base, track: bool, layout: Layout, curvature_kind=None, meta=None):
        self.prog, self.layout, self.meta = program(base, track, curvature_kind), layout, meta
        self.run = ForeachStep(self.prog)

    def step(self, items, alpha, gamma, z):
        for subset in _subsets(items):
            alphas = [self.layout.view(alpha, it.index) for it in subset]

            def reduce(h, g, subset=subset):  # z's terms h g, reduced as the block kind needs
                _reduce_into(self.layout, z, [it.index for it in subset], h, g)

            self.run(_streams(self.prog, subset), alphas, _scalar_values(subset, gamma), reduce)

    def reset(self):
        pass


class CImpl:
    """The fused C loop (CPU): one call per step for all tensors of a dtype, and the meta update in one C pass."""

    name = "fused"

    def __init__(self, base, track: bool, layout: Layout, param_dtypes, state_dtype, meta_dtype, curvature_kind=None,
                 meta=None):
        self.prog, self.layout, self.state_dtype = program(base, track, curvature_kind), layout, state_dtype
        self.meta_prog = kernels.meta_program(meta) if meta is not None and meta.rule is not None else None

        def build(dt, meta_prog=None):
            return kernels.load_kernel(kernels.c_source(self.prog, layout.kind, dt, state_dtype or dt, meta_dtype,
                                                        meta_prog), "mo_step_meta" if meta_prog else "mo_step")

        # weight-wise: z is each weight's own h g, so its meta update runs in the step's pass (step_with_meta)
        self.fuses_meta = layout.kind == "weightwise" and track and self.meta_prog is not None
        if self.fuses_meta:
            self.meta_fns = {dt: build(dt, self.meta_prog) for dt in set(param_dtypes)}
        self._build = build
        self.fns = {} if self.fuses_meta else {dt: build(dt) for dt in set(param_dtypes)}
        if self.meta_prog is not None:  # the meta update in one pass over the blocks
            self.meta_fn = kernels.load_kernel(kernels.c_meta_source(self.meta_prog, meta_dtype), "mo_meta")
        self.fallback = ForeachImpl(base, track, layout, curvature_kind)
        # streams read anew every step (the others are our state tensors: their pointers are kept)
        self.fresh = [k for k, name in enumerate(self.prog.streams) if name in ("w", "g", "curvature")]
        self._plans = {}

    def reset(self):
        """Forget cached pointers (the state tensors were replaced)."""
        self._plans.clear()

    def _plan(self, items):
        key = tuple(it.index for it in items)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        layout, nstreams = self.layout, len(self.prog.streams)
        chunks, chunk_block = [], []
        for k, it in enumerate(items):
            i, w = it.index, it.weight
            if layout.kind == "nodewise":
                rows = layout.units[i]
                per = max(1, CHUNK // max(1, w.numel() // max(1, rows)))  # zero-size tensors: no rows
                units = kernels.pieces(rows, per)
            else:
                units = kernels.pieces(w.numel())
            for lo, hi in units:
                chunks += [k, lo, hi]
                chunk_block.append(layout.starts[i])
        n = len(items)
        plan = {
            "nchunks": len(chunks) // 3,
            "chunks": (ctypes.c_int64 * max(1, len(chunks)))(*chunks),
            "ptrs": (ctypes.c_void_p * (n * nstreams))(),
            "block_at": (ctypes.c_int64 * n)(*[layout.starts[it.index] for it in items]),
            "row_len": (ctypes.c_int64 * n)(*[it.weight.numel() // max(1, layout.units[it.index]) for it in items]),
            "scalar_row": (ctypes.c_int64 * n)(),
            "chunk_block": torch.tensor(chunk_block, dtype=torch.long),
            "partials": torch.zeros(max(1, len(chunks) // 3), dtype=torch.float64),
            "skips": torch.zeros(max(1, len(chunks) // 3), dtype=torch.int64),
            "rows": {},
        }
        # state and trace pointers are fixed for the plan's life; w, g and curvature are read every step
        for k, it in enumerate(items):
            for s, name in enumerate(self.prog.streams):
                if s not in self.fresh:
                    plan["ptrs"][k * nstreams + s] = it.state[name].data_ptr()
        self._plans[key] = plan
        return plan

    def _contiguous(self, items) -> bool:
        """Whether the C loop takes these tensors: every stream contiguous, g of w's dtype."""
        return all(it.weight.is_contiguous() and it.grad.is_contiguous() and it.grad.dtype == it.weight.dtype
                   and all(it.state[n].is_contiguous() for n in self.prog.streams[2:]) for it in items)

    def step(self, items, alpha, gamma, z):
        if not self._contiguous(items):
            return self.fallback.step(items, alpha, gamma, z)
        by_dtype: dict = {}
        for it in items:
            by_dtype.setdefault(it.weight.dtype, []).append(it)
        for dtype, group in by_dtype.items():
            if dtype not in self.fns:  # the plain step of a kernel that fuses the meta update (sharding)
                self.fns[dtype] = self._build(dtype)
            self._run(self.fns[dtype], group, alpha, gamma, z)

    def fused_meta_ready(self, items) -> bool:
        """Whether step_with_meta takes these tensors (else: step, then meta_update)."""
        return self.fuses_meta and self._contiguous(items)

    def step_with_meta(self, items, gamma, beta, meta_state: dict, hp: dict, t: int, skipped) -> list:
        """Steps 1-5 in one pass per weight (weight-wise blocks): alpha = exp(beta), the base update, the trace, z = h g
        and the meta update of that weight's beta and meta state. Blocks of tensors without a
        gradient are not visited, so they keep theirs; a weight whose z is not finite keeps its beta
        and meta state and is counted in `skipped` (the optimizer's device int64 counter)."""
        streams = {"beta": beta, **meta_state}
        prog = self.meta_prog
        meta_ptrs = (ctypes.c_void_p * len(prog.streams))(
            *[streams[name].data_ptr() if name != "z" else None for name in prog.streams])
        values = prog.scalars({**hp, "t": t}) or [0.0]
        meta_scalars = (ctypes.c_double * len(values))(*values)
        by_dtype: dict = {}
        for it in items:
            by_dtype.setdefault(it.weight.dtype, []).append(it)
        for dtype, group in by_dtype.items():
            plan = self._plan(group)
            self._run(self.meta_fns[dtype], group, beta, gamma, None,  # (alpha: unused, made from beta)
                      (ctypes.addressof(meta_ptrs), ctypes.addressof(meta_scalars), plan["skips"].data_ptr()))
            skipped += plan["skips"][:plan["nchunks"]].sum()
        return []  # every item stepped

    def _run(self, fn, items, alpha, gamma, z, extra=()):
        plan, prog = self._plan(items), self.prog
        nstreams, ptrs, scalar_row = len(prog.streams), plan["ptrs"], plan["scalar_row"]
        rows, values = {}, []
        names = prog.streams
        for k, it in enumerate(items):
            ptrs[k * nstreams] = it.weight.data_ptr()
            ptrs[k * nstreams + 1] = it.grad.data_ptr()
            for s in self.fresh[2:]:
                ptrs[k * nstreams + s] = it.state[names[s]].data_ptr()
            key = (id(it.hyperparameters), it.step_count)
            row = rows.get(key)
            if row is None:
                row = rows[key] = len(rows)
                values += prog.scalars({**it.hyperparameters, "t": it.step_count, "gamma": gamma}) or [0.0]
            scalar_row[k] = row
        scalars = (ctypes.c_double * len(values))(*values)
        out = plan["partials"] if self.layout.kind == "tensor" or z is None else z
        fn(plan["nchunks"], ctypes.addressof(plan["chunks"]), ctypes.addressof(ptrs), ctypes.addressof(scalars),
           ctypes.addressof(scalar_row), alpha.data_ptr(), ctypes.addressof(plan["block_at"]),
           ctypes.addressof(plan["row_len"]), out.data_ptr() if out is not None else None, torch.get_num_threads(),
           *extra)
        if prog.track and self.layout.kind == "tensor" and z is not None:
            z.index_add_(0, plan["chunk_block"], plan["partials"].to(z.dtype))

    def meta_update(self, beta, z, meta_state: dict, hp: dict, t: int, keep=None) -> None:
        """Step 5 for every block in one C pass: beta and its state from z; blocks where `keep` (uint8)
        is set keep theirs."""
        prog = self.meta_prog
        streams = {"beta": beta, "z": z, **meta_state}
        ptrs = (ctypes.c_void_p * len(prog.streams))(*[streams[name].data_ptr() for name in prog.streams])
        values = prog.scalars({**hp, "t": t}) or [0.0]
        scalars = (ctypes.c_double * len(values))(*values)
        self.meta_fn(beta.numel(), ctypes.addressof(ptrs), ctypes.addressof(scalars),
                     keep.data_ptr() if keep is not None else None, torch.get_num_threads())


# test hooks, private: the compiled step on CPU, and the backend torch.compile uses
_FORCE_COMPILED = False
_COMPILE_BACKEND = "inductor"


def _one_tensor_step(prog, kind):
    """The program over one tensor's streams (returns its z terms: summed for tensor blocks)."""

    def step(tensors, alpha, scalars):
        meta_grad = kernels.run_program(prog, tensors, alpha, scalars)
        if meta_grad is not None and kind == "tensor":
            return meta_grad.sum()
        return meta_grad  # nodewise rows are summed outside (an inductor KeyError on row sums)

    return step


def _one_tensor_step_with_meta(prog, meta_prog):
    """Weight-wise blocks: alpha = exp(beta), the program, and the meta update from each weight's own
    z = h g, in one function (inductor fuses them); returns the count of weights with z not finite."""

    def step(tensors, meta_tensors, scalars, meta_scalars):
        beta = meta_tensors["beta"]
        meta_grad = kernels.run_program(prog, tensors, torch.exp(beta), scalars)
        return kernels.run_meta_program(meta_prog, meta_tensors, meta_grad.to(beta.dtype), meta_scalars)

    return step


def _tensors(prog, it: TensorStep) -> dict:
    """A tensor's streams for its compiled function, detached: the same tensor kind (no Parameter, no
    requires_grad) for the copies of the first call and the real calls."""
    return {"w": it.weight.detach(), "g": it.grad.detach(), **{n: it.state[n].detach() for n in prog.streams[2:]}}


def _step_scalars(prog, cache: dict, it: TensorStep, gamma) -> list:
    """The program's scalars for a tensor's step, made once per (param group, step count)."""
    key = (id(it.hyperparameters), it.step_count)
    values = cache.get(key)
    if values is None:
        values = cache[key] = prog.scalars({**it.hyperparameters, "t": it.step_count, "gamma": gamma})
    return values


class CompiledImpl(_TorchMetaUpdate):
    """The program under torch.compile (CUDA): inductor generates each tensor's fused kernel.

    One compiled function per (shapes, dtypes, strides) of a tensor's streams, each with its own
    code object: dynamo's cache limit (8) counts per code object, so functions sharing one (or one
    per subset of tensors with gradients) would silently fall to eager. dynamic=None: the scalars
    (lr, bias corrections) become symbolic at their first change, one recompile per function.

    A function's first call runs on copies of the tensors, so a failure to compile or run it
    leaves the state untouched; then the step goes on with foreach for the rest of the run (one
    warning), or raises (strict, impl="fused")."""

    def __init__(self, base, track: bool, layout: Layout, curvature_kind=None, strict: bool = False, meta=None):
        self.prog, self.layout, self.strict, self.meta = program(base, track, curvature_kind), layout, strict, meta
        self._args = (base, track, layout, curvature_kind)
        self._compiled = {}
        self._fallback = None
        fuse = layout.kind == "weightwise" and track and meta is not None and meta.rule is not None
        self.meta_prog = kernels.meta_program(meta) if fuse else None

    @property
    def fuses_meta(self):
        return self.meta_prog is not None and self._fallback is None

    def fused_meta_ready(self, items) -> bool:
        return self.fuses_meta

    def step_with_meta(self, items, gamma, beta, meta_state: dict, hp: dict, t: int, skipped) -> list:
        """Steps 1-5 per tensor in one compiled function (weight-wise blocks; see CImpl.step_with_meta).
        Every function is built (on copies) before any tensor is stepped. If a build or a call fails,
        the run goes on with foreach (one warning) and the items not stepped are returned (the caller
        takes the separate step and meta update for them); [] when all were."""
        prog, layout = self.prog, self.layout
        meta_scalars = self.meta_prog.scalars({**hp, "t": t})
        scalars, calls = {}, []
        for it in items:
            tensors = _tensors(prog, it)
            meta_tensors = {name: layout.view(meta_state[name] if name != "beta" else beta, it.index)
                            for name in self.meta_prog.streams if name != "z"}
            values = _step_scalars(prog, scalars, it, gamma)
            key = ("meta", *((x.shape, x.dtype, x.stride()) for x in (*tensors.values(), *meta_tensors.values())))
            if key not in self._compiled:
                try:
                    self._build(key, tensors, meta_tensors, values, meta_scalars)
                except Exception as err:  # as in step: any failure of dynamo, inductor, triton or the driver
                    self._give_up(err)
                    return items
            calls.append((self._compiled[key], tensors, meta_tensors, values))
        for k, (fn, tensors, meta_tensors, values) in enumerate(calls):
            try:
                skipped += fn(tensors, meta_tensors, values, meta_scalars)
            except Exception as err:  # a later call (a recompile) failed, before it wrote: the rest to foreach
                self._give_up(err)
                return items[k:]
        return []

    @property
    def name(self):
        return "fused" if self._fallback is None else "foreach"

    def reset(self):
        pass

    def _build(self, key, tensors, alpha, scalars, meta_scalars=None):
        """alpha: the tensor's alpha view, or (with meta_scalars) its beta and meta state views."""
        step = _one_tensor_step(self.prog, self.layout.kind) if meta_scalars is None \
            else _one_tensor_step_with_meta(self.prog, self.meta_prog)
        code = step.__code__.replace(co_name=f"metaoptimize_step_{len(self._compiled)}")
        fn = types.FunctionType(code, step.__globals__, code.co_name, None, step.__closure__)
        fn = torch.compile(fn, dynamic=None, backend=_COMPILE_BACKEND)
        copies = {name: t.clone() for name, t in tensors.items()}
        extra = () if meta_scalars is None else (meta_scalars,)
        if meta_scalars is not None:
            alpha = {name: t.clone() for name, t in alpha.items()}
        fn(copies, alpha, scalars, *extra)  # compiles and runs, writing only copies
        if scalars:  # and the recompile with symbolic scalars that the next step would make
            fn(copies, alpha, [v + 0.5 for v in scalars], *[[v + 0.5 for v in x] for x in extra])
        self._compiled[key] = fn
        return fn

    def step(self, items, alpha, gamma, z):
        if self._fallback is not None:
            return self._fallback.step(items, alpha, gamma, z)
        prog, layout = self.prog, self.layout
        scalars, done, out = {}, [], []
        for k, it in enumerate(items):
            tensors = _tensors(prog, it)
            view = layout.view(alpha, it.index)
            values = _step_scalars(prog, scalars, it, gamma)
            key = (tuple(view.shape), view.dtype, *((x.shape, x.dtype, x.stride()) for x in tensors.values()))
            fn = self._compiled.get(key)
            if fn is None:
                try:
                    fn = self._build(key, tensors, view, values)
                except Exception as err:  # any failure of dynamo, inductor, triton or the driver
                    if done and prog.track:
                        _reduce_into(layout, z, done, out)
                    return self._fail(err, items[k:], alpha, gamma, z)
            try:
                meta_grad = fn(tensors, view, values)
            except Exception as err:  # a later call: a recompile (new guards) fails before it writes
                if done and prog.track:
                    _reduce_into(layout, z, done, out)
                return self._fail(err, items[k:], alpha, gamma, z)
            if prog.track:
                done.append(it.index)
                out.append(meta_grad)
        if done and prog.track:
            _reduce_into(layout, z, done, out)

    def _fail(self, err, items, alpha, gamma, z):
        """The compiled step failed on its first call, or a later one, for some tensors (their state
        untouched): they, and every later step, go to foreach."""
        self._give_up(err)
        self._fallback.step(items, alpha, gamma, z)

    def _give_up(self, err):
        why = f"the compiled step (torch.compile) failed: {type(err).__name__}: {err}"
        if self.strict:
            raise RuntimeError(f"impl='fused': {why}") from err
        warnings.warn(f"MetaOptimize: using impl='foreach' because {why}", stacklevel=5)
        self._fallback = ForeachImpl(*self._args)


def pick_fused(impl: str, device: torch.device, dtypes, make_c, make_compiled, who: str = "MetaOptimize"):
    """The fused step `impl` asks for on this device: `make_c()` on CPU (the generated C loop),
    `make_compiled(strict)` on CUDA (torch.compile; a failure at its first call falls back then, or
    raises when strict); None for foreach (impl="foreach", another device, or "auto" where the fused
    step cannot run: then with one warning that says why). impl="fused" raises where it cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"impl: unknown value {impl!r}; accepted: {', '.join(IMPLS)}")
    if impl == "foreach" or device.type not in ("cpu", "cuda"):
        return None
    why = None
    if not set(dtypes) <= set(FUSED_DTYPES):
        why = f"dtypes {sorted(str(d) for d in set(dtypes) - set(FUSED_DTYPES))} are not supported by the fused step"
    elif device.type == "cpu" and not _FORCE_COMPILED:
        try:
            return make_c()
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            why = f"the fused CPU step could not be built: {err}"
    else:
        try:
            if device.type == "cuda":
                import triton  # noqa: F401  (torch.compile's GPU backend)
        except ImportError:
            why = "torch.compile needs triton on CUDA"
        else:
            return make_compiled(impl == "fused")
    if impl == "fused":
        raise RuntimeError(f"impl='fused' is not available: {why}")
    warnings.warn(f"{who}: using impl='foreach' because {why}", stacklevel=4)
    return None


def make_impl(impl: str, base, track: bool, layout: Layout, device: torch.device, param_dtypes, state_dtype,
              meta_dtype=torch.float32, curvature_kind=None, meta=None):
    """The implementation `impl` asks for on this device (see pick_fused): the fused step where it
    runs, else foreach."""
    dtypes = set(param_dtypes) | ({state_dtype} if state_dtype is not None else set())
    fused = pick_fused(impl, device, dtypes,
                       lambda: CImpl(base, track, layout, param_dtypes, state_dtype, meta_dtype, curvature_kind, meta),
                       lambda strict: CompiledImpl(base, track, layout, curvature_kind, strict=strict, meta=meta))
    return fused if fused is not None else ForeachImpl(base, track, layout, curvature_kind, meta)
