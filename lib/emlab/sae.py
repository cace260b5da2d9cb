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


class _EncodeTopK(torch.autograd.Function):
    """A TopK SAE's encoder with a sparse backward pass.

    Forward: ``hidden = ((x - bias) @ W_enc + b_enc) * scale``; the top ``k`` entries of each
    row; and, for AuxK, the top ``k_aux`` entries of each row among the columns ``dead``.
    Returns ``hidden, vals, idx, aux_vals, aux_j`` (``aux_j`` indexes ``dead``).

    The losses read only the selected entries, so only they get a gradient. Autograd's dense
    backward would multiply a [rows, width] gradient that is almost all zeros; here the
    gradients of ``W_enc``, ``b_enc`` and ``scale`` are accumulated from the selected
    entries alone (or, when they are a large share of the row, through one dense product).
    ``x`` gets no gradient (it is the data); ``bias`` (the decoder bias subtracted from the
    input) gets its gradient as one vector-matrix product. ``hidden`` is returned for the
    caller's records and must not enter a loss."""

    @staticmethod
    def forward(ctx, x, bias, W_enc, b_enc, scale, k: int, dead, k_aux: int):
        sae_in = x - bias
        pre = torch.addmm(b_enc, sae_in, W_enc)
        hidden = pre * scale if scale is not None else pre
        vals, idx = hidden.topk(k, dim=-1, sorted=False)
        aux_vals = aux_j = cols = None
        if k_aux:
            aux_vals, aux_j = hidden.index_select(1, dead).topk(k_aux, dim=-1, sorted=False)
            cols = torch.cat([idx, dead.take(aux_j)], dim=1)
        ctx.save_for_backward(sae_in, W_enc, pre, idx if cols is None else cols, scale)
        ctx.k = k
        ctx.mark_non_differentiable(hidden, idx, *([] if aux_j is None else [aux_j]))
        ctx.set_materialize_grads(False)
        return hidden, vals, idx, aux_vals, aux_j

    @staticmethod
    def backward(ctx, _g_hidden, g_vals, _g_idx, g_aux, _g_aux_j):
        sae_in, W_enc, pre, cols, scale = ctx.saved_tensors
        need_bias, need_w, need_b, need_s = ctx.needs_input_grad[1:5]
        rows, width = pre.shape
        if g_vals is None and g_aux is None:
            return (None,) * 8
        g = g_vals if g_vals is not None else pre.new_zeros(rows, ctx.k)
        if cols.shape[1] > ctx.k:  # AuxK's entries follow the top k
            g = torch.cat([g, g_aux if g_aux is not None else pre.new_zeros(rows, cols.shape[1] - ctx.k)], dim=1)
        flat = cols.reshape(-1)
        gpre = g * scale.take(cols) if scale is not None else g  # d loss / d pre at the selected entries
        gs = None
        if scale is not None and need_s:
            gs = pre.new_zeros(width).index_add_(0, flat, (g * pre.gather(-1, cols)).reshape(-1))
        gb = pre.new_zeros(width).index_add_(0, flat, gpre.reshape(-1))
        gW = None
        if need_w:
            if cols.shape[1] * 8 <= width:  # few entries: column cols[n, j] of W_enc gets gpre[n, j] sae_in[n]
                contrib = sae_in.repeat_interleave(cols.shape[1], dim=0) * gpre.reshape(-1, 1)
                gW = sae_in.new_zeros(width, sae_in.shape[1]).index_add_(0, flat, contrib).T
            else:
                gW = sae_in.T @ torch.zeros_like(pre).scatter_add_(-1, cols, gpre)
        gbias = -(W_enc @ gb) if need_bias else None
        return None, gbias, gW, gb if need_b else None, gs, None, None, None


@functools.cache
def _sparse_topk_training_sae():
    """SAELens' ``TopKTrainingSAE`` with a sparse training step (built on first use, so
    that importing emlab does not import SAELens)."""
    from sae_lens import TopKTrainingSAE
    from sae_lens.saes.sae import TrainStepOutput

    class SparseTopKTrainingSAE(TopKTrainingSAE):
        """SAELens' ``TopKTrainingSAE`` whose training step computes the same loss (MSE +
        AuxK on the dead latents) from the selected latents of each row instead of dense
        [rows, width] products: the encoder's backward (``_EncodeTopK``), the decoder
        (``embedding_bag`` over the k active rows of W_dec) and AuxK's reconstruction (from
        the dead rows of W_dec alone). Gradients equal the dense ones to float rounding
        (tests/test_sae_diffing.py); bench/ measures the speed. With a hook attached, with
        activation normalisation or reshaping, or outside training it is SAELens' own
        code: the saved SAE is SAELens' TopK SAE either way."""

        def _sparse_ok(self, x: torch.Tensor) -> bool:
            return (self.training and x.dim() == 2 and not x.requires_grad
                    and self.cfg.normalize_activations == "none" and self.cfg.reshape_activations == "none"
                    and not any(m._forward_hooks or m._backward_hooks for m in self.modules()))

        def training_forward_pass(self, step_input):
            x = step_input.sae_in
            if not self._sparse_ok(x):
                return super().training_forward_pass(step_input)
            x = x.to(self.dtype)
            mask = step_input.dead_neuron_mask
            num_dead = 0 if mask is None else int(mask.sum())
            dead = mask.nonzero().squeeze(1) if num_dead else None
            k_aux_full = x.shape[-1] // 2  # as SAELens (Gao et al. 2024, appendix B.1)
            k_aux = min(k_aux_full, num_dead)
            bias = self.b_dec * self.cfg.apply_b_dec_to_input  # SAELens' process_sae_in
            norm = self.W_dec.norm(dim=-1, keepdim=True) if self.cfg.rescale_acts_by_decoder_norm else None
            hidden_pre, vals, idx, aux_vals, aux_j = _EncodeTopK.apply(
                x, bias, self.W_enc, self.b_enc, None if norm is None else norm.squeeze(1), self.cfg.k, dead, k_aux)
            vals = vals.relu()
            feature_acts = torch.zeros_like(hidden_pre).scatter_(-1, idx, vals.detach())
            unit = self.W_dec if norm is None else self.W_dec / norm  # act_times_W_dec's rescaling
            sae_out = torch.nn.functional.embedding_bag(idx, unit, per_sample_weights=vals, mode="sum") + self.b_dec
            mse_loss = self.mse_loss_fn(sae_out, x).sum(dim=-1).mean()
            if k_aux:  # SAELens' calculate_topk_aux_loss
                residual = (x - sae_out).detach()
                acts = x.new_zeros(len(x), num_dead).scatter(-1, aux_j, aux_vals)
                aux = (acts @ unit.index_select(0, dead) - residual).pow(2).sum(dim=-1).mean()
                aux = self.cfg.aux_loss_coefficient * min(num_dead / k_aux_full, 1.0) * aux
            else:
                aux = sae_out.new_tensor(0.0)
            return TrainStepOutput(sae_in=x, sae_out=sae_out, feature_acts=feature_acts, hidden_pre=hidden_pre,
                                   loss=mse_loss + aux,
                                   losses={"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux})

    return SparseTopKTrainingSAE


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
    from sae_lens import TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    cfg = TopKTrainingSAEConfig(d_in=acts.shape[1], d_sae=width, k=k, dtype="float32", device="cpu",
                                normalize_activations="none", rescale_acts_by_decoder_norm=rescale_by_decoder_norm)
    cfg.metadata.hook_name = hook
    cfg.metadata.model_name = model_name
    sae = _sparse_topk_training_sae()(cfg)
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
        trainer = SAETrainer(tcfg, sae, stream())
        for group in trainer.optimizer.param_groups:  # the same Adam update in one fused kernel per tensor
            group.update(foreach=False, fused=True)
        trainer.fit()
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
