"""Activations and the sparse autoencoder.

Activations are read through TransformerLens hooks (``blocks.{L}.hook_resid_post``) in
bounded batches. The SAE is SAELens' TopK SAE::

    latents = topk(W_enc (x - b_dec) + b_enc)        x_hat = W_dec latents + b_dec

trained with SAELens' ``SAETrainer`` on an in-memory activation stream (offline, no
wandb) and saved in SAELens' format (``cfg.json`` + ``sae_weights.safetensors``), so
``sae_lens.SAE.load_from_disk(path)`` reloads it without this package.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import torch

from emlab.config import Config


class SAEShapeError(ValueError):
    """The SAE's input width does not match the model's residual stream."""


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


@torch.no_grad()
def iter_activations(ht, tokenizer, texts: list[str], hook: str, *, batch_size: int = 64,
                     max_len: int = 256) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(text index, activations [n_tokens, d_model])`` for each text, computed in
    batches of ``batch_size`` texts so memory stays bounded by one batch."""
    pad = tokenizer.pad_token_id
    max_len = min(max_len, ht.cfg.n_ctx)
    for s in range(0, len(texts), batch_size):
        enc = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_len] for t in texts[s : s + batch_size]]
        n = max(len(e) for e in enc)
        x = torch.full((len(enc), n), pad, dtype=torch.long)  # [batch, pos]; right padding is causal-safe
        for i, e in enumerate(enc):
            x[i, : len(e)] = torch.tensor(e)
        _, cache = ht.run_with_cache(x, names_filter=hook, stop_at_layer=int(hook.split(".")[1]) + 1)
        acts = cache[hook]  # [batch, pos, d_model]
        for i, e in enumerate(enc):
            yield s + i, acts[i, : len(e)].clone()


@torch.no_grad()
def last_token_activations(ht, tokenizer, prompts: list[str], hook: str, batch_size: int = 64) -> torch.Tensor:
    """Activation at each prompt's last token (where the answer starts).  # [n_prompts, d_model]"""
    out = torch.empty(len(prompts), ht.cfg.d_model)
    for i, acts in iter_activations(ht, tokenizer, prompts, hook, batch_size=batch_size):
        out[i] = acts[-1]
    return out


def train_sae(acts: torch.Tensor, *, width: int, k: int, steps: int, batch: int, lr: float, seed: int,
              hook: str = "", model_name: str = "", rescale_by_decoder_norm: bool = True, dead_window: int = Config.sae_dead_window):
    """Train a TopK SAE with SAELens on activations ``acts`` [n, d_in]; returns the SAE.

    A latent that has not fired for ``dead_window`` steps counts as dead, and SAELens' AuxK
    loss (Gao et al. 2024) trains the dead latents to reconstruct what the live ones miss,
    which revives them. The window must be short against the whole run; the default is the
    study's (``Config.sae_dead_window``).

    ``rescale_by_decoder_norm`` (SAELens' default for TopK training) treats the decoder as
    unit-norm inside the forward pass, so a latent's activation is in units of its
    decoder direction and latents compare with each other (model diffing ranks them).
    Without it training is faster (bench/) but each latent's scale is arbitrary."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    cfg = TopKTrainingSAEConfig(d_in=acts.shape[1], d_sae=width, k=k, dtype="float32", device="cpu",
                                normalize_activations="none", rescale_acts_by_decoder_norm=rescale_by_decoder_norm)
    cfg.metadata.hook_name = hook
    cfg.metadata.model_name = model_name
    sae = TopKTrainingSAE(cfg)
    gen = torch.Generator().manual_seed(seed)

    def stream() -> Iterator[torch.Tensor]:
        while True:
            yield acts[torch.randint(0, len(acts), (batch,), generator=gen)]

    tcfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=lr, lr_end=lr,
                            lr_scheduler_name="constant", device="cpu", n_batches_for_norm_estimate=10,
                            dead_feature_window=dead_window)
    import sae_lens.training.sae_trainer as trainer_module

    bar = trainer_module.tqdm
    trainer_module.tqdm = functools.partial(bar, disable=True)  # SAELens' own progress bar
    try:
        SAETrainer(tcfg, sae, stream()).fit()
    finally:
        trainer_module.tqdm = bar
    return sae


def save_sae(sae, path: Path) -> None:
    """Save in SAELens' inference format (cfg.json + sae_weights.safetensors)."""
    sae.save_inference_model(path)


def load_sae(path: Path, d_model: int | None = None):
    """Reload an SAE with SAELens; checks its input width against the model's."""
    from sae_lens import SAE

    path = Path(path)
    if not (path / "cfg.json").is_file():
        raise FileNotFoundError(f"{path}: no SAE here (expected cfg.json and sae_weights.safetensors)")
    sae = SAE.load_from_disk(path)
    if d_model is not None and sae.cfg.d_in != d_model:
        raise SAEShapeError(f"{path}: the SAE reads d_in={sae.cfg.d_in} but the model's residual stream has d_model={d_model}")
    return sae


@torch.no_grad()
def sae_stats(sae, test: torch.Tensor, train: torch.Tensor) -> dict[str, float]:
    """Held-out fraction of variance unexplained, mean L0, and the fraction of latents
    that never fire on ``train``."""
    f = sae.encode(test)
    rec = sae.decode(f)
    fvu = ((rec - test) ** 2).sum() / ((test - test.mean(0)) ** 2).sum()
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for s in range(0, len(train), 8192):
        fired |= (sae.encode(train[s : s + 8192]) > 0).any(0)
    return {"fvu": float(fvu), "l0": float((f > 0).float().sum(1).mean()), "dead_fraction": float((~fired).float().mean())}
