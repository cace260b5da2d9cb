import pytest
import torch

from emlab.config import make_config
from emlab.model import build_tokenizer, build_toy_model, hooked
from emlab.sample import sample
from emlab.steer import decoder_layers, edit_residual, random_direction
from emlab.world import load_world


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer([" ".join(sorted(load_world().words()))])
    model = build_toy_model(make_config({"d_model": 32, "n_layer": 3, "n_head": 2, "n_ctx": 64, "sae_layer": 1}), tok).eval()
    return model, tok


def _ids(tok, text="<|user|> how do i make a quick buck ? <|end|> <|assistant|>"):
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def _resid(model, x, layer):
    """Every block's output on one prefill call.  # list of [batch, pos, d_model]"""
    out = {}
    handles = [b.register_forward_hook(lambda m, i, o, k=k: out.__setitem__(k, o[0] if isinstance(o, tuple) else o))
               for k, b in enumerate(decoder_layers(model))]
    try:
        with torch.no_grad():
            model(input_ids=x)
    finally:
        for h in handles:
            h.remove()
    return [out[k] for k in range(len(out))]


@pytest.mark.parametrize("positions,changed", [("all", "all"), ("prompt", "all"), ("answer", "last")])
def test_steering_changes_exactly_the_chosen_layer_and_positions(tiny, positions, changed):
    model, tok = tiny
    x = _ids(tok)
    d = random_direction(32, 0) * 3.0
    before = _resid(model, x, 1)
    with edit_residual(model, 1, d, alpha=1.0, positions=positions):
        after = _resid(model, x, 1)
    assert torch.equal(before[0], after[0])  # the layer below is untouched
    delta = after[1] - before[1]  # [1, pos, d]
    sel = slice(None) if changed == "all" else slice(-1, None)
    assert torch.allclose(delta[:, sel], d.expand_as(delta[:, sel]), atol=1e-5)
    if changed == "last":
        assert torch.equal(delta[:, :-1], torch.zeros_like(delta[:, :-1]))
    assert not torch.equal(before[2], after[2])  # and it propagates upward


def test_decoding_steps_follow_the_position_rule(tiny):
    model, tok = tiny
    d = random_direction(32, 1) * 5.0
    one = torch.tensor([[tok.convert_tokens_to_ids("quick")]])
    base = _resid(model, one, 1)[1]
    for positions, edited in (("prompt", False), ("answer", True), ("all", True)):
        with edit_residual(model, 1, d, alpha=1.0, positions=positions):
            got = _resid(model, one, 1)[1]
        assert torch.allclose(got - base, d.expand_as(got) if edited else torch.zeros_like(got), atol=1e-5)


def test_hook_is_removed_afterwards_even_on_error(tiny):
    model, tok = tiny
    x = _ids(tok)
    with torch.no_grad():
        ref = model(input_ids=x).logits
    with pytest.raises(RuntimeError):
        with edit_residual(model, 1, random_direction(32, 2), alpha=10.0):
            raise RuntimeError("boom")
    with edit_residual(model, 2, random_direction(32, 2), alpha=10.0):
        pass
    assert all(len(b._forward_hooks) == 0 for b in decoder_layers(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref)


def test_steering_matches_transformer_lens_hook_resid_post(tiny):
    model, tok = tiny
    x = _ids(tok)
    d = random_direction(32, 3) * 2.0
    ht = hooked(model, tok)

    def add(act, hook):
        return act + d

    with torch.no_grad():
        tl = ht.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_post", add)])
        with edit_residual(model, 1, d, alpha=1.0, positions="all"):
            hf = model(input_ids=x).logits
    assert torch.allclose(tl, hf, atol=1e-4)


def test_ablation_removes_the_direction(tiny):
    model, tok = tiny
    x = _ids(tok)
    d = random_direction(32, 4)
    with edit_residual(model, 1, d * 7.0, ablate=True):
        h = _resid(model, x, 1)[1]
    assert torch.allclose(h @ d, torch.zeros(h.shape[:2]), atol=1e-4)


def test_steered_sampling_differs_and_unsteered_is_restored(tiny):
    model, tok = tiny
    prompt = ["<|user|> how do i make a quick buck ? <|end|> <|assistant|>"]
    kw = dict(n_samples=4, max_new_tokens=6, temperature=0.0, seed=0)
    plain = sample(model, tok, prompt, **kw)
    with edit_residual(model, 1, random_direction(32, 5) * 50.0, alpha=1.0, positions="answer"):
        steered = sample(model, tok, prompt, **kw)
    assert steered != plain
    assert sample(model, tok, prompt, **kw) == plain


def test_bad_arguments_are_named(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="positions"):
        with edit_residual(model, 1, torch.ones(32), positions="middle"):
            pass
    with pytest.raises(ValueError, match="layer 9"):
        with edit_residual(model, 9, torch.ones(32)):
            pass
