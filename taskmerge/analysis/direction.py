"""DC-Merge diagnostics: energy spectra, the CosSim decomposition, DirSim and projected DirSim.

Zhang et al., "DC-Merge: Improving Model Merging with Directional Consistency" (CVPR 2026), §2.

For a task update ``Δ = Σ_j σ^j u^j v^jᵀ`` (m×n):

* **energy spectrum** (Fig. 1): ``σ / σ¹``, averaged over layers for the figure; the energy retention
  curve of Fig. 9a is the cumulative share of ``Σσ²``;
* **cross-direction matrix** (Eq. 4): ``R(s,t)_ij = (u_s^i·u_t^j)(v_s^i·v_t^j)``, i.e.
  ``R = (U_sᵀU_t) ⊙ (V_sᵀV_t)``;
* **Proposition 1**: ``CosSim(Δ_s, Δ_t) = σ_sᵀ R σ_t / (‖σ_s‖ ‖σ_t‖)``;
* **DirSim** (Eq. 5): ``1ᵀ R 1 / √(n_s n_t)`` = ``⟨U_sV_sᵀ, U_tV_tᵀ⟩_F / √(n_s n_t)``: the cosine of the two
  updates once every singular value is set to one (independent of the energy, invariant to flipping a
  singular pair, in [−1, 1]);
* **projected DirSim** (Eq. 6): ``DirSim(Δ_i, U_iU_iᵀ Δ̃)`` for a merged update ``Δ̃``, with ``U_i`` the
  top-``r`` left singular vectors of ``Δ_i``.

Ranks (``n_s``, ``n_t``, ``r``): by default the numerical rank (singular values above ``rtol·σ¹``,
``rtol = max(m, n)·eps`` of the compute dtype); pass ``rank`` to truncate (e.g. the LoRA rank, the spec's
reading of the projected DirSim). A zero matrix has no direction: its similarities are defined as 0.

Per-layer wrappers take task vectors as ``{task: {tensor name: Δ}}`` (or a sequence of state dicts) and
consider the 2-D tensors every task has; each returns a dict keyed by tensor name. Computation is in
float64 by default. Every ``plot_*`` helper writes a PNG with matplotlib's Agg canvas (no display needed)
and returns the path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from taskmerge.analysis.plotting import new_figure, save_figure
from taskmerge.linalg import SVD, orthonormal_basis, project_out, svd

__all__ = [
    "CosSimDecomposition",
    "singular_spectrum",
    "energy_spectrum",
    "energy_retention",
    "cross_direction_matrix",
    "cossim",
    "cossim_decomposition",
    "dirsim",
    "projected_dirsim",
    "pairwise_cossim",
    "pairwise_dirsim",
    "energy_perturbation",
    "directional_perturbation",
    "matrix_layers",
    "layer_energy_spectra",
    "mean_spectrum",
    "layer_cossim_decomposition",
    "layer_pairwise_dirsim",
    "layer_projected_dirsim",
    "layer_average",
    "plot_energy_spectra",
    "plot_cossim_decomposition",
    "plot_similarity_matrix",
    "plot_projected_dirsim",
    "plot_dirsim_vs_nai",
]

TaskVectors = Mapping[str, Mapping[str, torch.Tensor]] | Sequence[Mapping[str, torch.Tensor]]


# --------------------------------------------------------------------------------------------------
# Single layer
# --------------------------------------------------------------------------------------------------


def _as_matrix(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(x.shape)}")
    return x.detach().to(dtype)


def _rtol(x: torch.Tensor, rtol: float | None) -> float:
    return max(x.shape) * torch.finfo(x.dtype).eps if rtol is None else rtol


def _decompose(x: torch.Tensor, rank: int | None, rtol: float | None, scale: torch.Tensor | None = None) -> SVD:
    """Thin SVD restricted to the non-null directions (and to the top ``rank`` if given).

    A singular value is null when at most ``rtol·scale``; ``scale`` defaults to the largest one.
    """
    dec = svd(x)
    s = dec.S
    if not s.numel() or s[0] == 0:
        count = 0
    else:
        ref = s[0] if scale is None else torch.maximum(scale.to(s.dtype), s[0])
        count = int((s > _rtol(x, rtol) * ref).sum())
    if rank is not None:
        count = min(count, rank)
    return SVD(dec.U[:, :count], s[:count], dec.Vh[:count])


def singular_spectrum(delta: torch.Tensor, k: int | None = None, *, dtype=torch.float64) -> torch.Tensor:
    """Singular values of ``delta`` in non-increasing order (the top ``k`` if given)."""
    s = svd(_as_matrix(delta, dtype)).S
    return s if k is None else s[:k]


def energy_spectrum(
    delta: torch.Tensor, k: int | None = None, *, normalize: bool = True, dtype=torch.float64
) -> torch.Tensor:
    """Fig. 1: singular values divided by the largest (all zeros for a zero matrix)."""
    s = singular_spectrum(delta, k, dtype=dtype)
    if normalize and s.numel() and s[0] > 0:
        s = s / s[0]
    return s


def energy_retention(delta: torch.Tensor, *, dtype=torch.float64) -> torch.Tensor:
    """Fig. 9a: cumulative share of the energy ``Σσ²`` kept by the top 1, 2, … singular values."""
    s2 = singular_spectrum(delta, dtype=dtype) ** 2
    total = s2.sum()
    if total == 0:
        return torch.zeros_like(s2)
    return torch.cumsum(s2, 0) / total


def cross_direction_matrix(
    U_s: torch.Tensor, V_s: torch.Tensor, U_t: torch.Tensor, V_t: torch.Tensor
) -> torch.Tensor:
    """Eq. 4: ``R = (U_sᵀU_t) ⊙ (V_sᵀV_t)`` (n_s × n_t); ``U`` (m×n_·), ``V`` (n×n_·) column-wise."""
    return (U_s.T @ U_t) * (V_s.T @ V_t)


def cossim(a: torch.Tensor, b: torch.Tensor, *, dtype=torch.float64) -> float:
    """Cosine similarity of the flattened tensors (0 when either is zero)."""
    x = a.detach().to(dtype).flatten()
    y = b.detach().to(dtype).flatten()
    nx, ny = x.norm(), y.norm()
    if nx == 0 or ny == 0:
        return 0.0
    return float((x @ y) / (nx * ny))


@dataclass(frozen=True)
class CosSimDecomposition:
    """Proposition 1 for one pair of updates.

    Attributes:
        sigma_s, sigma_t: the retained singular values (n_s,), (n_t,).
        R: the cross-direction matrix (n_s × n_t).
        cossim: ``σ_sᵀ R σ_t / (‖σ_s‖ ‖σ_t‖)``.
        dirsim: ``1ᵀ R 1 / √(n_s n_t)``.
    """

    sigma_s: torch.Tensor
    sigma_t: torch.Tensor
    R: torch.Tensor
    cossim: float
    dirsim: float


def _decomposition(ds: SVD, dt: SVD) -> CosSimDecomposition:
    R = cross_direction_matrix(ds.U, ds.Vh.T, dt.U, dt.Vh.T)
    ns, nt = ds.S.numel(), dt.S.numel()
    if ns == 0 or nt == 0:
        return CosSimDecomposition(ds.S, dt.S, R, 0.0, 0.0)
    cos = float(ds.S @ R @ dt.S / (ds.S.norm() * dt.S.norm()))
    dir_ = float(R.sum() / math.sqrt(ns * nt))
    return CosSimDecomposition(ds.S, dt.S, R, cos, dir_)


def cossim_decomposition(
    delta_s: torch.Tensor,
    delta_t: torch.Tensor,
    *,
    rank_s: int | None = None,
    rank_t: int | None = None,
    rtol: float | None = None,
    dtype=torch.float64,
) -> CosSimDecomposition:
    """Proposition 1: CosSim through ``R(s,t)`` (and DirSim from the same ``R``).

    With the default (numerical) ranks ``cossim`` equals the plain cosine of the two matrices; with
    ``rank_s`` / ``rank_t`` it is the cosine of their truncations.
    """
    ds = _decompose(_as_matrix(delta_s, dtype), rank_s, rtol)
    dt = _decompose(_as_matrix(delta_t, dtype), rank_t, rtol)
    return _decomposition(ds, dt)


def dirsim(
    delta_s: torch.Tensor,
    delta_t: torch.Tensor,
    *,
    rank_s: int | None = None,
    rank_t: int | None = None,
    rtol: float | None = None,
    dtype=torch.float64,
) -> float:
    """Eq. 5: ``DirSim = 1ᵀ R(s,t) 1 / √(n_s n_t)`` (0 if either update is zero)."""
    return cossim_decomposition(delta_s, delta_t, rank_s=rank_s, rank_t=rank_t, rtol=rtol, dtype=dtype).dirsim


def projected_dirsim(
    delta: torch.Tensor,
    merged: torch.Tensor,
    *,
    rank: int | None = None,
    rtol: float | None = None,
    dtype=torch.float64,
) -> float:
    """Eq. 6: ``DirSim(Δ_i, U_iU_iᵀ Δ̃)`` with ``U_i`` the top-``rank`` left singular vectors of ``Δ_i``.

    ``Δ_i`` is truncated to the same ``rank``; the projected merge keeps its non-null directions (at most
    ``rank``). Scale-invariant in ``merged`` (pass it before or after λ > 0).
    """
    d = _decompose(_as_matrix(delta, dtype), rank, rtol)
    m = _as_matrix(merged, dtype)
    if m.shape != delta.shape:
        raise ValueError(f"merged update {tuple(m.shape)} and task update {tuple(delta.shape)} differ in shape")
    projected = d.U @ (d.U.T @ m)
    # Null directions of the projection are judged against the merge's own scale: a merge orthogonal
    # to U_i projects to rounding noise, which must count as nothing, not as directions.
    dp = _decompose(projected, d.S.numel(), rtol, scale=torch.linalg.matrix_norm(m))
    return _decomposition(d, dp).dirsim


def _stack(deltas: torch.Tensor | Sequence[torch.Tensor], dtype) -> list[torch.Tensor]:
    return [_as_matrix(d, dtype) for d in deltas]


def pairwise_cossim(deltas: torch.Tensor | Sequence[torch.Tensor], *, dtype=torch.float64) -> torch.Tensor:
    """(T, T) matrix of plain cosine similarities between the updates of one layer."""
    xs = _stack(deltas, dtype)
    flat = torch.stack([x.flatten() for x in xs])
    norms = flat.norm(dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    out = (flat @ flat.T) / (safe[:, None] * safe[None, :])
    zero = norms == 0
    return out.masked_fill(zero[:, None] | zero[None, :], 0.0)


def pairwise_dirsim(
    deltas: torch.Tensor | Sequence[torch.Tensor],
    *,
    rank: int | None = None,
    rtol: float | None = None,
    dtype=torch.float64,
) -> torch.Tensor:
    """(T, T) matrix of DirSim between the updates of one layer (one SVD per update)."""
    decs = [_decompose(x, rank, rtol) for x in _stack(deltas, dtype)]
    # DirSim via the closed form ⟨U_sV_sᵀ, U_tV_tᵀ⟩ / √(n_s n_t) = 1ᵀR1 / √(n_s n_t).
    polar = [d.U @ d.Vh for d in decs]
    counts = torch.tensor([d.S.numel() for d in decs], dtype=dtype)
    flat = torch.stack([p.flatten() for p in polar])
    safe = torch.where(counts > 0, counts, torch.ones_like(counts)).sqrt()
    out = (flat @ flat.T) / (safe[:, None] * safe[None, :])
    zero = counts == 0
    return out.masked_fill(zero[:, None] | zero[None, :], 0.0)


# --------------------------------------------------------------------------------------------------
# Controlled perturbations (App. E.3, Fig. 3b)
# --------------------------------------------------------------------------------------------------


def energy_perturbation(
    delta: torch.Tensor,
    p: float,
    *,
    rank: int | None = None,
    balanced: str = "average",
    rho: float = 5.0,
    dtype=torch.float64,
) -> torch.Tensor:
    """Eqs. 32–35: same singular directions, spectrum ``σ̂`` with ``CosSim(σ, σ̂) = p`` (so DirSim = 1).

    ``σ̂ = ‖σ‖ (p s + √(1−p²) s⊥)`` with ``s = σ/‖σ‖`` and ``s⊥`` the part of the balanced spectrum
    (``average`` or ``linear``, see :func:`taskmerge.methods.dc_merge.smooth_spectrum`) orthogonal to
    ``s``. Entries of ``σ̂`` may be negative for small ``p`` (kept as signed coefficients).
    """
    from taskmerge.methods.dc_merge import smooth_spectrum

    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    d = _decompose(_as_matrix(delta, dtype), rank, None)
    sigma = d.S
    if sigma.numel() == 0:
        raise ValueError("energy_perturbation: the update is zero")
    bal = smooth_spectrum(sigma, balanced, rho=rho)
    s = sigma / sigma.norm()
    perp = bal - (s @ bal) * s
    if perp.norm() <= 1e-12 * bal.norm():
        raise ValueError("energy_perturbation: the spectrum is already balanced (s⊥ is undefined)")
    perp = perp / perp.norm()
    hat = sigma.norm() * (p * s + math.sqrt(1.0 - p * p) * perp)
    return (d.U * hat) @ d.Vh


def directional_perturbation(
    delta: torch.Tensor,
    p: float,
    *,
    rank: int | None = None,
    generator: torch.Generator | None = None,
    dtype=torch.float64,
) -> torch.Tensor:
    """Eqs. 36–37: same spectrum, directions ``√p·U + √(1−p)·Û`` (Û ⊥ U random), so DirSim = p."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    x = _as_matrix(delta, dtype)
    d = _decompose(x, rank, None)
    r = d.S.numel()
    m, n = x.shape
    if r == 0:
        raise ValueError("directional_perturbation: the update is zero")
    if 2 * r > min(m, n):
        raise ValueError(f"directional_perturbation needs 2·rank ≤ min(m, n); rank {r}, shape {m}×{n}")
    V = d.Vh.T

    def complement(B: torch.Tensor, rows: int) -> torch.Tensor:
        g = torch.randn(rows, r, generator=generator, dtype=dtype)
        return orthonormal_basis(project_out(B, g))

    u_hat = math.sqrt(p) * d.U + math.sqrt(1.0 - p) * complement(d.U, m)
    v_hat = math.sqrt(p) * V + math.sqrt(1.0 - p) * complement(V, n)
    return (u_hat * d.S) @ v_hat.T


# --------------------------------------------------------------------------------------------------
# Per-layer wrappers over task vectors
# --------------------------------------------------------------------------------------------------


def _named(task_vectors: TaskVectors) -> dict[str, Mapping[str, torch.Tensor]]:
    if isinstance(task_vectors, Mapping):
        return dict(task_vectors)
    return {f"task{i}": tv for i, tv in enumerate(task_vectors)}


def matrix_layers(task_vectors: TaskVectors, layers: Iterable[str] | None = None) -> list[str]:
    """Names of the 2-D tensors every task has (in the first task's order), or the given ``layers``."""
    named = _named(task_vectors)
    if not named:
        return []
    tvs = list(named.values())
    if layers is not None:
        names = list(layers)
        for name in names:
            for task, tv in named.items():
                if name not in tv:
                    raise KeyError(f"task {task!r} has no tensor {name!r}")
                if tv[name].ndim != 2:
                    raise ValueError(f"tensor {name!r} of task {task!r} is not a matrix")
        return names
    first = tvs[0]
    return [k for k, v in first.items() if v.ndim == 2 and all(k in tv and tv[k].ndim == 2 for tv in tvs[1:])]


def layer_energy_spectra(
    task_vectors: TaskVectors,
    *,
    k: int | None = None,
    layers: Iterable[str] | None = None,
    normalize: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{task: {layer: σ/σ¹}}`` (Fig. 1 before the layer average, see :func:`mean_spectrum`)."""
    named = _named(task_vectors)
    names = matrix_layers(named, layers)
    return {
        task: {layer: energy_spectrum(tv[layer], k, normalize=normalize) for layer in names}
        for task, tv in named.items()
    }


def mean_spectrum(per_layer: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Average of per-layer spectra over layers, truncated to the shortest one (Fig. 1's curve)."""
    if not per_layer:
        raise ValueError("no layers to average")
    length = min(v.numel() for v in per_layer.values())
    return torch.stack([v[:length] for v in per_layer.values()]).mean(0)


def layer_cossim_decomposition(
    delta_s: Mapping[str, torch.Tensor],
    delta_t: Mapping[str, torch.Tensor],
    *,
    layers: Iterable[str] | None = None,
    rank: int | None = None,
    rtol: float | None = None,
) -> dict[str, CosSimDecomposition]:
    """Proposition 1 per layer for two task vectors."""
    names = matrix_layers([delta_s, delta_t], layers)
    return {
        name: cossim_decomposition(delta_s[name], delta_t[name], rank_s=rank, rank_t=rank, rtol=rtol)
        for name in names
    }


def layer_pairwise_dirsim(
    task_vectors: TaskVectors,
    *,
    layers: Iterable[str] | None = None,
    rank: int | None = None,
    rtol: float | None = None,
) -> dict[str, torch.Tensor]:
    """``{layer: (T, T) DirSim}`` in the task order of ``task_vectors``."""
    named = _named(task_vectors)
    names = matrix_layers(named, layers)
    return {
        name: pairwise_dirsim([tv[name] for tv in named.values()], rank=rank, rtol=rtol) for name in names
    }


def layer_projected_dirsim(
    task_vectors: TaskVectors,
    merged: Mapping[str, torch.Tensor],
    *,
    layers: Iterable[str] | None = None,
    rank: int | None = None,
    rtol: float | None = None,
) -> dict[str, torch.Tensor]:
    """``{layer: (T,) projected DirSim}`` of a merged update against every task (Eq. 6).

    Average over layers with :func:`layer_average` for the per-task numbers of Figs. 3c and 7b.
    """
    named = _named(task_vectors)
    names = matrix_layers(named, layers)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name not in merged:
            raise KeyError(f"the merged update has no tensor {name!r}")
        out[name] = torch.tensor(
            [projected_dirsim(tv[name], merged[name], rank=rank, rtol=rtol) for tv in named.values()],
            dtype=torch.float64,
        )
    return out


def layer_average(per_layer: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean over layers of per-layer values of equal shape."""
    if not per_layer:
        raise ValueError("no layers to average")
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in per_layer.values()]).mean(0)


# --------------------------------------------------------------------------------------------------
# Plots (PNG, Agg canvas)
# --------------------------------------------------------------------------------------------------


def plot_energy_spectra(
    spectra: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    title: str = "Singular value distribution",
    log: bool = False,
) -> Path:
    """One curve per task of normalized singular values against their index (Fig. 1)."""
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for task, s in spectra.items():
        values = torch.as_tensor(s, dtype=torch.float64).cpu().numpy()
        ax.plot(range(1, len(values) + 1), values, label=task)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("σ / σ₁")
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    if spectra:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_cossim_decomposition(dec: CosSimDecomposition, path: str | Path, *, title: str | None = None) -> Path:
    """Heat map of ``R(s,t)`` with both spectra alongside; the title gives CosSim and DirSim."""
    fig = new_figure(7.0, 6.0)
    grid = fig.add_gridspec(2, 2, width_ratios=(1, 4), height_ratios=(1, 4))
    ax = fig.add_subplot(grid[1, 1])
    R = dec.R.detach().cpu().numpy()
    lim = max(float(abs(R).max()) if R.size else 0.0, 1e-12)
    im = ax.imshow(R, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xlabel("components of t")
    top = fig.add_subplot(grid[0, 1])
    top.bar(range(dec.sigma_t.numel()), dec.sigma_t.cpu().numpy())
    top.set_ylabel("σ_t")
    left = fig.add_subplot(grid[1, 0])
    left.barh(range(dec.sigma_s.numel()), dec.sigma_s.cpu().numpy())
    left.invert_yaxis()
    left.set_ylabel("components of s")
    fig.suptitle(title or f"CosSim = {dec.cossim:.4f}, DirSim = {dec.dirsim:.4f}")
    return save_figure(fig, path)


def plot_similarity_matrix(
    matrix: torch.Tensor,
    labels: Sequence[str],
    path: str | Path,
    *,
    title: str = "DirSim",
) -> Path:
    """Annotated T×T heat map (pairwise DirSim or CosSim)."""
    values = torch.as_tensor(matrix, dtype=torch.float64).cpu().numpy()
    fig = new_figure(1.0 + 0.6 * len(labels), 0.8 + 0.6 * len(labels))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(values, cmap="viridis", vmin=min(0.0, float(values.min())), vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title)
    return save_figure(fig, path)


def plot_projected_dirsim(
    values: Mapping[str, Sequence[float] | torch.Tensor],
    tasks: Sequence[str],
    path: str | Path,
    *,
    title: str = "Projected DirSim per task",
) -> Path:
    """Grouped bars: for every task, the layer-averaged projected DirSim of each merge in ``values``."""
    import numpy as np

    fig = new_figure(max(6.0, 0.8 * len(tasks) + 2), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(values))
    x = np.arange(len(tasks))
    for i, (method, v) in enumerate(values.items()):
        arr = torch.as_tensor(v, dtype=torch.float64).cpu().numpy()
        if arr.shape != (len(tasks),):
            raise ValueError(f"{method!r}: expected {len(tasks)} values, got shape {arr.shape}")
        ax.bar(x + i * width - 0.4 + width / 2, arr, width, label=method)
    ax.set_xticks(x, tasks, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("projected DirSim")
    ax.set_title(title)
    if values:
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_dirsim_vs_nai(
    dirsim_values: Sequence[float] | torch.Tensor,
    nai_values: Sequence[float] | torch.Tensor,
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Scatter of projected DirSim against NAI with the Pearson R in the title (Fig. 3c)."""
    from taskmerge.analysis.metrics import pearson_r

    x = torch.as_tensor(dirsim_values, dtype=torch.float64).flatten().cpu().numpy()
    y = torch.as_tensor(nai_values, dtype=torch.float64).flatten().cpu().numpy()
    if x.shape != y.shape:
        raise ValueError(f"{x.size} DirSim values but {y.size} NAI values")
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(x, y, s=14)
    if labels is not None:
        for xi, yi, label in zip(x, y, labels, strict=True):
            ax.annotate(label, (xi, yi), fontsize=6)
    ax.set_xlabel("projected DirSim")
    ax.set_ylabel("NAI")
    try:
        caption = f"Pearson R = {pearson_r(x.tolist(), y.tolist()):.2f}"
    except ValueError:
        caption = "Pearson R undefined"
    ax.set_title(title or caption)
    return save_figure(fig, path)
