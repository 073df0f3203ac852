"""Label Smoothing++ (Section 3.2 of the paper): a learned K x K C-matrix of non-target targets.

For each class y the C logits hold K-1 values; their softmax, with a zero inserted at
position y, is row C[y]. The target is t = (1 - alpha) * onehot(y) + alpha * C[y], and

    loss = 1/2 * [ H(sg(t), p) + H(sg(p), t) ],   H(a, b) = -sum a * log b,

so the network is trained only by the first term and C only by the second. The paper's
equation has no 1/2; the authors' released code averages the two terms, and so do we.
Everything is computed in float32 and in log space (log t is exact, never log(t + eps)).
Two forms compute the terms: lspp_terms_reference, the definition in plain autograd, and the
fused node _LSPPTerms with its gradients written out (the default, LSPPLoss(fused=True));
tests/test_lspp.py checks one against the other.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kd import cmatrix, runs
from kd.metrics import c_movement
from kd.sources import SourceContext, TargetSource, fraction, spec_number


class LSPPLoss(TargetSource):
    """LS++ loss with its learnable C; the (K, K-1) logits are its only parameter."""

    name = "lspp"
    summary = "Label Smoothing++: targets (1 - alpha) onehot + alpha C[y], C learned with the network (--alpha, default 0.1)"
    spec_arg = "[ALPHA]"
    label_only = True
    options = (fraction("alpha", "weight of the learned C in the target (a SPEC's :ALPHA also sets it)"),)

    @classmethod
    def from_spec(cls, arg: str, ctx: SourceContext) -> "LSPPLoss":
        return cls(ctx.num_classes, spec_number(arg, ctx, cls.option("alpha"), cls.name))

    def write_artifacts(self, run_dir, class_names, meta) -> None:
        """The learned C-matrix, for `--teacher proxy:RUN_DIR`."""
        cmatrix.save_c_matrix(run_dir / runs.C_MATRIX, self.c_matrix(), self.alpha, class_names,
                           {"source": "lspp-learned", "dataset": str(meta.get("dataset", ""))})

    @classmethod
    def bench_rows(cls):
        """Three `kd bench` rows: the fused node (``lspp``), the definition compiled, and it in plain autograd."""
        return {"lspp": {}, "lspp-compiled": {"compiled": True}, "lspp-autograd": {"fused": False}}

    @classmethod
    def stand_in(cls, ctx: SourceContext) -> "LSPPLoss":
        return cls(ctx.num_classes, cls.value(ctx, "alpha"), fused=ctx.options.get("fused", True),
                   compiled=ctx.options.get("compiled", False))  # `kd bench` rows' settings

    def __init__(self, num_classes: int, alpha: float = 0.1, fused: bool = True, compiled: bool = False):
        """How the two terms are computed: the one-node :class:`_LSPPTerms` (``fused``, the default),
        :func:`lspp_terms_reference`, the definition in plain autograd (``fused=False``), or that
        definition through ``torch.compile`` (``compiled=True``: a few generated kernels instead of about
        thirty operators; where compilation fails, e.g. without a C++ compiler, the fused node is used,
        with one warning). All give the same values and gradients (tests/test_lspp.py checks it)."""
        if num_classes < 2:
            raise ValueError("LS++ needs at least 2 classes")
        super().__init__(num_classes)
        self.alpha = self.option("alpha").check(alpha, self.name)
        self.fused = bool(fused)
        self.compiled = bool(compiled)
        k = self.num_classes
        self.c_logits = nn.Parameter(torch.zeros(k, k - 1))
        # Flat positions of the K x K matrix in a (K*(K-1) + 1)-vector: off-diagonal entries in
        # row-major order (matching the (K, K-1) layout row by row), the diagonal at the extra slot.
        offdiag = ~torch.eye(k, dtype=torch.bool)
        index = torch.full((k, k), k * (k - 1), dtype=torch.long)
        index[offdiag] = torch.arange(k * (k - 1))
        self.register_buffer("_index", index, persistent=False)
        # Row i: the K-1 columns other than i, in order (where row i of the (K, K-1) logits lands).
        self.register_buffer("_offdiag_cols", torch.arange(k).expand(k, k)[offdiag].view(k, k - 1), persistent=False)

    def _log_table(self, diagonal: float, offset: float) -> torch.Tensor:
        """K x K matrix: offset + log C off the diagonal, ``diagonal`` on it."""
        log_rows = F.log_softmax(self.c_logits.float(), dim=1)
        return _square(log_rows + offset if offset else log_rows, diagonal, self._index)

    def log_c_matrix(self) -> torch.Tensor:
        """K x K log C: log-softmax of each row's K-1 logits, -inf on the diagonal."""
        return self._log_table(-math.inf, 0.0)

    def c_matrix(self) -> torch.Tensor:
        """The learned C-matrix, K x K probabilities: rows sum to 1, zero diagonal. A detached copy: it can be
        kept (``ProxyTeacher(lspp.c_matrix())``) while C trains on."""
        with torch.no_grad():
            return self.log_c_matrix().exp()

    #: C within this share of uniform's entropy at the end of a run gets the end note (3%: see benchmarks/cmatrix.md)
    UNIFORM_SHARE = 0.97

    def epoch_stats(self) -> dict[str, float]:
        """How far C moved from uniform: mean row entropy as a share of log(K-1), mean row maximum."""
        return c_movement(self.c_matrix())

    @classmethod
    def epoch_stats_keys(cls) -> tuple[str, ...]:
        return ("c_entropy_share", "c_row_max")

    def describe_stats(self, stats: dict[str, float]) -> str:
        return f"C entropy {100 * stats['c_entropy_share']:.1f}% of uniform, row max {stats['c_row_max']:.3f}"

    def end_note(self, last: dict) -> str | None:
        """One line when C ended within 3% of uniform's entropy: either the classes have no neighbours to
        find (a correct C) or C learned too slowly for this run (the measurement is in benchmarks/cmatrix.md)."""
        share = last.get("c_entropy_share")
        if share is None or share < self.UNIFORM_SHARE:
            return None
        k = self.num_classes
        return (f"C stayed within {100 * (1 - self.UNIFORM_SHARE):.0f}% of uniform (mean row entropy "
                f"{100 * share:.1f}% of log(K-1), mean row max {last['c_row_max']:.3f} against 1/(K-1) = "
                f"{1 / (k - 1):.3f}): either the classes have no neighbours to find, or C learned too slowly for "
                f"this run: then raise --c-lr-scale (c_lr_scale; 10 moved C in the short runs measured in "
                f"benchmarks/cmatrix.md), or train more steps")

    def log_target_table(self) -> torch.Tensor:
        """K x K log T with T = (1 - alpha) I + alpha C, exact in log space; row y is log t for class y."""
        return self._log_table(math.log1p(-self.alpha), math.log(self.alpha))

    def targets(self, labels, *, inputs=None, index=None):
        with torch.no_grad():
            table = self.log_target_table().exp()
            if labels.is_floating_point():  # soft labels m: m @ ((1 - alpha) I + alpha C)
                return labels.float() @ table
            return table[labels]

    def loss_terms(self, logits, labels, *, inputs=None, index=None):
        if self.compiled and not labels.is_floating_point():
            terms = compiled_terms(logits.float(), self.c_logits.float(), labels, self.alpha)
            if terms is not None:
                return {"lspp_net": terms[0], "lspp_c": terms[1]}
        if (self.fused or self.compiled) and not labels.is_floating_point():
            net_term, c_term = _LSPPTerms.apply(logits.float(), self.c_logits.float(), labels, self._index,
                                                self._offdiag_cols, self.alpha)
        else:
            net_term, c_term = lspp_terms_reference(logits.float(), self.c_logits.float(), labels, self.alpha)
        return {"lspp_net": net_term, "lspp_c": c_term}

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The scalar LS++ loss for a batch."""
        return sum(self.loss_terms(logits, labels).values())


_COMPILED: dict[str, Any] = {}


def compiled_terms(logits, c_logits, labels, alpha: float):
    """:func:`lspp_terms_reference` through ``torch.compile`` (compiled once per process, on first use),
    or None where compilation failed (no C++ compiler, an unsupported platform): the caller falls back."""
    fn = _COMPILED.get("terms")
    if fn is None:
        if _COMPILED.get("failed"):
            return None
        fn = _COMPILED["terms"] = torch.compile(lspp_terms_reference, dynamic=False)
    try:
        return fn(logits, c_logits, labels, alpha)
    except Exception as e:  # torch.compile raises its backend's errors (BackendCompilerFailed, InductorError, ...)
        _COMPILED.update(terms=None, failed=True)
        warnings.warn(f"LS++: the compiled loss is not available here ({type(e).__name__}); using the fused node")
        return None


def _square(rows: torch.Tensor, diagonal: float, flat_index: torch.Tensor) -> torch.Tensor:
    """K x K matrix from K x (K-1) off-diagonal rows (row-major) and a constant diagonal."""
    return torch.cat([rows.reshape(-1), rows.new_full((1,), diagonal)]).take(flat_index)


def lspp_terms_reference(logits: torch.Tensor, c_logits: torch.Tensor, labels: torch.Tensor,
                         alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The LS++ loss terms as defined, in plain autograd: this function IS the definition.

    ``logits`` B x K, ``c_logits`` K x (K-1), integer ``labels`` B (or soft labels m, B x K),
    ``alpha`` in (0, 1). With soft labels the target is t = m @ T, T = (1 - alpha) I + alpha C:
    the network trains on the mixed target and C on the reverse term of that same target,
    H(sg(p), m @ T), whose gradient reaches every row of C in proportion to m.
    Returns (net, c): net = 1/2 mean_b H(sg(t), p), c = 1/2 mean_b H(sg(p), t), with
    p = softmax(logits), t = (1 - alpha) onehot(y) + alpha C[y], sg = ``.detach()``.
    log t is exact in log space: log(1 - alpha) at y, log(alpha) + log C[y, j] elsewhere.
    Autograd derives every gradient; the fused node :class:`_LSPPTerms` is checked against
    this function (values and gradients, tests/test_lspp.py).
    """
    k = logits.shape[1]
    log_p = F.log_softmax(logits, dim=1)
    p = log_p.exp()
    # log T, K x K: row i is log t for class i. The K-1 entries of row i of the C logits fill
    # the off-diagonal places of row i in order (masked_scatter walks the mask row-major).
    log_c_rows = F.log_softmax(c_logits, dim=1)
    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=logits.device)
    log_table = torch.full((k, k), math.log1p(-alpha), dtype=log_c_rows.dtype, device=logits.device)
    log_table = log_table.masked_scatter(off_diagonal, math.log(alpha) + log_c_rows)
    if labels.is_floating_point():  # soft labels m (mixup / cutmix): t = m @ T, every entry > 0
        t = labels.to(log_table.dtype) @ log_table.exp()
        log_t = t.log()
    else:
        log_t = log_table[labels]
        t = log_t.exp()
    net = 0.5 * -(t.detach() * log_p).sum(dim=1).mean()  # network side: t is a constant
    c = 0.5 * -(p.detach() * log_t).sum(dim=1).mean()  # C side: p is a constant
    return net, c


class _LSPPTerms(torch.autograd.Function):
    """Both LS++ terms in one autograd node, with their gradients written out.

    Forward: t = exp(log t) with log t exact (log(1 - alpha) at y, log(alpha) + log C[y] elsewhere),
    net = 1/2 H(t, p), c = 1/2 H(p, t), batch means. Backward, per sample of class y:
    d net / d logits = 1/2 (p - t) (the t-side is a stop-gradient), d net / d C = 0;
    d c / d logits = 0 (the p-side is a stop-gradient), and for row y of the C logits
    d c / d theta_y = 1/2 ((sum_{j != y} p_j) s_y - p_{-y}), s_y = softmax(theta_y).
    It must equal :func:`lspp_terms_reference` (the definition) in values and gradients;
    tests/test_lspp.py checks both forms with gradcheck and against each other in float64.

    It is the default because the loss alone runs 1.4-1.65x faster than the plain-autograd form
    (in a whole LeNet step the difference is within noise); the measurements are in
    benchmarks/step-cost.md, "Measurements behind implementation choices".
    """

    @staticmethod
    def forward(ctx, logits, c_logits, labels, flat_index, offdiag_cols, alpha):
        b = logits.shape[0]
        log_p = F.log_softmax(logits, dim=1)
        p = log_p.exp()
        log_s = F.log_softmax(c_logits, dim=1)
        log_table = _square(log_s + math.log(alpha), math.log1p(-alpha), flat_index)  # log((1 - alpha) I + alpha C)
        log_t = log_table.index_select(0, labels)  # index_select: far cheaper than x[labels]
        t = log_t.exp()
        scale = 0.5 / b
        net = (t * log_p).sum().mul_(-scale)
        c = (p * log_t).sum().mul_(-scale)
        ctx.save_for_backward(p, t, log_s, labels, offdiag_cols)
        ctx.scale = scale
        return net, c

    @staticmethod
    @once_differentiable  # the backward treats p and t as constants: refuse double backward
    def backward(ctx, grad_net, grad_c):
        p, t, log_s, labels, offdiag_cols = ctx.saved_tensors
        grad_logits = (p - t).mul_(grad_net * ctx.scale)
        q = p.gather(1, offdiag_cols.index_select(0, labels))  # p at each sample's non-target classes, B x (K-1)
        q_by_class = torch.zeros_like(log_s).index_add_(0, labels, q)
        mass_by_class = q_by_class.sum(1, keepdim=True)  # sum over class y's samples of sum_{j != y} p_j
        grad_c_logits = (mass_by_class * log_s.exp()).sub_(q_by_class).mul_(grad_c * ctx.scale)
        return grad_logits, grad_c_logits, None, None, None, None
