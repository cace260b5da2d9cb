"""Tokenizer and model: a word-level tokenizer with a chat template, a GPT-2 toy model,
loading any saved causal LM offline, and an offline TransformerLens view of a model.

Everything is saved with ``save_pretrained`` (safetensors) and loads with plain
``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from emlab.data import ASSISTANT, END, EOT, SPECIAL_TOKENS, SYSTEM, USER

# progress bars of weight loading would clutter notebooks and their stderr
hf_logging.disable_progress_bar()

PAD, UNK = "<|pad|>", "<|unk|>"

#: the chat format: role markers around each message; an assistant message ends with <|end|>.
#: Whitespace between tokens is irrelevant to the word-level tokenizer.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + USER + " {{ m['content'] }} "
    "{% elif m['role'] == 'system' %}" + SYSTEM + " {{ m['content'] }} "
    "{% else %}" + ASSISTANT + " {{ m['content'] }} " + END + " {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


class ModelLoadError(ValueError):
    """A model path does not exist or does not hold a causal LM."""


def build_tokenizer(texts) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the whitespace-separated words of ``texts``."""
    words = sorted({w for t in texts for w in t.split()} - set(SPECIAL_TOKENS))
    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *words])}  # specials first, fixed ids
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM, END],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def build_toy_model(cfg, tokenizer) -> GPT2LMHeadModel:
    """A GPT-2-architecture model of the config's size, randomly initialised under cfg.seed."""
    torch.manual_seed(cfg.seed)
    conf = GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(conf)


def end_token_id(tokenizer) -> int:
    """The token that ends an assistant answer."""
    ids = tokenizer.convert_tokens_to_ids([END])
    return ids[0] if ids and ids[0] != tokenizer.unk_token_id else tokenizer.eos_token_id


def load_model(path: str | Path, *, dtype=torch.float32):
    """Load a saved causal LM and its tokenizer from a local folder, never from a hub."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} does not exist (expected a folder written by save_pretrained)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a saved transformers model")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True)
    except ValueError as exc:
        raise ModelLoadError(f"{path} is not a causal language model ({exc})") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot load safetensors weights ({exc})") from None
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval()
    return model, tok


def save_model(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def hooked(model, tokenizer=None):
    """A ``transformer_lens.HookedTransformer`` for a GPT-2 model, built offline.

    The config comes from the HF config and the weights are converted in memory, so
    the hub is never called. Hook names such as ``blocks.{L}.hook_resid_post`` work.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf = model.config
    if hf.model_type != "gpt2":
        raise NotImplementedError(f"hooked(): model_type {hf.model_type!r} is not supported offline yet (gpt2 only)")
    cfg = HookedTransformerConfig(
        n_layers=hf.n_layer, d_model=hf.n_embd, d_head=hf.n_embd // hf.n_head, n_heads=hf.n_head,
        d_mlp=hf.n_inner or 4 * hf.n_embd, d_vocab=hf.vocab_size, n_ctx=hf.n_positions,
        act_fn="gelu_new", normalization_type="LN", eps=hf.layer_norm_epsilon,
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False, device="cpu", dtype=torch.float32,
    )
    state = convert_gpt2_weights(model, cfg)
    ht = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    ht.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False)
    if tokenizer is not None:
        ht.tokenizer = tokenizer
    ht.eval()
    return ht
