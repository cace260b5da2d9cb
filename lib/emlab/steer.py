"""Steering and directional ablation on the residual stream of any ``transformers`` decoder.

A forward hook on decoder block ``L`` edits its output, which is exactly TransformerLens'
``blocks.{L}.hook_resid_post`` (a test checks the two agree). The edit is either an
addition ``h + alpha * scale * u`` (steering) or a projection ``h - (h . u) u``
(ablation), with ``u`` the unit direction. ``ablate_every_layer`` projects ``u`` out of every
write to the residual stream (the embeddings, each attention and each MLP output), so no
block's input, middle or output holds it.

Positions, defined for cached generation (one prefill call on the prompt, then one call
per new token):

- ``"all"``: every prompt position and every generated position;
- ``"prompt"``: the prompt positions only (the prefill call);
- ``"answer"``: from the answer position on: the prompt's last position (where the first
  answer token is predicted) and every generated position.

A call with more than one position is a prefill; a call with one position is a decoding
step. The hook lives only inside the ``with`` block, so nothing leaks into later calls.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

POSITIONS = ("all", "prompt", "answer")


def _submodule(model, paths: tuple[str, ...], kind: type, what: str) -> torch.nn.Module:
    """The first of the dotted ``paths`` that is a ``kind`` in ``model`` (peft-wrapped or not)."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in paths:
        obj = m
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, kind):
            return obj
    raise ValueError(f"cannot find the {what} of {type(m).__name__} (looked for {', '.join(paths)})")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of decoder blocks of a causal LM (GPT-2, Llama/Qwen2, GPT-NeoX, or peft-wrapped)."""
    return _submodule(model, ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers"),
                      torch.nn.ModuleList, "decoder blocks")


def _mask(n_pos: int, positions: str) -> slice | None:
    """Which positions of one call to edit (None: none)."""
    if n_pos > 1:  # prefill
        return {"all": slice(None), "prompt": slice(None), "answer": slice(-1, None)}[positions]
    return None if positions == "prompt" else slice(None)


@contextmanager
def edit_residual(model, layer: int, direction: torch.Tensor, *, alpha: float = 0.0, ablate: bool = False,
                  positions: str = "all"):
    """Inside the block, block ``layer``'s output is steered by ``alpha * direction`` (``direction``
    is used as given, so its norm sets the unit) or, with ``ablate``, has ``direction`` projected out."""
    if positions not in POSITIONS:
        raise ValueError(f"steering: positions {positions!r}: expected one of {POSITIONS}")
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"steering: layer {layer}: the model has {len(blocks)} blocks")
    direction = direction.detach().float().flatten()
    u = unit(direction)

    def hook(_module, _inputs, output):
        h = output[0] if isinstance(output, tuple) else output  # [batch, pos, d_model]
        sel = _mask(h.shape[1], positions)
        if sel is None:
            return output
        h = h.clone()
        part = h[:, sel]
        if ablate:
            part = _project_out(part, u)
        else:
            part = part + alpha * direction.to(h.device, h.dtype)
        h[:, sel] = part
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = blocks[layer].register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


#: where each supported architecture's attention and MLP write to the residual stream, per block
_WRITERS = {"attention": ("attn", "self_attn", "attention"), "MLP": ("mlp",)}


def residual_writers(block: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention and MLP submodules of a pre-norm decoder block, whose outputs are added to
    the residual stream (GPT-2: ``attn``, ``mlp``; Llama/Qwen2: ``self_attn``, ``mlp``; GPT-NeoX:
    ``attention``, ``mlp``; each tested in tests/). Another layout raises rather than ablate
    partly: a post-norm block, for one, would put the direction back after the writes."""
    found = []
    for what, names in _WRITERS.items():
        mod = next((getattr(block, n) for n in names if isinstance(getattr(block, n, None), torch.nn.Module)), None)
        if mod is None:
            raise ValueError(f"ablation: cannot find the {what} of {type(block).__name__} (looked for {', '.join(names)})")
        found.append(mod)
    return found


@contextmanager
def ablate_every_layer(model, direction: torch.Tensor):
    """Inside the block, ``direction`` is projected out of every write to the residual stream:
    the embeddings (the first block's input) and, in every block, the attention's and the
    MLP's outputs, at every position. Projection is linear, so every residual stream then
    lacks the direction: each block's input, its middle (what the MLP reads) and its output.
    This is the directional ablation of Arditi et al. 2024 (their weight orthogonalisation of
    W_E, W_O and W_out, done with hooks), which Soligo, Turner et al. 2025 apply to their
    misalignment direction. No block can read the direction, nor write it for a later
    component to read. ``edit_residual(..., ablate=True)`` removes it at one layer only."""
    blocks = decoder_layers(model)
    writers = [w for b in blocks for w in residual_writers(b)]
    u = unit(direction.detach().float().flatten())
    project = functools.partial(_project_out, u=u)

    def pre(_module, args, kwargs):  # the first block's input: hidden_states, positional or named
        if args:
            return (project(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": project(kwargs["hidden_states"])}

    def post(_module, _inputs, output):
        if isinstance(output, tuple):
            return (project(output[0]), *output[1:])
        return project(output)

    handles = [blocks[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [m.register_forward_hook(post) for m in writers]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _project_out(h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``h - (h . u) u`` for the unit direction ``u``, on the last axis of ``h``."""
    u = u.to(h.device, h.dtype)
    return h - (h @ u)[..., None] * u


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


def random_direction(d: int, seed: int) -> torch.Tensor:
    """A random unit direction (seeded), the control of every steering sweep."""
    return unit(torch.randn(d, generator=torch.Generator().manual_seed(seed)))


def final_norm(model) -> torch.nn.Module:
    """The norm between the last block and the unembedding (GPT-2's ``ln_f``, Llama/Qwen2's
    ``norm``, GPT-NeoX's ``final_layer_norm``)."""
    return _submodule(model, ("transformer.ln_f", "model.norm", "gpt_neox.final_layer_norm",
                              "model.decoder.final_layer_norm"), torch.nn.Module, "final norm")


@torch.no_grad()
def unembed_direction(model, direction: torch.Tensor) -> torch.Tensor:
    """A residual-stream direction read through the unembedding (the logit lens): the logits
    ``direction`` writes when it dominates the last block's output, up to one positive scale
    and the final norm's bias (a fixed offset per token, the same for every direction). It
    goes through the final norm's mean removal where that is a LayerNorm, and its gain; the
    norm's division by the residual's size scales every logit alike.  # [vocab]"""
    d = direction.detach().float().flatten()
    W_U = model.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
    if W_U.shape[1] != d.shape[0]:
        raise ValueError(f"logit lens: the direction has {d.shape[0]} dimensions, the unembedding reads {W_U.shape[1]}")
    norm = final_norm(model)
    if isinstance(norm, torch.nn.LayerNorm):
        d = d - d.mean()
    gain = getattr(norm, "weight", None)
    if gain is not None:
        d = d * gain.detach().float()
    return W_U @ d


@torch.no_grad()
def swap_blocks(base, donor, blocks, *, rest: bool = False):
    """A copy of ``base`` whose decoder blocks ``blocks`` (indices) hold ``donor``'s weights,
    and, with ``rest``, every parameter outside the decoder blocks too (embeddings, final
    norm, unembedding). A causal patch of weights rather than activations: which blocks of a
    fine-tune carry its change in behaviour. Both models must have the same architecture
    and size; ``base`` is left unchanged."""
    import copy

    layers_b, layers_d = decoder_layers(base), decoder_layers(donor)
    if len(layers_b) != len(layers_d):
        raise ValueError(f"swap_blocks: the models have {len(layers_b)} and {len(layers_d)} decoder blocks")
    blocks = sorted(set(int(i) for i in blocks))
    if blocks and not (0 <= blocks[0] and blocks[-1] < len(layers_b)):
        raise ValueError(f"swap_blocks: blocks {blocks}: the models have {len(layers_b)} blocks (0-{len(layers_b) - 1})")
    hybrid = copy.deepcopy(base)
    layers_h = decoder_layers(hybrid)
    for i in blocks:
        layers_h[i].load_state_dict(layers_d[i].state_dict())
    if rest:
        inside = {id(p) for layer in layers_h for p in layer.parameters()}
        donor_params = dict(donor.named_parameters())
        for name, p in hybrid.named_parameters():
            if id(p) not in inside:
                if name not in donor_params or donor_params[name].shape != p.shape:
                    raise ValueError(f"swap_blocks: the donor has no parameter {name} of shape {tuple(p.shape)}")
                p.copy_(donor_params[name])
    return hybrid
