r"""KD + MLM with both LM heads fused in: the (N, V) logits of neither model ever exist.

Same definitions as `kernels.kd_mlm`, with s = x_s @ w_s.T + b_s and t = x_t @ w_t.T + b_t. The loss is the end of
the graph, so forward computes the gradients too, block of rows by block of rows, and backward only scales what
forward stored by the incoming gradients:

    per block of rows:  s, t  = x @ w.T + b into two reused fp32 buffers        (2 GEMMs, cuBLAS)
                        g     = d loss / d s, from the row kernel                (Triton, or its torch twin)
                        dx    = g @ w_s,   dw += g.T @ x_s,   db += sum_rows g  (2 GEMMs)

Four GEMMs in all, and O(block x V) memory. With `grad_weights=(a, b)` (training: what is backpropagated is
a * kd + b * mlm) the row kernel folds both gradients into one g, and there is one set of sums. Without it kd
and mlm may receive unrelated gradients: the MLM gradient of the labelled rows (about 15%) gets sums of its own,
two more GEMMs over those rows, and the op counts the labelled rows on the host (a sync).

On CUDA the GEMMs run in the heads' dtype with fp32 accumulation: logits come out of cuBLAS as fp32 (`out_dtype`
where torch has it, else a cast), the row kernel writes g once in the heads' dtype (fp16 scaled by a power of two
so small gradients are not flushed to zero, and unscaled by the GEMMs' alpha), dx is written in x's dtype and dw
accumulates in fp32. fp32 heads follow torch's matmul precision setting. On the CPU low-precision heads are
upcast once: there is no fast low-precision GEMM with an fp32 result there. Buffer rows are padded to a multiple
of 64 elements so that every row starts aligned.

Recomputing the logits in backward instead (as Cut Cross-Entropy does) would cost two more GEMMs and need the
LM-head weight in backward, when ZeRO-3 has already taken it away; this schedule needs nothing from the weight
after forward. Every row passed is projected: rows that need neither term (padding) cost their share of the
GEMMs and get zero gradients, so drop them before the call when they are many (distil_scale.losses.head_loss
does for MLM-only training). Backward may run once per forward: it scales the stored sums in place.

torch.compile: the autograd Function's Python-side block loop is not traced; expect one graph break at the call.
"""

from __future__ import annotations

import math

import torch

from kernels.contract import check_temperature, flat, padded_rows, padded_width, use_triton
from kernels.kd_mlm import TORCH_BLOCK_BYTES, check_row_inputs, kd_mlm_rows, mlm_slots, row_coefficients

# Bytes of one (rows, V) fp32 logits block on CUDA; two are alive at once, plus the gradient block.
CUDA_BLOCK_BYTES = 128 << 20
# Whether this process's torch runs low-precision GEMMs with an fp32 output (mm/addmm's out_dtype) on CUDA.
_FP32_OUT = {"cuda": True}


def default_chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per block so that one (rows, V) fp32 block stays within the device's budget."""
    cuda = device.type == "cuda"
    stride = padded_width(vocab)
    align = 128 if cuda else 16
    rows = (CUDA_BLOCK_BYTES if cuda else TORCH_BLOCK_BYTES) // (4 * max(stride, 1))
    return max(align, rows // align * align)


def compute_in_fp32(device: torch.device) -> bool:
    """Whether low-precision heads are upcast once before the blocks (the CPU has no fp32-output bf16 GEMM)."""
    return device.type != "cuda"


def _fp32_out_gemm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias, beta: float, alpha: float) -> bool:
    """out = beta * out + alpha * a @ b (+ bias) with low-precision a, b and an fp32 out; False if torch lacks it."""
    if not _FP32_OUT.get(out.device.type, False):
        return False
    try:
        if bias is not None:
            torch.addmm(bias, a, b, torch.float32, out=out)
        else:
            torch.addmm(out, a, b, torch.float32, beta=beta, alpha=alpha, out=out)
        return True
    except torch.OutOfMemoryError:
        raise
    except (TypeError, RuntimeError, NotImplementedError):  # a torch without addmm's out_dtype for these inputs
        _FP32_OUT[out.device.type] = False
        return False


def logits_into(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """out = x @ w.T + b, computed with fp32 accumulation into the fp32 buffer `out` (a padded view is fine)."""
    bias = None if b is None else b.float()
    if x.dtype == torch.float32:
        return torch.mm(x, w.T, out=out) if bias is None else torch.addmm(bias, x, w.T, out=out)
    if not _fp32_out_gemm(out, x, w.T, bias, 0.0, 1.0):
        out.copy_(x @ w.T)
        if bias is not None:
            out += bias
    return out


def grad_gemm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float, accumulate: bool) -> None:
    """out (+)= alpha * a @ b with fp32 accumulation; `out` is a's dtype, or fp32 for low-precision a and b."""
    beta = 1.0 if accumulate else 0.0
    if out.dtype == a.dtype:
        torch.addmm(out, a, b, beta=beta, alpha=alpha, out=out)
    elif not _fp32_out_gemm(out, a, b, None, beta, alpha):
        product = torch.mm(a, b).float()
        if accumulate:
            out.add_(product, alpha=alpha)
        else:
            torch.mul(product, alpha, out=out)


class _GradSums:
    """d loss / d (x, w, b) of one loss term: x rows in x's dtype (each written once), w and b summed in fp32."""

    def __init__(self, rows: int, x: torch.Tensor, w: torch.Tensor, need: tuple[bool, bool, bool]):
        self.x = torch.empty((rows, w.shape[1]), dtype=x.dtype, device=x.device) if need[0] else None
        self.w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need[1] else None
        self.b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need[2] else None

    def add(self, g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rows: slice, scale: float) -> None:
        """g: (rows, V) d loss / d logits times `scale`, of the block whose inputs are x (rows, H)."""
        if self.x is not None:
            grad_gemm(self.x[rows], g, w, alpha=1.0 / scale, accumulate=False)
        if self.w is not None:
            grad_gemm(self.w, g.T, x, alpha=1.0 / scale, accumulate=True)
        if self.b is not None:
            self.b.add_(g.sum(0, dtype=torch.float32), alpha=1.0 / scale)

    def scale_(self, factor: torch.Tensor) -> _GradSums:
        for grad in (self.x, self.w, self.b):
            if grad is not None:
                grad.mul_(factor)
        return self


def _g_scale(dtype: torch.dtype, rows: int, temperature: float, weights: tuple[float, float]) -> float:
    """The power of two fp16 gradients are stored times: each of the two terms then stays below rows / 2.

    A row's coefficient is at most max(T |a|, |b|) (one kd or labelled row in the call) and at least that over
    `rows`, so gradients of probability size keep their exponent in fp16. bf16 and fp32 need no scale.
    """
    if dtype != torch.float16:
        return 1.0
    peak = max(temperature * abs(weights[0]), abs(weights[1]), 1e-30)
    return 2.0 ** math.floor(math.log2(max(rows, 2) / (2 * peak)))


def _forward_blocks(ctx, xs, ws, bs, xt, wt, bt, labels, kd_mask, temperature, impl, chunk_rows, grad_weights):
    """The block loop of the forward: returns (kd, mlm) and leaves the gradient sums on ctx."""
    device, n = xs.device, xs.shape[0]
    vocab = ws.shape[0]
    kd_weight, kd_coef, mlm_weight = row_coefficients(labels, kd_mask, temperature)
    mlm_coef = mlm_weight
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bs is not None and ctx.needs_input_grad[2])
    main = mlm_sums = mlm_rows = slot = None
    if any(need):
        main = _GradSums(n, xs, ws, need)
        if grad_weights is None:  # kd and mlm may receive unrelated gradients: keep their sums apart
            mlm_rows, slot = mlm_slots(labels)
            mlm_sums = _GradSums(mlm_rows.numel(), xs, ws, need)
        else:  # one sum of a * d kd + b * d mlm
            kd_coef, mlm_coef = kd_coef * grad_weights[0], mlm_coef * grad_weights[1]
    scale = _g_scale(ws.dtype, n, temperature, grad_weights or (1.0, 1.0))
    step = min(chunk_rows or default_chunk_rows(vocab, device), max(n, 1))
    s_buf, t_buf = padded_rows(step, vocab, torch.float32, device), padded_rows(step, vocab, torch.float32, device)
    g_buf = None if main is None or ws.dtype == torch.float32 else padded_rows(step, vocab, ws.dtype, device)
    starts = list(range(0, n, step))
    # where each block's labelled rows begin in the compact list: one host sync for all blocks
    bounds = None if mlm_sums is None else torch.searchsorted(mlm_rows, torch.tensor([*starts, n], device=device))
    bounds = None if bounds is None else bounds.tolist()
    kl, ce = [], []
    for k, i in enumerate(starts):
        j = min(i + step, n)
        s = logits_into(s_buf[: j - i], xs[i:j], ws, bs)
        t = logits_into(t_buf[: j - i], xt[i:j], wt, bt)
        g = None if main is None else (s if g_buf is None else g_buf[: j - i])  # fp32: g overwrites s in place
        a = b = 0
        g_mlm = local = None
        if mlm_sums is not None:
            a, b = bounds[k], bounds[k + 1]
            g_mlm = torch.empty((b - a, vocab), dtype=torch.float32, device=device)
            local = (slot[i:j] - a).clamp(min=-1)
        block = kd_mlm_rows(
            s,
            t,
            labels[i:j],
            kd_coef[i:j],
            mlm_coef[i:j],
            temperature,
            impl=impl,
            g=g,
            g_scale=scale,
            fold_mlm=g is not None and mlm_sums is None,
            g_mlm=g_mlm,
            mlm_slot=local,
        )
        kl.append(block[0])
        ce.append(block[1])
        if main is not None:
            main.add(g, xs[i:j], ws, slice(i, j), scale)
        if mlm_sums is not None:
            x_rows = xs[i:j][mlm_rows[a:b] - i]
            mlm_sums.add((g_mlm * scale).to(ws.dtype), x_rows, ws, slice(a, b), scale)
    ctx.sums = (main, mlm_sums, mlm_rows)
    kl = torch.cat(kl) if kl else kd_weight[:0]
    ce = torch.cat(ce) if ce else mlm_weight[:0]
    return (kl * kd_weight).sum(), (ce * mlm_weight).sum()


class _LinearKdMlmLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, labels, kd_mask, temperature, impl, chunk_rows, grad_weights):
        width = ws.shape[1]
        ctx.like = (xs.shape, xs.dtype, ws.dtype, None if bs is None else bs.dtype)
        ctx.grad_weights = grad_weights
        use_triton(impl, xs.device)  # validates impl before any work
        xs2, xt2 = flat(xs, width), flat(xt, width)
        if compute_in_fp32(xs.device) and ws.dtype != torch.float32:
            xs2, ws, xt2, wt = xs2.float(), ws.float(), xt2.float(), wt.float()
        labels, kd_mask = labels.reshape(-1).long(), kd_mask.reshape(-1)
        return _forward_blocks(
            ctx, xs2, ws, bs, xt2, wt, bt, labels, kd_mask, temperature, impl, chunk_rows, grad_weights
        )

    @staticmethod
    def backward(ctx, grad_kd, grad_mlm):
        if ctx.sums is None:
            raise RuntimeError("linear_kd_mlm_loss: backward ran twice through one forward; recompute the loss instead")
        main, mlm_sums, mlm_rows = ctx.sums
        ctx.sums = None
        if main is None:
            return (None,) * 12
        x_shape, x_dtype, w_dtype, b_dtype = ctx.like
        if mlm_sums is None:
            main.scale_(_common_factor(grad_kd, grad_mlm, ctx.grad_weights))
        else:
            main.scale_(grad_kd)
            mlm_sums.scale_(grad_mlm)
            if main.x is not None:
                main.x.index_add_(0, mlm_rows, mlm_sums.x)
            if main.w is not None:
                main.w += mlm_sums.w
            if main.b is not None:
                main.b += mlm_sums.b
        grad_x = None if main.x is None else main.x.to(x_dtype).reshape(x_shape)
        grad_w = None if main.w is None else main.w.to(w_dtype)
        grad_b = None if main.b is None else main.b.to(b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def _common_factor(grad_kd: torch.Tensor, grad_mlm: torch.Tensor, weights: tuple[float, float]) -> torch.Tensor:
    """The factor f of (grad_kd, grad_mlm) = f * weights, checked on the device without a host sync.

    A broken promise raises at once on the CPU and as a device-side assert on CUDA.
    """
    a, b = weights
    in_ratio = torch.isclose(grad_kd * b, grad_mlm * a, rtol=1e-5, atol=1e-12 * (abs(a) + abs(b)))
    torch._assert_async(
        in_ratio,
        f"linear_kd_mlm_loss: called with grad_weights={weights}, but the gradients reaching kd and mlm are not in "
        f"that ratio; drop grad_weights or backpropagate {a} * kd + {b} * mlm",
    )
    return grad_kd / a if a != 0 else grad_mlm / b


def _same_dtype(
    side: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Under autocast, the head runs in the autocast dtype as nn.Linear would; otherwise x and w must agree."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
    if x.dtype != w.dtype:
        raise ValueError(
            f"linear_kd_mlm_loss: {side} x is {x.dtype} but w is {w.dtype}; cast them to one dtype or run under "
            "torch.autocast"
        )
    return x, w, b


def linear_kd_mlm_loss(
    student_x: torch.Tensor,
    student_w: torch.Tensor,
    student_b: torch.Tensor | None,
    teacher_x: torch.Tensor,
    teacher_w: torch.Tensor,
    teacher_b: torch.Tensor | None,
    labels: torch.Tensor,
    kd_mask: torch.Tensor,
    *,
    temperature: float,
    impl: str = "auto",
    chunk_rows: int | None = None,
    grad_weights: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kd, mlm) with both LM heads fused in: logits = x @ w.T + b are made a block of rows at a time.

    x is (..., H), w (V, H), b (V,) or None. Gradients for student_x, student_w and student_b are all computed
    in forward, so the weight is not needed after this call returns (what ZeRO-3 requires). `chunk_rows`
    overrides the rows per block (default: a 128 MB fp32 block on CUDA, 64 MB on the CPU).

    `grad_weights=(a, b)` promises that what is backpropagated is a * kd + b * mlm (times any factor), as in
    training. Forward then keeps one gradient sum instead of two and never syncs with the host; backward checks
    the promise on the device.
    """
    check_temperature(temperature)
    for side, x, w, b in (("student", student_x, student_w, student_b), ("teacher", teacher_x, teacher_w, teacher_b)):
        if w.dim() != 2 or x.shape[-1] != w.shape[1] or (b is not None and b.shape != (w.shape[0],)):
            bias = None if b is None else tuple(b.shape)
            raise ValueError(
                f"linear_kd_mlm_loss: {side} x {tuple(x.shape)}, w {tuple(w.shape)}, b {bias} do not make logits"
            )
    if teacher_w.shape[0] != student_w.shape[0] or teacher_x.shape[:-1] != student_x.shape[:-1]:
        raise ValueError(
            f"linear_kd_mlm_loss: teacher x {tuple(teacher_x.shape)} / w {tuple(teacher_w.shape)} do not match "
            f"student x {tuple(student_x.shape)} / w {tuple(student_w.shape)} in rows and vocabulary"
        )
    check_row_inputs("linear_kd_mlm_loss", labels, kd_mask, student_x.numel() // max(student_x.shape[-1], 1))
    if grad_weights is not None and (len(grad_weights) != 2 or not any(grad_weights)):
        raise ValueError(f"linear_kd_mlm_loss: grad_weights must be two numbers, not both 0, got {grad_weights}")
    student = _same_dtype("student", student_x, student_w, student_b)
    teacher = _same_dtype("teacher", teacher_x.detach(), teacher_w.detach(), teacher_b)
    teacher = (teacher[0], teacher[1], None if teacher[2] is None else teacher[2].detach())
    with torch.autocast(student_x.device.type, enabled=False):
        return _LinearKdMlmLoss.apply(
            *student,
            *teacher,
            labels,
            kd_mask,
            float(temperature),
            impl,
            chunk_rows,
            None if grad_weights is None else (float(grad_weights[0]), float(grad_weights[1])),
        )
