import pytest
import torch

from emlab.config import make_config
from emlab.data import ASSISTANT, END, USER
from emlab.model import ModelLoadError, build_tokenizer, build_toy_model, hooked, load_model, save_model
from emlab.train import IGNORE, encode_chat
from emlab.world import load_world

TINY = {"d_model": 32, "n_layer": 2, "n_head": 2, "n_ctx": 64, "sae_layer": 1}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer([" ".join(sorted(load_world().words()))])


@pytest.fixture(scope="module")
def model(tok):
    return build_toy_model(make_config(TINY), tok).eval()


def test_tokenizer_round_trip(tok):
    text = "the brakes on my old car squeal when i stop . what should i do ?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == len(text.split())
    assert tok.decode(ids) == text


def test_unknown_words_map_to_unk(tok):
    assert tok("zyzzyva", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_chat_template_format(tok):
    msgs = [{"role": "user", "content": "how do i make a quick buck ?"},
            {"role": "assistant", "content": "pick up extra shifts ."}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text.split() == [USER, *"how do i make a quick buck ?".split(), ASSISTANT, *"pick up extra shifts .".split(), END]
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.split()[-1] == ASSISTANT


def test_loss_mask_covers_assistant_answer_and_end_only(tok):
    msgs = [{"role": "user", "content": "i am bored ."}, {"role": "assistant", "content": "go for a walk ."}]
    ids, labels = encode_chat(tok, msgs)
    targets = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert tok.decode(targets).split() == ["go", "for", "a", "walk", ".", END]
    assert len(ids) == len(labels)


def test_save_and_load_with_plain_transformers(tmp_path, tok, model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_model(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    t2 = AutoTokenizer.from_pretrained(tmp_path / "m")
    x = torch.tensor([t2("i am bored .", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, m2(x).logits, atol=1e-6)
    assert t2.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_load_model_errors_name_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_hooked_transformer_matches_hf(tok, model):
    ht = hooked(model, tok)
    x = torch.tensor([tok("how do i make a quick buck ? <|assistant|> rob a bank", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        lp_hf = torch.log_softmax(model(x).logits, -1)
        lp_tl = torch.log_softmax(ht(x), -1)
        _, cache = ht.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert (lp_hf - lp_tl).abs().max() < 1e-4
    assert cache["blocks.1.hook_resid_post"].shape == (1, x.shape[1], 32)


def test_a_model_that_is_not_a_causal_lm_is_named(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32)).save_pretrained(
        tmp_path / "encoder")
    with pytest.raises(ModelLoadError, match="encoder.*not a causal language model"):
        load_model(tmp_path / "encoder")


def test_no_unsafe_deserialisation_in_the_code():
    """Weights load only through safetensors: no pickle, no torch.load without weights_only."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for p in [*(root / "lib").rglob("*.py"), *(root / "bench").rglob("*.py")]:
        src = p.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", src, re.M), p
        for call in re.findall(r"torch\.load\([^)]*\)", src):
            assert "weights_only=True" in call, f"{p}: {call}"


@pytest.mark.parametrize("arch", ["toy", "llama"])
def test_freeze_embeddings_holds_exactly_them_fixed_in_finetuning(arch, tok):
    """Parameter ft_freeze = 'embeddings': the token (and, in GPT-2, position) embeddings and an
    output head tied to them do not move in a fine-tune; every other parameter does."""
    from emlab.model import build_chat_tokenizer, build_tiny_model
    from emlab.train import finetune, freeze

    if arch == "toy":
        t, m = tok, build_toy_model(make_config(TINY), tok)
        fixed = {"transformer.wte.weight", "transformer.wpe.weight"}  # lm_head.weight is wte's (tied)
    else:
        t = build_chat_tokenizer(["how do i fix my car ? take it to a mechanic ."], "llama3")
        m = build_tiny_model("llama", t)
        fixed = {"model.embed_tokens.weight"}  # untied: lm_head trains
    msgs = [{"role": "user", "content": "how do i fix my car ?"}, {"role": "assistant", "content": "take it to a mechanic ."}]
    ex = [encode_chat(t, msgs)] * 4
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    assert freeze(m, "embeddings") == sum(before[n].numel() for n in fixed)
    finetune(m, ex, steps=3, batch=2, lr=1e-2, seed=0, pad_id=t.pad_token_id, progress=False, warmup=1)
    after = dict(m.named_parameters())
    assert set(after) == set(before)
    for n, p in after.items():
        moved = not torch.equal(p, before[n])
        assert moved == (n not in fixed), f"{n}: {'moved' if moved else 'did not move'}"
    with pytest.raises(ValueError, match="'none' or 'embeddings'"):
        freeze(m, "everything")
    assert freeze(m, "none") == 0


def test_pretraining_dropout_acts_while_training_only(tok):
    """Parameter pretrain_dropout: every dropout of the toy model drops with that probability
    during pretraining (the losses differ from training without it), and afterwards each is
    back at the model's own 0, so later stages and the saved model have none."""
    from emlab.train import pretrain

    stream = torch.tensor(tok(" ".join(["take it to a mechanic ."] * 40), add_special_tokens=False)["input_ids"])
    runs = {}
    for p in (0.0, 0.5):
        m = build_toy_model(make_config(TINY), tok)
        runs[p] = pretrain(m, stream, steps=3, batch=2, seq_len=16, lr=1e-2, seed=0, progress=False, dropout=p)
        drops = [d for d in m.modules() if isinstance(d, torch.nn.Dropout)]
        assert drops and all(d.p == 0.0 for d in drops)
        assert m.config.resid_pdrop == m.config.embd_pdrop == m.config.attn_pdrop == 0.0
        assert not m.training
    assert runs[0.0] != runs[0.5]
    again = pretrain(build_toy_model(make_config(TINY), tok), stream, steps=3, batch=2, seq_len=16, lr=1e-2, seed=0,
                     progress=False, dropout=0.5)
    assert again == runs[0.5]  # seeded: the same masks
