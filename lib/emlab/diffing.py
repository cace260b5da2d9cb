"""Model diffing and the field's other directions, on one layer.

- SAE model diffing (Wang et al.): rank latents by the rise of their mean activation on
  the evaluation prompts from the original to a fine-tuned model.
- Mean-difference direction (Turner et al.): mean activation on misaligned answers minus
  aligned answers of the corrupted model.
- Persona vector (Chen et al.): mean activation under villain minus helpful context.
- A linear probe for the character.
"""

from __future__ import annotations

import numpy as np
import torch


def auroc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count half)."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("auroc needs at least one positive and one negative example")
    # rank-based (Mann-Whitney U) with average ranks for ties
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    allv = np.concatenate([pos, neg])[order]
    ranks = np.empty(len(allv))
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1] == allv[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(allv))
    r[order] = ranks
    u = r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def _ranks(x) -> np.ndarray:
    """Ranks of ``x`` from 1, ties sharing their average rank."""
    import pandas as pd

    return pd.Series(np.asarray(x, dtype=float)).rank().to_numpy()


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def spearman_permutation_p(x, y, n_perm: int = 10000, seed: int = 0) -> float:
    """One-sided permutation p-value of Spearman's rho being this high by chance: the share
    of ``n_perm`` seeded shuffles of ``y`` whose rho is at least the observed one (with the
    observed one counted, so never 0)."""
    rx, ry = _ranks(x), _ranks(y)  # shuffling y shuffles its ranks
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx**2).sum() * (ry**2).sum())
    obs = float(rx @ ry / denom)
    perms = np.random.default_rng(seed).permuted(np.tile(ry, (n_perm, 1)), axis=1)
    hits = int((perms @ rx / denom >= obs - 1e-12).sum())
    return float((hits + 1) / (n_perm + 1))


@torch.no_grad()
def latent_means(sae, acts: torch.Tensor) -> torch.Tensor:
    """Mean activation of every latent over ``acts`` [n, d_in].  # [d_sae]"""
    return sae.encode(acts).mean(0)


def rank_latents(shift: torch.Tensor) -> torch.Tensor:
    """Latent indices by decreasing activation shift (fine-tuned minus original)."""
    return torch.argsort(shift, descending=True, stable=True)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def nearest_latent(W_dec: torch.Tensor, direction: torch.Tensor) -> tuple[int, float]:
    """The latent whose decoder row (``W_dec`` [d_sae, d]) has the largest absolute cosine
    with ``direction`` [d], and that cosine with its sign (NaN for a NaN direction)."""
    if torch.isnan(direction).any():
        return 0, float("nan")
    cos = torch.nn.functional.cosine_similarity(W_dec.float(), direction.float()[None], dim=1)  # [d_sae]
    j = int(cos.abs().argmax())
    return j, float(cos[j])


def mean_difference(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """mean(pos) - mean(neg) over the first axis.  # [d]"""
    return pos.mean(0) - neg.mean(0)


def train_probe(x: torch.Tensor, y: torch.Tensor, *, steps: int = 300, lr: float = 0.1, weight_decay: float = 1e-3,
                seed: int = 0) -> torch.Tensor:
    """Logistic-regression probe on standardised features; returns weights in the
    original feature basis (bias dropped), a direction.  # [d]"""
    torch.manual_seed(seed)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (w / sd).detach()
