"""The per-tensor step of MetaOptimize as code, made from `rules.tensor_step`.

`Program` traces the step once (base update, trace, the terms h g of z) into straight-line code:
scalar code (hyperparameters, bias corrections; run on the host once per step) and elementwise
code over the tensor's streams (w, g, state, trace, alpha). The implementations of impl.py run it:

- `ForeachStep` (impl "foreach", any device): the elementwise code as `torch._foreach_*` passes,
  each written in place into a value that is dead by then, so a step allocates little;
- `c_source` + `load_kernel` (impl "fused" on CPU): the elementwise code as one C loop, compiled
  once with the system's C compiler (about a second; cached on disk), vectorised and threaded with
  OpenMP: each weight is read and written once, and z's partial sums come out of the same loop;
  for weight-wise blocks (z is the weight's own h g) the meta program runs in that loop too
  (`mo_step_meta`: alpha = exp(beta), step, z and the meta update of beta in one pass);
- `run_program` (impl "fused" on CUDA, under torch.compile): the elementwise code as plain torch
  ops, which inductor fuses into GPU kernels.

Why a generated C loop and not torch.compile (inductor) on CPU, measured 2026-12-07 on this
project's 2-core AMD EPYC VM (torch 2.14.1, gcc 12.2), CIFAR ResNet-18 set (62 tensors, 11.2 M
weights), (AdamW, Adam), scalar blocks, 1 thread, `python3 scripts/kernels_vs_inductor_cpu.py
--width 64` (fresh processes; empty kernel caches, then warm):
- first step (construction + first step): C loop 1.66 s empty cache / 1.33 s warm; inductor
  74.0 s / 12.9 s (foreach, for scale: 2.0 s / 1.4 s);
- steady step: C loop 11.7-16.6 ms; inductor 26.7-34.6 ms (51.8 ms in another run); foreach
  57.6-82.8 ms. Inductor's kernel has two loops per tensor (z's sum, then the update: h and g are
  read twice); the C loop does both in one pass;
- inductor on CPU needs a C++ compiler anyway (`torch._inductor.config.cpp.cxx`), so it removes no
  dependency; neither recompiles when lr changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import operator
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import rules
from .rules import tensor_step

# ---- the program ----------------------------------------------------------------------------------


class Sym:
    """A value while a `Program` is traced: the same for the whole tensor (scalar), or not."""

    __slots__ = ("prog", "id", "elem", "full")

    def __init__(self, prog, id, elem, full):
        self.prog, self.id, self.elem, self.full = prog, id, elem, full

    def __add__(self, o): return self.prog.emit("add", (self, o))
    def __radd__(self, o): return self.prog.emit("add", (o, self))
    def __sub__(self, o): return self.prog.emit("sub", (self, o))
    def __rsub__(self, o): return self.prog.emit("sub", (o, self))
    def __mul__(self, o): return self.prog.emit("mul", (self, o))
    def __rmul__(self, o): return self.prog.emit("mul", (o, self))
    def __truediv__(self, o): return self.prog.emit("div", (self, o))
    def __rtruediv__(self, o): return self.prog.emit("div", (o, self))
    def __neg__(self): return self.prog.emit("neg", (self,))
    def __pow__(self, o): return self.prog.emit("pow", (self, o))
    def __rpow__(self, o): return self.prog.emit("pow", (o, self))
    def sqrt(self): return self.prog.emit("sqrt", (self,))
    def sign(self): return self.prog.emit("sign", (self,))
    def relu(self): return self.prog.emit("relu", (self,))


_FLOAT_OPS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
              "neg": operator.neg, "pow": operator.pow, "sqrt": math.sqrt, "sign": rules.sign, "relu": rules.relu}


class Ref(int):
    """An operand that names a value (a plain float operand is a constant)."""


class Program:
    """An elementwise rule, traced: `fn(symbols) -> (outputs, reduced)` over full-size streams, a few
    broadcast inputs and scalars. Instructions are (value, op, operands); an operand is a `Ref` or a
    float constant. Elementwise values are `full` when they have the tensor's shape (alpha and what
    is made from it alone may be a 0-d tensor or broadcast). `outputs` are stored into the stream of
    the same name; `meta_grad` is the value whose sum over a block makes z (None if there is none)."""

    def __init__(self, fn, scalar_names, streams, broadcast=()):
        self.scalar_code, self.elem_code = [], []
        self.values: list[Sym] = []
        self.streams = list(streams)
        sym = {name: self._new(False, False) for name in scalar_names}
        sym.update({name: self._new(True, True) for name in self.streams})
        sym.update({name: self._new(True, False) for name in broadcast})
        self.inputs = {name: Ref(v.id) for name, v in sym.items()}
        outputs, reduced = fn(sym)
        self.outputs = {k: Ref(v.id) for k, v in outputs.items()}
        self.meta_grad = Ref(reduced.id) if reduced is not None else None
        self.track = self.meta_grad is not None
        used = {a for _, _, args in self.elem_code for a in args if isinstance(a, Ref)}
        self.scalar_args = [Ref(v.id) for v in self.values if not v.elem and v.id in used]
        self.last_use = {}
        for k, (_, _, args) in enumerate(self.elem_code):
            for a in args:
                if isinstance(a, Ref):
                    self.last_use[a] = k

    def _new(self, elem, full):
        v = Sym(self, len(self.values), elem, full)
        self.values.append(v)
        return v

    def emit(self, op, args):
        if not any(isinstance(a, Sym) for a in args):
            return _FLOAT_OPS[op](*args)
        syms = [a for a in args if isinstance(a, Sym)]
        out = self._new(any(a.elem for a in syms), any(a.full for a in syms))
        (self.elem_code if out.elem else self.scalar_code).append(
            (Ref(out.id), op, tuple(Ref(a.id) if isinstance(a, Sym) else float(a) for a in args)))
        return out

    def is_full(self, ref: Ref) -> bool:
        return self.values[ref].full

    def scalars(self, values: dict) -> list[float]:
        """Run the scalar code on host floats (values: name -> number); the values of `scalar_args`."""
        env = {self.inputs[k]: float(v) for k, v in values.items() if k in self.inputs}
        for out, op, args in self.scalar_code:
            env[out] = _FLOAT_OPS[op](*(env[a] if isinstance(a, Ref) else a for a in args))
        return [env[a] for a in self.scalar_args]


_PROGRAMS: dict = {}


STREAM_ORDER = ("w", "g", "momentum", "normalizer", "trace", "curvature")


def program(base, track: bool, curvature_kind: str | None = None) -> Program:
    """`rules.tensor_step` of a base rule traced (one per rule, trace or not, and Hessian term)."""
    key = ("step", base.name, track, curvature_kind)
    if key not in _PROGRAMS:
        inputs = ("w", "g", *base.state, *(("trace",) if track else ()), *(("curvature",) if curvature_kind else ()))

        def step(sym):
            w, state, trace, meta_grad = tensor_step(
                base, sym["w"], sym["g"], {k: sym[k] for k in base.state}, sym["trace"] if track else None,
                sym["alpha"], {k: sym[k] for k in ("lr", *base.hyperparameters)}, sym["t"], sym["gamma"],
                sym.get("curvature"), curvature_kind)
            return {"w": w, **state, **({"trace": trace} if track else {})}, meta_grad

        _PROGRAMS[key] = Program(step, ["gamma", "t", "lr", *base.hyperparameters],
                                 [s for s in STREAM_ORDER if s in inputs], broadcast=("alpha",))
    return _PROGRAMS[key]


def meta_program(meta) -> Program:
    """A meta rule traced: beta and its state from z, one block per element."""
    key = ("meta", meta.name)
    if key not in _PROGRAMS:
        def update(sym):
            beta, state = meta.rule(sym["beta"], sym["z"], {k: sym[k] for k in meta.state},
                                    {k: sym[k] for k in meta.hyperparameters}, sym["t"])
            return {"beta": beta, **state}, None

        _PROGRAMS[key] = Program(update, ["t", *meta.hyperparameters], ["beta", "z", *meta.state])
    return _PROGRAMS[key]


# ---- plain torch (under torch.compile) ---------------------------------------------------------

_TORCH_OPS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
              "neg": operator.neg, "sqrt": torch.sqrt, "sign": torch.sign, "relu": torch.relu}


def run_program(prog: Program, tensors: dict, alpha, scalars: list):
    """The elementwise code on one tensor's streams with plain torch ops; writes the outputs into
    their buffers and returns the terms h g (None without a trace)."""
    dtype = tensors["w"].dtype
    env = dict(zip(prog.scalar_args, scalars))
    env.update({prog.inputs[name]: t.to(dtype) for name, t in tensors.items()})
    env[prog.inputs["alpha"]] = alpha
    for out, op, args in prog.elem_code:
        env[out] = _TORCH_OPS[op](*(env[a] if isinstance(a, Ref) else a for a in args))
    for name, ref in prog.outputs.items():
        tensors[name].copy_(env[ref])
    return env[prog.meta_grad] if prog.track else None


def run_meta_program(prog: Program, tensors: dict, z, scalars: list):
    """A meta program on one tensor's weight-wise blocks with plain torch ops (z elementwise): writes
    beta and the meta state into their buffers, except where z is not finite (those keep theirs, as
    meta_update); returns how many weights did, as a device tensor."""
    env = dict(zip(prog.scalar_args, scalars))
    env.update({prog.inputs[name]: t for name, t in tensors.items()})
    env[prog.inputs["z"]] = z
    for out, op, args in prog.elem_code:
        env[out] = _TORCH_OPS[op](*(env[a] if isinstance(a, Ref) else a for a in args))
    finite = torch.isfinite(z)
    for name, ref in prog.outputs.items():
        tensors[name].copy_(torch.where(finite, env[ref], tensors[name]))
    return (~finite).sum()


# ---- foreach ------------------------------------------------------------------------------------


class ForeachStep:
    """The elementwise code as `torch._foreach_*` passes over a list of tensors that share their
    hyperparameters and step count."""

    name = "foreach"

    def __init__(self, prog: Program):
        self.prog = prog

    def __call__(self, streams: dict, alpha: list, scalar_values: dict, reduce=None):
        """streams: name -> list of tensors, updated in place; alpha: per tensor a 0-d tensor or a view
        that broadcasts against it. `reduce(h, g)` receives the two factors of z's terms when they are
        due (so that the caller can take dot products instead of making h g); without it the list of
        h g per tensor is returned (None without a trace)."""
        prog = self.prog
        dtype = streams["w"][0].dtype
        env = dict(zip(prog.scalar_args, prog.scalars(scalar_values)))
        env[prog.inputs["alpha"]] = alpha
        # values whose buffer a pass may overwrite once they are dead: temporaries, w and the state
        # buffers in the compute dtype (never g or alpha; low-precision state is read as a copy)
        writable = set()
        for name in prog.streams:
            ref, tensors = prog.inputs[name], streams[name]
            env[ref] = tensors if tensors[0].dtype == dtype else [x.to(dtype) for x in tensors]
            if name != "g":
                writable.add(ref)
        outputs = set(prog.outputs.values())

        def dead(a, k):
            return (isinstance(a, Ref) and a in writable and prog.is_full(a) and prog.last_use[a] == k
                    and a not in outputs)

        code, k = prog.elem_code, 0
        while k < len(code):
            out, op, args = code[k]
            vals = [env[a] if isinstance(a, Ref) else a for a in args]
            if out == prog.meta_grad and reduce is not None and op == "mul":
                reduce(*vals)
                k += 1
                continue
            nxt = code[k + 1] if k + 1 < len(code) else None
            if op == "mul" and nxt and nxt[1] in ("add", "sub") and nxt[2][-1] == out and prog.last_use[out] == k + 1 \
                    and dead(nxt[2][0], k + 1) and not any(isinstance(v, list) and not prog.is_full(a)
                                                          for a, v in zip(args, vals)):
                # x + b c, x - b c: one pass into x (addcmul, or add with a number), no temporary for b c
                target, sign = env[nxt[2][0]], 1.0 if nxt[1] == "add" else -1.0
                b, c = vals
                if isinstance(b, list) and isinstance(c, list):
                    torch._foreach_addcmul_(target, b, c, value=sign)
                else:
                    torch._foreach_add_(target, c if isinstance(c, list) else b,
                                        alpha=sign * (b if isinstance(c, list) else c))
                env[nxt[0]] = target
                writable.discard(nxt[2][0])
                writable.add(nxt[0])
                k += 2
                continue
            gone = [dead(a, k) for a in args]
            env[out] = _foreach(op, vals, gone)
            writable.difference_update(a for a, g in zip(args, gone) if g)
            writable.add(out)
            k += 1
        for name, ref in prog.outputs.items():
            if env[ref] is not streams[name]:
                torch._foreach_copy_(streams[name], env[ref])
        return env.get(prog.meta_grad) if prog.track and reduce is None else None


def _foreach(op, vals, dead):
    """One elementwise op over tensor lists (or a list and a number), written into a dead operand."""
    if op == "relu":
        out = vals[0] if dead[0] else [t.clone() for t in vals[0]]
        torch._foreach_clamp_min_(out, 0.0)
        return out
    if op in ("sqrt", "sign", "neg"):
        if dead[0]:
            getattr(torch, f"_foreach_{op}_")(vals[0])
            return vals[0]
        return list(getattr(torch, f"_foreach_{op}")(vals[0]))
    a, b = vals
    if not isinstance(a, list):  # number op list
        if op in ("add", "mul"):
            return _foreach(op, [b, a], [dead[1], False])
        x = b if dead[1] else [t.clone() for t in b]  # c - x = c + (-x);  c / x = c * (1/x)
        getattr(torch, "_foreach_neg_" if op == "sub" else "_foreach_reciprocal_")(x)
        getattr(torch, "_foreach_add_" if op == "sub" else "_foreach_mul_")(x, a)
        return x
    if dead[0]:
        getattr(torch, f"_foreach_{op}_")(a, b)
        return a
    if dead[1] and op in ("add", "mul"):
        getattr(torch, f"_foreach_{op}_")(b, a)
        return b
    if dead[1] and op == "div":  # a / b as (1 / b) a: no temporary
        torch._foreach_reciprocal_(b)
        torch._foreach_mul_(b, a)
        return b
    return list(getattr(torch, f"_foreach_{op}")(a, b))


# ---- fused C (CPU) ---------------------------------------------------------------------------

_C_OPS = {"add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}", "div": "{0} / {1}", "neg": "-{0}",
          "sqrt": "{sqrt}({0})",
          # selects that gcc vectorises; NaN falls through both tests and stays NaN, as in torch
          "sign": "{0} > 0 ? ({T})1 : ({0} < 0 ? ({T})-1 : {0})", "relu": "{0} < 0 ? ({T})0 : {0}"}
_C_TYPES = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "uint16_t"}
CHUNK = 1 << 15  # elements per unit of work: the streams of a chunk stay in the core's cache
EXP_BLOCK = 256  # weight-wise fused meta update: exp(beta) of this many weights ahead of the step's loop


def pieces(n: int, per: int = CHUNK) -> list[tuple[int, int]]:
    """The [lo, hi) ranges of at most `per` that cover range(n): the C loop's units of work."""
    return [(lo, min(n, lo + per)) for lo in range(0, n, per)]

_C_PRELUDE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
static inline float bf16_load(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t bf16_store(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u); return (uint16_t)(u >> 16);
}
"""


# glibc's vector exp (libmvec, linked by C_LIBS): without it gcc calls the scalar exp per element
_C_VECTOR_EXP = r"""
#if defined(__GLIBC__) && defined(__x86_64__)
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
double exp(double);
#endif
"""


def _c_body(prog: Program, ctype: str, stream_type: dict, names: dict, select: str = "{value}", index: str = "i",
            prefix: str = "") -> list[str]:
    """The loop body: load the streams, the elementwise code, store the outputs (at `index`); `select`
    wraps each stored value (it may name the stream's old value as {old}). Streams already in `names`
    are not loaded (their value is made by the caller); `prefix` keeps two programs' names apart."""
    lit = (lambda x: repr(float(x))) if ctype == "double" else (lambda x: repr(float(x)) + "f")

    def load(s):
        ptr = f"{prefix}{s}_p[{index}]"
        return f"bf16_load({ptr})" if stream_type[s] == "uint16_t" else f"({ctype}){ptr}"

    def store(s, value):
        return f"bf16_store({value})" if stream_type[s] == "uint16_t" else f"({stream_type[s]})({value})"

    names.update({ref: f"{prefix}s{k}" for k, ref in enumerate(prog.scalar_args)})
    loaded = [s for s in prog.streams if prog.inputs[s] not in names]
    names.update({prog.inputs[s]: f"{prefix}in_{s}" for s in loaded})
    body = [f"const {ctype} {prefix}in_{s} = {load(s)};" for s in loaded]
    for out, op, args in prog.elem_code:
        expr = _C_OPS[op].format(*(names[a] if isinstance(a, Ref) else lit(a) for a in args), T=ctype,
                                 sqrt="sqrt" if ctype == "double" else "sqrtf")
        names[out] = f"{prefix}v{out}"
        body.append(f"const {ctype} {prefix}v{out} = {expr};")
    return body + [f"{prefix}{s}_p[{index}] = {store(s, select.format(value=names[ref], old=f'{prefix}in_{s}'))};"
                   for s, ref in prog.outputs.items() if ref != prog.inputs.get(s)]


def _c_head(prog: Program, ctype: str, stream_type: dict, ptrs: str = "P", scalars: str = "S",
            prefix: str = "", offset: str = "") -> list[str]:
    head = [f"{stream_type[s]}* restrict {prefix}{s}_p = ({stream_type[s]}*){ptrs}[{k}]{offset};"
            for k, s in enumerate(prog.streams) if s in stream_type]
    return head + [f"const {ctype} {prefix}s{k} = ({ctype}){scalars}[{k}];" for k in range(len(prog.scalar_args))]


def c_source(prog: Program, kind: str, param_dtype: torch.dtype, state_dtype: torch.dtype,
             meta_dtype: torch.dtype = torch.float32, meta_prog: Program | None = None) -> str:
    """The C kernel of a step program for one block kind ("tensor", "nodewise", "weightwise") and dtypes.

    Arguments: chunks (tensor, begin, end) triples, in elements (in rows for nodewise); per tensor
    its stream pointers, the row of `scalars` it reads, where its alpha and z entries sit
    (`block_at`) and its row length; `meta_grad` gets one double per chunk (tensor blocks), one
    value per row (nodewise) or per weight (weightwise). alpha and z have `meta_dtype`.

    With `meta_prog` (weight-wise blocks only: z is the weight's own h g) the kernel is
    `mo_step_meta`: the meta update of each weight's beta and meta state runs in the same pass, from
    z in a register (z is not stored). Three more arguments: the flat meta streams (`meta_ptrs`, in
    `meta_prog.streams` order, z's slot unused), the meta scalars, and `skips`, one count per chunk
    of the weights whose z is not finite: they keep their beta and meta state (as meta_update)."""
    mtype = _C_TYPES[meta_dtype]
    ctype = "double" if param_dtype == torch.float64 else "float"
    stream_type = {s: _C_TYPES[param_dtype if s in ("w", "g") else state_dtype] for s in prog.streams}
    names = {prog.inputs["alpha"]: "alpha_v"}
    body = _c_body(prog, ctype, stream_type, names)
    mg = names[prog.meta_grad] if prog.track else None
    head = _c_head(prog, ctype, stream_type)
    # weight-wise: pointers offset once per chunk, so that the loop's accesses are contiguous in i
    # (indexed as block_at[t] + i, gcc makes gathers and scatters of them: several times slower)
    alpha_at = {"tensor": "block_at[t]", "nodewise": "block_at[t] + r", "weightwise": "i"}[kind]
    alpha_load = f"const {ctype} alpha_v = ({ctype})alpha_b[{alpha_at}];"
    indent = "\n            "
    fused_meta = meta_prog is not None
    if fused_meta and not (kind == "weightwise" and mg):
        raise ValueError("meta_prog: the meta update fuses into the step for weight-wise blocks with a trace only")
    if fused_meta:  # alpha = exp(beta) of this weight, before its meta update: no alpha stream
        meta_types = {s: mtype for s in meta_prog.streams if s != "z"}
        meta_names = {meta_prog.inputs["z"]: "mz"}
        # (z - z) == 0 is false for inf and NaN only (no -ffast-math), and vectorises
        meta_body = [f"const {mtype} mz = ({mtype}){mg};", "const int skip = !((mz - mz) == 0);",
                     *_c_body(meta_prog, mtype, meta_types, meta_names, select="skip ? {old} : {value}",
                              prefix="m"), "nskip += skip;"]
        # alpha = exp(beta) a block ahead, in its own loop: the vector exp is a call (libmvec), and
        # every vector register is caller-saved, so inside the step's loop the call spilled and reloaded
        # its constants and values each iteration (1 thread, ResNet-18 set: 7-12% of the step)
        alpha_load = f"const {ctype} alpha_v = alpha_buf[i - b0];"
        exp = "expf" if mtype == "float" else "exp"
        loop = f"""int64_t nskip = 0;
        {ctype} alpha_buf[{EXP_BLOCK}];
        for (int64_t b0 = lo; b0 < hi; b0 += {EXP_BLOCK}) {{
        const int64_t b1 = b0 + {EXP_BLOCK} < hi ? b0 + {EXP_BLOCK} : hi;
        #pragma omp simd
        for (int64_t i = b0; i < b1; ++i) alpha_buf[i - b0] = ({ctype}){exp}(mbeta_p[i]);
        #pragma omp simd reduction(+:nskip)
        for (int64_t i = b0; i < b1; ++i) {{
            {alpha_load}
            {indent.join(body + meta_body)}
        }}
        }}
        skips[c] = nskip;"""
        head += _c_head(meta_prog, mtype, meta_types, "meta_ptrs", "meta_scalars", prefix="m",
                        offset=" + block_at[t]")
    elif kind == "weightwise":
        stores = [f"meta_grad_b[i] = ({mtype}){mg};"] if mg else []
        loop = f"""#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) {{
            {alpha_load}
            {indent.join(body + stores)}
        }}"""
    else:
        reduce = " reduction(+:acc)" if mg else ""
        inner = f"""{ctype} acc = 0;
        #pragma omp simd{reduce}
        for (int64_t i = I0; i < I1; ++i) {{
            {indent.join(body + ([f"acc += {mg};"] if mg else []))}
        }}"""
        if kind == "tensor":
            loop = f"""{alpha_load}
        {inner.replace("I0", "lo").replace("I1", "hi")}
        {"meta_grad_d[c] = (double)acc;" if mg else "(void)acc;"}"""
        else:
            loop = f"""const int64_t len = row_len[t];
        for (int64_t r = lo; r < hi; ++r) {{
        {alpha_load}
        {inner.replace("I0", "r * len").replace("I1", "(r + 1) * len")}
        {f"meta_grad_f[block_at[t] + r] = ({mtype})acc;" if mg else "(void)acc;"}
        }}"""
    extra_args = (", void* const* restrict meta_ptrs, const double* restrict meta_scalars, int64_t* restrict skips"
                  if fused_meta else "")
    return _C_PRELUDE + (_C_VECTOR_EXP if fused_meta else "") + f"""
void {"mo_step_meta" if fused_meta else "mo_step"}(int64_t nchunks, const int64_t* restrict chunks,
             void* const* restrict ptrs, const double* restrict scalars, const int64_t* restrict scalar_row,
             const {mtype}* restrict alpha, const int64_t* restrict block_at, const int64_t* restrict row_len,
             void* restrict meta_grad, int nthreads{extra_args})
{{
    double* meta_grad_d = (double*)meta_grad;
    {mtype}* meta_grad_f = ({mtype}*)meta_grad;
    (void)meta_grad_d; (void)meta_grad_f; (void)row_len;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t c = 0; c < nchunks; ++c) {{
        const int64_t t = chunks[3 * c], lo = chunks[3 * c + 1], hi = chunks[3 * c + 2];
        void* const* P = ptrs + {len(prog.streams)} * t;
        const double* S = scalars + {max(1, len(prog.scalar_args))} * scalar_row[t];
        (void)S;
        const {mtype}* restrict alpha_b = alpha + ({"block_at[t]" if kind == "weightwise" else "0"});
        {mtype}* restrict meta_grad_b = meta_grad_f + ({"block_at[t]" if kind == "weightwise" else "0"});
        (void)meta_grad_b;
        {indent[:-4].join(head)}
        {loop}
    }}
}}
"""


def c_meta_source(prog: Program, dtype: torch.dtype) -> str:
    """The C kernel of a meta program: every block's beta and meta state from z in one pass; blocks
    whose `keep` byte is set (no gradient this step) keep their values."""
    ctype = _C_TYPES[dtype]
    stream_type = dict.fromkeys(prog.streams, ctype)
    body = _c_body(prog, ctype, stream_type, {}, select="keep ? {old} : {value}")  # a select: still vectorised
    indent = "\n        "
    return _C_PRELUDE + f"""
void mo_meta(int64_t n, void* const* restrict P, const double* restrict S, const uint8_t* restrict keep_mask,
             int nthreads)
{{
    {indent[:-4].join(_c_head(prog, ctype, stream_type))}
    #pragma omp parallel for simd schedule(static) num_threads(nthreads) if(n > 32768)
    for (int64_t i = 0; i < n; ++i) {{
        const int keep = keep_mask ? keep_mask[i] : 0;
        {indent.join(body)}
    }}
}}
"""


def cache_dir() -> Path:
    """Where compiled kernels are kept: $METAOPTIMIZE_CACHE, else $XDG_CACHE_HOME/metaoptimize, else
    ~/.cache/metaoptimize."""
    if os.environ.get("METAOPTIMIZE_CACHE"):
        return Path(os.environ["METAOPTIMIZE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "metaoptimize"


C_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared", "-std=c11"]
C_LIBS = ["-lm", *(["-lmvec"] if sys.platform == "linux" and platform.machine() == "x86_64" else [])]  # after the source
_LOADED: dict = {}
_ANNOUNCED = False


@functools.cache
def _machine_key(compiler: str) -> str:
    """The compiler's version and this CPU's features: a kernel built with -march=native for one
    machine must not be loaded on another (a shared home folder on a cluster)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = ""
    with contextlib.suppress(OSError, StopIteration):
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    return (version.splitlines()[0] if version else compiler) + "|" + flags


def compiler() -> str | None:
    """The C compiler the fused CPU step uses ($CC, else cc or gcc), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def load_kernel(source: str, name: str = "mo_step", pointers: int | None = None):
    """Compile `source` (or take it from the cache) and return its function `name`, whose arguments
    are an int64, `pointers` pointers and an int (the thread count); by default the count of the
    kernels here."""
    global _ANNOUNCED
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    key = hashlib.sha256("\0".join([source, _machine_key(cc), *C_FLAGS, *C_LIBS]).encode()).hexdigest()[:20]
    if key in _LOADED:
        return _LOADED[key]
    folder = cache_dir()
    path = folder / f"{name}_{key}.so"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=folder) as tmp:  # several ranks may compile at once
            src = Path(tmp) / "mo_step.c"
            src.write_text(source)
            out = Path(tmp) / "mo_step.so"
            result = subprocess.run([cc, *C_FLAGS, str(src), "-o", str(out), *C_LIBS], capture_output=True, text=True,
                                    timeout=600)
            if result.returncode != 0:
                raise RuntimeError(f"{cc} failed: {result.stderr.strip().splitlines()[-1:] or result.returncode}")
            os.replace(out, path)
        if not _ANNOUNCED:
            print(f"MetaOptimize: compiled the fused CPU step in {time.perf_counter() - start:.1f} s "
                  f"(cached in {folder})", file=sys.stderr)
            _ANNOUNCED = True
    fn = getattr(ctypes.CDLL(str(path)), name)
    fn.restype = None
    if pointers is None:
        pointers = {"mo_step": 8, "mo_step_meta": 8}.get(name, 3)  # mo_meta, around.py's around_copy: 3
    fn.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * pointers + [ctypes.c_int] \
        + ([ctypes.c_void_p] * 3 if name == "mo_step_meta" else [])
    _LOADED[key] = fn
    return fn
