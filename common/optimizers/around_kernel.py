"""The fused step of `MetaOptimizeAround` (spec section 10, steps 3-4 and z): one pass per tensor.

After the base's own step has left w1 in the weights, one elementwise program per tensor does

    u = w1 - w0;  w = w0 + alpha u;  h <- (gamma - gamma lr kappa alpha) h + alpha u;  z_b += h_old g

as a `kernels.Program`, so it runs on the project's fused-step machinery (impl.py): a generated C
loop on CPU (`CImpl`, each stream read and written once, z's partial sums from the same loop) and
torch.compile on CUDA (`CompiledImpl`, falling back to foreach as impl.py's does). z is summed from
p.grad after the base's step: torch's optimizers (and the third-party ones tested) leave the
gradient as it was; a base that changed p.grad in place would need impl="foreach".
"""

from __future__ import annotations

import ctypes
import warnings

import torch

from . import impl as _impl
from . import kernels
from .blocks import Layout
from .impl import CImpl, CompiledImpl, ForeachImpl

IMPLS = ("auto", "foreach", "fused")


def around_program(track: bool) -> kernels.Program:
    """Steps 3-4 of section 10 (and z's terms h g with h before this step) as a Program."""
    key = ("around", track)
    if key not in kernels._PROGRAMS:
        def step(sym):
            w0, alpha = sym["w0"], sym["alpha"]
            au = alpha * (sym["w"] - w0)
            out = {"w": w0 + au}
            if not track:
                return out, None
            h = sym["trace"]
            # the decay gamma (1 - alpha lr kappa), with gamma lr kappa made once on the host
            out["trace"] = h * (sym["gamma"] - sym["gamma"] * sym["lr"] * sym["weight_decay"] * alpha) + au
            return out, h * sym["g"]

        streams = ["w", "g", "w0", *(("trace",) if track else ())]
        kernels._PROGRAMS[key] = kernels.Program(step, ["gamma", "lr", "weight_decay"], streams, broadcast=("alpha",))
    return kernels._PROGRAMS[key]


_COPY_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif
/* w0 = w before the base's step, tensor by tensor: non-temporal stores (w0 is read back only
   after the base has streamed all its state, so caching it gains nothing) skip the write-allocate
   read of w0, a third of a plain copy's traffic. */
void around_copy(int64_t n, void* const* restrict dst, void* const* restrict src, const int64_t* restrict nbytes,
                 int nthreads)
{
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t t = 0; t < n; ++t) {
        char* restrict d = (char*)dst[t];
        const char* restrict s = (const char*)src[t];
        const int64_t m = nbytes[t];
        int64_t i = 0;
#ifdef __AVX__
        const int64_t head = (int64_t)((32 - ((uintptr_t)d & 31)) & 31);
        if (head > 0) { i = head < m ? head : m; memcpy(d, s, (size_t)i); }
        for (; i + 32 <= m; i += 32)
            _mm256_stream_si256((__m256i*)(d + i), _mm256_loadu_si256((const __m256i*)(s + i)));
#endif
        if (i < m) memcpy(d + i, s + i, (size_t)(m - i));
    }
#ifdef __AVX__
    _mm_sfence();
#endif
}
"""


class CopyKernel:
    """dst[k] = src[k] for contiguous tensors of one dtype, in one C call (CPU)."""

    def __init__(self):
        self.fn = kernels.load_kernel(_COPY_SOURCE, "around_copy")

    def __call__(self, dst: list, src: list) -> None:
        n = len(dst)
        ptr = ctypes.c_void_p * n
        d, s = ptr(*[t.data_ptr() for t in dst]), ptr(*[t.data_ptr() for t in src])
        nbytes = (ctypes.c_int64 * n)(*[t.numel() * t.element_size() for t in dst])
        self.fn(n, ctypes.addressof(d), ctypes.addressof(s), ctypes.addressof(nbytes), torch.get_num_threads())


class _ProgramForeach(ForeachImpl):
    """impl.py's foreach runner over the around program (the fused step's fallback)."""

    def __init__(self, prog: kernels.Program, layout: Layout):
        self.prog, self.layout, self.run = prog, layout, kernels.ForeachStep(prog)


class AroundCImpl(CImpl):
    """impl.py's C loop (CPU) over the around program: one call per step for all tensors of a dtype."""

    def __init__(self, prog: kernels.Program, layout: Layout, param_dtypes, meta_dtype):
        self.prog, self.layout, self.state_dtype = prog, layout, None
        self.fns = {dt: kernels.load_kernel(kernels.c_source(prog, layout.kind, dt, dt, meta_dtype))
                    for dt in set(param_dtypes)}
        self.meta_prog = None
        self.fallback = _ProgramForeach(prog, layout)
        self.fresh = [k for k, name in enumerate(prog.streams) if name in ("w", "g")]
        self._plans = {}
        self.copy = CopyKernel()

    def save(self, dst: list, src: list) -> None:
        """w0 = w: the C copy where every pair is contiguous and of one dtype, else torch's."""
        if all(a.is_contiguous() and b.is_contiguous() and a.dtype == b.dtype for a, b in zip(dst, src)):
            self.copy(dst, src)
        else:
            torch._foreach_copy_(dst, src)


class AroundCompiledImpl(CompiledImpl):
    """impl.py's torch.compile step (CUDA) over the around program."""

    def __init__(self, prog: kernels.Program, layout: Layout, strict: bool = False):
        self.prog, self.layout, self.strict = prog, layout, strict
        self._compiled, self._fallback = {}, None

    @staticmethod
    def save(dst: list, src: list) -> None:
        torch._foreach_copy_(dst, src)

    def _fail(self, err, items, alpha, gamma, z):
        why = f"the compiled step (torch.compile) failed: {type(err).__name__}: {err}"
        if self.strict:
            raise RuntimeError(f"impl='fused': {why}") from err
        warnings.warn(f"MetaOptimizeAround: using the foreach step because {why}", stacklevel=4)
        self._fallback = _ProgramForeach(self.prog, self.layout)
        self._fallback.step(items, alpha, gamma, z)


def make_around_impl(impl: str, track: bool, layout: Layout, device: torch.device, param_dtypes, meta_dtype):
    """The fused step for `impl` on this device, or None for the foreach path of around.py; "auto"
    falls back to foreach with one warning that says why, "fused" raises (impl.pick_fused)."""
    prog = around_program(track) if impl != "foreach" else None
    return _impl.pick_fused(impl, device, param_dtypes, lambda: AroundCImpl(prog, layout, param_dtypes, meta_dtype),
                            lambda strict: AroundCompiledImpl(prog, layout, strict=strict), who="MetaOptimizeAround")
