"""What tells whether PoF helped: test error, NLL, calibration, head-space sharpness and the loss landscape.

- :func:`classification_metrics`: error, NLL and the expected calibration error (ECE, equal-width bins of
  the top-class confidence; Guo et al. 2017) of logits.
- :func:`lanczos` and :func:`power_iteration`: the largest eigenvalue of a symmetric operator given as a
  Hessian-vector product, from a seeded start vector, with its convergence (iterations, the residual
  ``||H v - lambda v||``, converged or not).
- :func:`head_hessian_hvp`: the exact Hessian-vector product of the mean cross-entropy with respect to the
  linear head ``(W, b)`` on fixed features (closed form: no graph); :func:`model_hessian_hvp`: the same for
  any set of parameters of a model, by double back-propagation over batches.
- :func:`landscape`: the poster's "range of parameter perturbation" measurement: for each batch, the loss
  along its own normalised head gradient, ``l(t) = L(theta0 - t g / ||g||)``, and its minimiser ``t*``,
  on training batches and on test batches; the ratio of the test minimiser to the training one (the paper
  reports about 2, the reason for gamma = 2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .search import LineSearchResult, line_losses, line_search

__all__ = ["classification_metrics", "expected_calibration_error", "calibration_bins", "EigenResult", "lanczos", "power_iteration",
           "hessian_lambda_max", "head_hessian_hvp", "model_hessian_hvp", "LandscapeResult", "landscape"]


# -- error, NLL, calibration -----------------------------------------------------------------------------


def expected_calibration_error(logits: Tensor, target: Tensor, bins: int = 15) -> float:
    """ECE: sum over ``bins`` equal-width confidence bins of ``(n_bin / n) * |accuracy - mean confidence|``.

    The confidence of a row is its top softmax probability; bin ``k`` holds confidences in
    ``(k / bins, (k + 1) / bins]``.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    probs = torch.softmax(logits.double(), dim=1)
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == target).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    count = torch.zeros(bins, dtype=torch.float64, device=logits.device).index_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros_like(count).index_add_(0, index, confidence)
    acc_sum = torch.zeros_like(count).index_add_(0, index, correct)
    return float((conf_sum - acc_sum).abs().sum() / max(len(target), 1))


def calibration_bins(logits: Tensor, target: Tensor, bins: int = 15) -> List[Dict[str, float]]:
    """Per confidence bin (as in :func:`expected_calibration_error`): row count, mean confidence, accuracy."""
    probs = torch.softmax(logits.double(), dim=1)
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == target).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    rows = []
    for k in range(bins):
        mask = index == k
        count = int(mask.sum())
        rows.append({"low": k / bins, "high": (k + 1) / bins, "count": count,
                     "confidence": float(confidence[mask].mean()) if count else (k + 0.5) / bins,
                     "accuracy": float(correct[mask].mean()) if count else 0.0})
    return rows


def classification_metrics(logits: Tensor, target: Tensor, bins: int = 15) -> Dict[str, float]:
    """``{"error", "nll", "ece"}`` of ``[n, C]`` logits against ``[n]`` labels."""
    return {
        "error": float((logits.argmax(1) != target).double().mean()),
        "nll": float(nn.functional.cross_entropy(logits.double(), target)),
        "ece": expected_calibration_error(logits, target, bins),
    }


# -- the largest Hessian eigenvalue ----------------------------------------------------------------------


@dataclass
class EigenResult:
    """``value``: the estimate; ``residual``: ``||H v - value v||`` for its (Ritz) vector ``v``, a bound on the
    distance to an eigenvalue of H; ``converged``: ``residual <= tol * |value|`` (or the Krylov space became
    invariant: then the value is exact); ``history``: the estimate after every iteration."""

    value: float
    iterations: int
    residual: float
    converged: bool
    method: str
    history: List[float] = field(default_factory=list)

    def as_dict(self, prefix: str = "") -> Dict[str, object]:
        return {f"{prefix}lambda_max": self.value, f"{prefix}iterations": self.iterations,
                f"{prefix}residual": self.residual, f"{prefix}converged": self.converged, f"{prefix}method": self.method}


def _start(dim: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    v = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (v / v.norm()).to(device=device, dtype=dtype)


def lanczos(hvp: Callable[[Tensor], Tensor], dim: int, *, iters: int = 50, tol: float = 1e-3, seed: int = 0,
            device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
            on_iteration: Optional[Callable[[int, float, float], None]] = None) -> EigenResult:
    """The algebraically largest eigenvalue of the symmetric ``hvp`` (a map of flat ``[dim]`` vectors).

    Lanczos with full re-orthogonalisation (the basis is kept: ``iters * dim`` numbers); after each
    iteration the tridiagonal matrix is diagonalised in float64 and the top Ritz value's residual is
    ``|beta_{j+1} s_j|``. Stops when ``residual <= tol * |value|``, at an invariant subspace, or after ``iters``.
    ``on_iteration(iteration, value, residual)`` is called after every iteration (progress bars).
    """
    if iters < 1 or dim < 1:
        raise ValueError(f"iters and dim must be >= 1, got {iters} and {dim}")
    basis = [_start(dim, seed, device, dtype)]
    alphas: List[float] = []
    betas: List[float] = []
    history: List[float] = []
    value, residual, converged = float("nan"), float("inf"), False
    for j in range(min(iters, dim)):
        w = hvp(basis[-1])
        alpha = float(torch.dot(w, basis[-1]))
        alphas.append(alpha)
        for _ in range(2):  # full re-orthogonalisation, twice is enough (Parlett's "twice is enough")
            for q in basis:
                w = w - torch.dot(w, q) * q
        beta = float(w.norm())
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tri += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(tri)
        value = float(evals[-1])
        residual = abs(beta * float(evecs[-1, -1]))
        history.append(value)
        if on_iteration is not None:
            on_iteration(j + 1, value, residual)
        scale = max(abs(value), max(abs(a) for a in alphas), 1e-30)
        if residual <= tol * abs(value) or beta <= 1e-10 * scale or j + 1 == dim:
            converged = True
            break
        betas.append(beta)
        basis.append(w / beta)
    return EigenResult(value, len(history), residual, converged, "lanczos", history)


def power_iteration(hvp: Callable[[Tensor], Tensor], dim: int, *, iters: int = 200, tol: float = 1e-3, seed: int = 0,
                    device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                    on_iteration: Optional[Callable[[int, float, float], None]] = None) -> EigenResult:
    """The eigenvalue of largest magnitude of the symmetric ``hvp`` (the top one for a positive semi-definite
    Hessian, such as the head's): ``v <- H v / ||H v||``, value ``v . H v``; stops when the residual
    ``||H v - value v|| <= tol * |value|`` or after ``iters``."""
    if iters < 1 or dim < 1:
        raise ValueError(f"iters and dim must be >= 1, got {iters} and {dim}")
    v = _start(dim, seed, device, dtype)
    history: List[float] = []
    value, residual, converged = float("nan"), float("inf"), False
    for _ in range(iters):
        w = hvp(v)
        value = float(torch.dot(v, w))
        residual = float((w - value * v).norm())
        history.append(value)
        if on_iteration is not None:
            on_iteration(len(history), value, residual)
        norm = float(w.norm())
        if residual <= tol * abs(value) or norm == 0.0:
            converged = True
            break
        v = w / norm
    return EigenResult(value, len(history), residual, converged, "power", history)


def hessian_lambda_max(hvp: Callable[[Tensor], Tensor], dim: int, *, method: str = "lanczos", iters: int = 50,
                       tol: float = 1e-3, seed: int = 0, device: torch.device = torch.device("cpu"),
                       dtype: torch.dtype = torch.float32,
                       on_iteration: Optional[Callable[[int, float, float], None]] = None) -> EigenResult:
    """:func:`lanczos` (``method="lanczos"``) or :func:`power_iteration` (``"power"``)."""
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    run = lanczos if method == "lanczos" else power_iteration
    return run(hvp, dim, iters=iters, tol=tol, seed=seed, device=device, dtype=dtype, on_iteration=on_iteration)


def head_hessian_hvp(features: Tensor, target: Tensor, weight: Tensor, bias: Optional[Tensor],
                     chunk: int = 4096) -> Tuple[Callable[[Tensor], Tensor], int]:
    """``(hvp, dim)``: the Hessian of ``mean_i CE(h_i W^T + b, y_i)`` with respect to ``(W, b)`` at the given
    head, as a map of flat vectors ``[vec(W), b]`` (``dim = C*D (+ C)``), in the features' dtype.

    Closed form: with ``p = softmax(z)`` and ``dz = h V_W^T + v_b``, the logits' Hessian acts as
    ``p * dz - p (p . dz)``; back through the head, ``H v = (that^T h / n, colsum(that) / n)``.
    """
    h = features
    c, d = weight.shape
    probs = torch.softmax((h @ weight.to(h.dtype).t() + (0 if bias is None else bias.to(h.dtype))), dim=1)
    n = len(target)
    dim = c * d + (c if bias is not None else 0)

    def hvp(v: Tensor) -> Tensor:
        vw = v[: c * d].view(c, d)
        vb = v[c * d:] if bias is not None else None
        out_w = torch.zeros_like(vw)
        out_b = torch.zeros(c, dtype=v.dtype, device=v.device)
        for start in range(0, n, chunk):
            hc, pc = h[start:start + chunk], probs[start:start + chunk]
            dz = hc @ vw.t()
            if vb is not None:
                dz = dz + vb
            hz = pc * dz - pc * (pc * dz).sum(1, keepdim=True)
            out_w += hz.t() @ hc
            out_b += hz.sum(0)
        out = out_w.reshape(-1) / n
        return torch.cat([out, out_b / n]) if bias is not None else out

    return hvp, dim


def model_hessian_hvp(model: nn.Module, params: Sequence[Tensor], batches: Sequence[Tuple[Tensor, Tensor]]
                      ) -> Tuple[Callable[[Tensor], Tensor], int]:
    """``(hvp, dim)``: the Hessian of the mean cross-entropy of ``model`` over ``batches`` with respect to
    ``params`` (flattened and concatenated), by double back-propagation, batch by batch (weighted by size).
    The model is used as it is (call ``model.eval()`` first for a deterministic function of the parameters)."""
    params = list(params)
    sizes = [p.numel() for p in params]
    total = sum(len(y) for _, y in batches)

    def hvp(v: Tensor) -> Tensor:
        pieces = [t.view_as(p) for t, p in zip(v.split(sizes), params)]
        out = torch.zeros_like(v)
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x), y) * (len(y) / total)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            hv = torch.autograd.grad(grads, params, grad_outputs=pieces)
            out += torch.cat([t.reshape(-1) for t in hv]).to(out.dtype)
        return out

    return hvp, sum(sizes)


# -- the landscape along the normalised head gradient ----------------------------------------------------


@dataclass
class LandscapeResult:
    """Per-batch minimisers ``t_train``/``t_test`` (and whether each search hit ``max_step``), the grid ``steps``
    and the mean curves ``l(t) - l(0)`` over batches, and ``ratio = median(t_test) / median(t_train)``."""

    t_train: List[float]
    t_test: List[float]
    capped_train: int
    capped_test: int
    steps: List[float]
    curve_train: List[float]
    curve_test: List[float]
    ratio: float

    def summary(self) -> Dict[str, float]:
        def median(values: List[float]) -> float:
            return float(torch.tensor(values, dtype=torch.float64).median()) if values else float("nan")
        return {"t_star_train": median(self.t_train), "t_star_test": median(self.t_test), "ratio": self.ratio,
                "batches_train": len(self.t_train), "batches_test": len(self.t_test),
                "capped_train": self.capped_train, "capped_test": self.capped_test}


def _searches(batches: Iterable[Tuple[Tensor, Tensor]], weight: Tensor, bias: Optional[Tensor], max_step: float
              ) -> List[Tuple[Tensor, Tensor, LineSearchResult]]:
    return [(features, target, line_search(features, weight, bias, target, method="newton",
                                           direction="normalized", max_step=max_step))
            for features, target in batches]


def _mean_curve(searches: List[Tuple[Tensor, Tensor, LineSearchResult]], weight: Tensor, bias: Optional[Tensor],
                grid: Tensor) -> List[float]:
    """Mean over batches of ``l(t) - l(0)`` on ``grid``."""
    curves = []
    for features, target, result in searches:
        h = features.to(result.weight_direction.dtype)
        z0 = h @ weight.to(h.dtype).t() + (0 if bias is None else bias.to(h.dtype))
        d = h @ result.weight_direction.t()
        if result.bias_direction is not None:
            d = d + result.bias_direction
        losses = line_losses(z0, d, target, grid.to(device=z0.device, dtype=z0.dtype)).double().cpu()
        curves.append(losses - losses[0])
    return torch.stack(curves).mean(0).tolist()


def landscape(train_batches: Sequence[Tuple[Tensor, Tensor]], test_batches: Sequence[Tuple[Tensor, Tensor]],
              weight: Tensor, bias: Optional[Tensor], *, max_step: float = 100.0, points: int = 64) -> LandscapeResult:
    """The loss along each batch's normalised head gradient, on training and on test batches.

    ``train_batches``/``test_batches``: ``(features [n, D], labels [n])`` pairs (features of the feature
    extractor, computed by the caller). For each batch ``t*`` is the exact minimiser of
    ``l(t) = L(theta0 - t g / ||g||)`` on ``[0, max_step]`` (:func:`pof_fast.line_search`, Newton); the curves
    ``l(t) - l(0)`` are averaged over batches on ``points`` steps from 0 to 3 x the larger median ``t*``.
    """
    if not train_batches or not test_batches:
        raise ValueError("landscape needs at least one training batch and one test batch")
    train = _searches(train_batches, weight, bias, max_step)
    test = _searches(test_batches, weight, bias, max_step)
    t_train = [float(r.step) for _, _, r in train]
    t_test = [float(r.step) for _, _, r in test]
    med_train = float(torch.tensor(t_train, dtype=torch.float64).median())
    med_test = float(torch.tensor(t_test, dtype=torch.float64).median())
    grid = torch.linspace(0.0, 3.0 * max(med_train, med_test, 1e-6), points, dtype=torch.float64)
    ratio = med_test / med_train if med_train > 0 else float("inf")
    return LandscapeResult(t_train, t_test, sum(int(bool(r.capped)) for _, _, r in train),
                           sum(int(bool(r.capped)) for _, _, r in test), grid.tolist(),
                           _mean_curve(train, weight, bias, grid), _mean_curve(test, weight, bias, grid), ratio)
