"""Saliency maps from the explanation outputs (issue 22): the reference the daemon must match.

A backbone exported with explanation outputs adds ``token_indices`` (int64 [B, L, H, k]: which
token of each used layer's 1 + G*G each head selected; 0 is CLS, n >= 1 is cell n - 1 of the
backbone's G x G patch grid in row-major order). An adapter adds ``token_relevance`` [B, C, L, H, k]
and ``patch_relevance`` [B, C, g*g] (g: the side network's patch grid), the direct logit attribution
of each class's logit (``model.SideNetwork.explain``). Manifests list these under
``explanation_outputs``.

``explain_map`` puts one image's relevances for one class on the backbone's grid:

* every selected token's relevance goes to its cell (CLS, index 0, to none); a cell selected by
  several layers and heads gets the sum;
* each side patch's relevance is spread evenly over the backbone cells it covers: cell (r, c)
  belongs to side patch (r * g // G, c * g // G);
* negative evidence is dropped (max with 0) and the map is scaled to a maximum of 1 (all zeros
  when nothing supports the class).

``selection_map`` is the backbone's own, task-independent importance: how often each cell was
selected over layers and heads, scaled the same way.
"""

from __future__ import annotations

import numpy as np


def _normalised(cells: np.ndarray, grid: int) -> np.ndarray:
    cells = np.maximum(cells, 0.0)
    top = cells.max()
    if top > 0:
        cells = cells / top
    return cells.reshape(grid, grid)


def _check_grid(token_indices: np.ndarray, grid: int) -> np.ndarray:
    idx = np.asarray(token_indices, dtype=np.int64)
    if idx.ndim != 3:
        raise ValueError(f"token_indices of one image must be [layers, heads, k], got shape {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() > grid * grid):
        raise ValueError(f"token_indices must lie in 0..{grid * grid} (CLS + a {grid}x{grid} grid)")
    return idx


def side_patch_of_cell(grid: int, side_grid: int) -> np.ndarray:
    """[G*G] int: the side patch (row-major over the g x g side grid) each backbone cell lies in."""
    rows = np.arange(grid) * side_grid // grid
    return (rows[:, None] * side_grid + rows[None, :]).reshape(-1)


def explain_map(
    token_relevance: np.ndarray,
    patch_relevance: np.ndarray,
    token_indices: np.ndarray,
    class_index: int,
    grid: int,
    side_grid: int,
) -> np.ndarray:
    """One image's saliency map for ``class_index`` on the backbone's grid: float64 [G, G] in [0, 1].

    ``token_relevance`` [C, L, H, k], ``patch_relevance`` [C, g*g] (one image's adapter outputs),
    ``token_indices`` [L, H, k] (that image's backbone output), ``grid`` = G (backbone image size /
    patch size), ``side_grid`` = g (side image size / side patch size)."""
    idx = _check_grid(token_indices, grid)
    tokens = np.asarray(token_relevance, dtype=np.float64)[class_index]
    patches = np.asarray(patch_relevance, dtype=np.float64)[class_index]
    if tokens.shape != idx.shape:
        raise ValueError(f"token_relevance of a class has shape {tokens.shape}, token_indices {idx.shape}")
    if patches.shape != (side_grid * side_grid,):
        raise ValueError(f"patch_relevance of a class has shape {patches.shape}, expected ({side_grid * side_grid},)")
    cells = np.zeros(grid * grid, dtype=np.float64)
    selected = idx >= 1
    np.add.at(cells, idx[selected] - 1, tokens[selected])
    owner = side_patch_of_cell(grid, side_grid)
    count = np.bincount(owner, minlength=side_grid * side_grid)
    share = np.divide(patches, count, out=np.zeros_like(patches), where=count > 0)
    cells += share[owner]
    return _normalised(cells, grid)


def selection_map(token_indices: np.ndarray, grid: int) -> np.ndarray:
    """The backbone's task-independent importance map of one image: how many (layer, head) pairs
    selected each cell, scaled to a maximum of 1; float64 [G, G]."""
    idx = _check_grid(token_indices, grid)
    selected = idx[idx >= 1] - 1
    cells = np.bincount(selected, minlength=grid * grid).astype(np.float64)
    return _normalised(cells, grid)
