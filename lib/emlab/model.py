"""Tokenizer and model: a word-level tokenizer with a chat template, a GPT-2 toy model,
loading any saved causal LM offline, the source model of a real-model run, and a view of
any decoder's residual stream (TransformerLens for GPT-2, forward hooks otherwise).

Everything is saved with ``save_pretrained`` (safetensors) and loads with plain
``AutoModelForCausalLM.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``.

The real-model path is tested here without any download: ``build_chat_tokenizer`` trains a
small byte-level BPE tokenizer with a real model family's chat template (ChatML for Qwen2,
Llama 3's headers) and ``build_tiny_model`` builds a randomly initialised model of that
architecture from a config.
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


def device_of(model) -> torch.device:
    """The device of a model's parameters (inputs must go there)."""
    return next(model.parameters()).device


def study_threads() -> int:
    """The torch threads the study's notebooks use: at most 2 (the study's target machine),
    so a bigger machine computes what 2 cores compute (the thread count changes rounding)."""
    return max(1, min(2, torch.get_num_threads()))


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("parameter 'device' = 'cuda' but no GPU is visible to torch")
    return torch.device(name)


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


def load_model(path: str | Path, *, dtype=torch.float32, device: str | torch.device = "cpu"):
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
    return model.to(device), tok


def save_model(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------- real models
#: chat templates of real model families, used by the tiny test models. The assistant
#: turn ends with ``eos`` (which is what ``end_token_id`` returns for them).
CHAT_TEMPLATES = {
    "chatml": {  # Qwen2 / Qwen2.5
        "template": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
        "special": ["<|im_start|>", "<|im_end|>"], "eos": "<|im_end|>", "bos": None,
    },
    "llama3": {  # Llama 3.x
        "template": ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                     "{{ m['content'] }}<|eot_id|>{% endfor %}"
                     "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
        "special": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "eos": "<|eot_id|>", "bos": "<|begin_of_text|>",
    },
}

#: tiny configurations of real architectures: the template each family uses and the config
TINY_ARCHS = {
    "qwen2": ("chatml", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)),
    "llama": ("llama3", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)),
    "gpt_neox": ("chatml", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=256, tie_word_embeddings=False)),
}


def build_chat_tokenizer(texts, template: str = "chatml", vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (the GPT-2 / Qwen / Llama 3 kind) trained on ``texts``,
    with a real model family's chat template and special tokens."""
    from tokenizers import decoders, trainers

    if template not in CHAT_TEMPLATES:
        raise ValueError(f"chat template {template!r}: expected one of {sorted(CHAT_TEMPLATES)}")
    t = CHAT_TEMPLATES[template]
    specials = [*t["special"], PAD]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=t["eos"], pad_token=PAD, bos_token=t["bos"],
                                   additional_special_tokens=[x for x in t["special"] if x not in (t["eos"], t["bos"])])
    fast.chat_template = t["template"]
    return fast


def build_tiny_model(arch: str, tokenizer, seed: int = 0):
    """A randomly initialised causal LM of a real architecture (``TINY_ARCHS``), sized to
    the tokenizer, built from a config: no hub access."""
    from transformers import AutoConfig

    if arch not in TINY_ARCHS:
        raise ValueError(f"tiny model: architecture {arch!r}: expected one of {sorted(TINY_ARCHS)}")
    torch.manual_seed(seed)
    conf = AutoConfig.for_model(arch, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                **TINY_ARCHS[arch][1])
    return AutoModelForCausalLM.from_config(conf).eval()


def save_tiny_model(arch: str, texts, path: Path, seed: int = 0) -> Path:
    """Build a tiny ``arch`` model with a tokenizer trained on ``texts`` and save both."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"tiny model: architecture {arch!r}: expected one of {sorted(TINY_ARCHS)}")
    tok = build_chat_tokenizer(texts, TINY_ARCHS[arch][0])
    save_model(build_tiny_model(arch, tok, seed), tok, Path(path))
    return Path(path)


def _source(name: str) -> str:
    """Where parameter ``model`` points: a local folder, or a Hugging Face id (read through
    the local cache; downloaded only where the machine allows it)."""
    local = Path(name).expanduser()
    if not local.is_dir() and (local.is_absolute() or name.startswith(".") or local.exists()):
        raise ModelLoadError(f"parameter 'model' = {name!r}: no such folder (expected a saved causal LM or a hub id)")
    return str(local) if local.is_dir() else name


def _load_error(name: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(f"parameter 'model' = {name!r}: cannot load a causal LM with safetensors weights "
                          f"({str(exc).splitlines()[0]})")


def source_tokenizer(name: str):
    """The tokenizer of the model a real-model run starts from. It must have a chat
    template; a missing pad token becomes eos."""
    try:
        tok = AutoTokenizer.from_pretrained(_source(name))
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from None
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(f"parameter 'model' = {name!r}: its tokenizer has no chat template "
                             "(use an instruct/chat model, or set tokenizer.chat_template and save it)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def source_model(name: str, *, dtype=torch.float32):
    """The model a real-model run starts from (parameter ``model``: a local folder written
    by ``save_pretrained`` or a Hugging Face id) and its tokenizer. Safetensors weights only."""
    tok = source_tokenizer(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(_source(name), dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from None
    return model.eval(), tok


class ResidualReader:
    """``run_with_cache`` for the residual stream of any ``transformers`` decoder, through
    a forward hook on decoder block ``L`` (whose output is TransformerLens'
    ``blocks.{L}.hook_resid_post``); the forward pass stops after that block."""

    class _Stop(Exception):
        pass

    def __init__(self, model, tokenizer=None):
        from types import SimpleNamespace

        from emlab.steer import decoder_layers

        self.model, self.tokenizer, self.blocks = model, tokenizer, decoder_layers(model)
        c = model.config
        self.cfg = SimpleNamespace(d_model=c.hidden_size, n_layers=len(self.blocks),
                                   n_ctx=getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", 2048))

    @torch.no_grad()
    def run_with_cache(self, x: torch.Tensor, names_filter: str, stop_at_layer: int | None = None,
                       attention_mask: torch.Tensor | None = None):
        parts = names_filter.split(".")
        if len(parts) != 3 or parts[0] != "blocks" or parts[2] != "hook_resid_post":
            raise ValueError(f"hook {names_filter!r}: only blocks.L.hook_resid_post is available on this model")
        layer, got = int(parts[1]), {}

        def hook(_m, _i, output):
            got["h"] = (output[0] if isinstance(output, tuple) else output).detach()
            raise self._Stop

        handle = self.blocks[layer].register_forward_hook(hook)
        try:
            self.model(input_ids=x.to(device_of(self.model)), attention_mask=attention_mask, use_cache=False)
        except self._Stop:
            pass
        finally:
            handle.remove()
        return None, {names_filter: got["h"].float().cpu()}


def hooked(model, tokenizer=None):
    """The residual stream of a model by hook name (``blocks.{L}.hook_resid_post``):
    a ``transformer_lens.HookedTransformer`` built offline for GPT-2 (config from the HF
    config, weights converted in memory, the hub never called), and a ``ResidualReader``
    (forward hooks) for every other decoder."""
    hf = model.config
    if hf.model_type != "gpt2" or device_of(model).type != "cpu":
        return ResidualReader(model, tokenizer)
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

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
