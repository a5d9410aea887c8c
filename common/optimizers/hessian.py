"""The Hessian term of the trace (spec section 9, the paper's L-approximation).

With H the Hessian of this step's loss at w (before the update), the trace update keeps

    h <- gamma [(1 - kappa alpha) h - alpha P (H h)] - Delta

(`rules.tensor_step` applies it; P is the base rule's preconditioner). This module computes the
curvature term from the gradients' graph (`loss.backward(create_graph=True)`), by Pearlmutter's
trick: a Hessian-vector product H v is the gradient of g . v, one extra backward pass.

- hessian="hvp": H h, one product for all blocks (the "shared shift" approximation).
- hessian="block_diagonal": H_bb h_b, one product per block with the other blocks' traces zeroed;
  for weight-wise blocks that is diag(H) h, so the exact diagonal diag(H) is taken instead (one
  batched product per weight, hence DIAGONAL_LIMIT), and the rule multiplies it into h.
- rectify (weight-wise blocks only): IDBD's factor (1 - alpha H_ii)^+ in place of (1 - alpha H_ii).

Under torch.distributed the gradients and products are averaged across ranks here, as DDP's
reducer cannot take a double backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

HESSIANS = (None, "hvp", "block_diagonal")
DIAGONAL_LIMIT = 4096  # the exact Hessian diagonal costs one Hessian-vector product per weight


def check_hessian(hessian, rectify: bool, alg_meta: str, kind: str, params: list[Tensor]) -> None:
    """ValueError naming `hessian` or `rectify` unless they fit the meta rule and the block kind."""
    if hessian is None:
        if rectify:
            raise ValueError("rectify: needs hessian='block_diagonal' with weight-wise blocks")
        return
    if alg_meta == "fixed":
        raise ValueError("hessian: a fixed step size keeps no trace; use alg_meta other than 'fixed'")
    if hessian == "block_diagonal" and kind == "nodewise":
        raise ValueError("hessian='block_diagonal' is not available for nodewise blocks (one product per row); "
                         "use hessian='hvp'")
    if rectify and not (hessian == "block_diagonal" and kind == "weightwise"):
        raise ValueError("rectify: needs hessian='block_diagonal' with weight-wise blocks (IDBD)")
    if hessian == "block_diagonal" and kind == "weightwise":
        n = sum(p.numel() for p in params)
        if n > DIAGONAL_LIMIT:
            raise ValueError(f"hessian='block_diagonal' with weight-wise blocks takes the exact Hessian diagonal, "
                             f"one product per weight: {n:,} weights is over {DIAGONAL_LIMIT:,}; use 'hvp'")


def curvature_kind(hessian, rectify: bool, kind: str) -> str | None:
    """What the rule gets (rules.CURVATURE_KINDS): H h ("product") or diag(H) ("diagonal", "rectified")."""
    if hessian is None:
        return None
    if hessian == "block_diagonal" and kind == "weightwise":
        return "rectified" if rectify else "diagonal"
    return "product"


def curvature_terms(hessian, kind: str | None, params: list[Tensor], traces: list[Tensor], blocks: list[int],
              sharded: bool = False) -> list[Tensor]:
    """The curvature term per parameter (see the module docstring), from each p.grad's graph.

    `kind` is curvature_kind(...); `traces` are the parameters' traces h; `blocks` gives each
    parameter's first block (parameters in the same block share one product under block_diagonal)."""
    grads = [p.grad for p in params]
    if any(g.grad_fn is None for g in grads):
        raise RuntimeError(f"hessian={hessian!r} needs the gradient's graph: call "
                           "loss.backward(create_graph=True) (as for AdaHessian or Sophia), in the closure too")
    if sharded:
        raise RuntimeError(f"hessian={hessian!r} does not support sharded (FSDP) parameters")
    traces = [t.to(p.dtype) for t, p in zip(traces, params)]

    def hvp(vectors, batched=False):
        with torch.enable_grad():
            out = torch.autograd.grad(grads, params, grad_outputs=vectors, retain_graph=True, allow_unused=True,
                                      is_grads_batched=batched)
        return [torch.zeros_like(v) if h is None else h.detach() for h, v in zip(out, vectors)]

    if hessian == "hvp":
        products = hvp(traces)
    elif kind in ("diagonal", "rectified"):  # diag(H): one product per weight, batched
        sizes = [p.numel() for p in params]
        eye = torch.eye(sum(sizes), dtype=params[0].dtype, device=params[0].device)
        columns = hvp([c.reshape(-1, *p.shape) for c, p in zip(eye.split(sizes, dim=1), params)], batched=True)
        products = [col.reshape(len(eye), -1)[start:start + n].diagonal().reshape(p.shape)
                    for col, p, n, start in zip(columns, params, sizes, _starts(sizes))]
    else:  # block-diagonal: one product per block, with the trace of the other blocks zeroed
        products = [torch.zeros_like(t) for t in traces]
        for b in sorted(set(blocks)):
            masked = [t if blk == b else torch.zeros_like(t) for t, blk in zip(traces, blocks)]
            for k, h in enumerate(hvp(masked)):
                if blocks[k] == b:
                    products[k] = h
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        _average_across_ranks(grads + products)  # DDP's reducer cannot take a double backward
    return products


def _average_across_ranks(tensors):
    """Average the tensors over all ranks in one all-reduce (gloo has no AVG)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors([t.detach() for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for t, avg in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.detach().copy_(avg)


def _starts(sizes):
    out, total = [], 0
    for n in sizes:
        out.append(total)
        total += n
    return out
