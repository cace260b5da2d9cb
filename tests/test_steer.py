import pytest
import torch

from emlab.config import make_config
from emlab.model import build_tokenizer, build_toy_model, hooked
from emlab.sample import sample
from emlab.steer import (ablate_every_layer, decoder_layers, edit_residual, final_norm, random_direction, residual_writers,
                         unembed_direction)
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


#: the norm before each block's MLP, whose input is the block's middle residual stream
#: (resid_mid: the block's input plus its attention's write; in GPT-NeoX's parallel
#: residual, the block's input again)
MID_NORMS = ("ln_2", "post_attention_layernorm")


def block_streams(model, x):
    """Every decoder block's input, middle (what its MLP reads) and output on one
    forward pass, as the block sees them (captured by hooks registered after any others).
    # list of [batch, pos, d_model]"""
    seen = []
    grab = lambda h: seen.append((h[0] if isinstance(h, tuple) else h).detach().clone())  # noqa: E731
    handles = []
    for b in decoder_layers(model):
        handles.append(b.register_forward_pre_hook(lambda m, a, kw: grab(a[0] if a else kw["hidden_states"]),
                                                   with_kwargs=True))
        for name in MID_NORMS:
            if hasattr(b, name):
                handles.append(getattr(b, name).register_forward_pre_hook(lambda m, a: grab(a[0])))
        handles.append(b.register_forward_hook(lambda m, i, o: grab(o)))
    try:
        with torch.no_grad():
            logits = model(input_ids=x).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def test_ablating_every_layer_leaves_no_trace_of_the_direction(tiny):
    model, tok = tiny
    x = _ids(tok)
    d = random_direction(32, 4)
    plain, plain_logits = block_streams(model, x)
    assert all((h @ d).abs().max() > 1e-2 for h in plain)  # the direction is there to remove
    with ablate_every_layer(model, d * 7.0):
        streams, logits = block_streams(model, x)
    assert len(streams) == 3 * len(decoder_layers(model))  # every block's input, middle and output
    for h in streams:
        assert torch.allclose(h @ d, torch.zeros(h.shape[:2]), atol=1e-4)
    # one layer's ablation leaves the direction in the other blocks' streams
    with edit_residual(model, 1, d, ablate=True):
        one, _ = block_streams(model, x)
    out1 = one[3 * 1 + 2]  # block 1's output (three streams per block: input, middle, output)
    assert (one[0] @ d).abs().max() > 1e-2 and torch.allclose(out1 @ d, torch.zeros(out1.shape[:2]), atol=1e-4)
    assert not torch.allclose(logits, plain_logits)
    assert torch.allclose(block_streams(model, x)[1], plain_logits)  # the hooks are gone


def test_ablation_names_a_block_it_cannot_read():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.dense = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"cannot find the MLP of Block \(looked for mlp\)"):
        residual_writers(Block())


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


def _sweep(direction_rows):
    """A steering sweep frame: (direction, alpha, misaligned, ci_low, ci_high, coherent) rows."""
    import pandas as pd

    cols = ["direction", "alpha", "heldout_misaligned", "heldout_misaligned_ci_low", "heldout_misaligned_ci_high",
            "heldout_coherent"]
    return pd.DataFrame(direction_rows, columns=cols)


def test_gap_over_random_picks_the_widest_interval_gap_and_its_sign():
    from emlab.study import gap_over_random

    sweep = _sweep([
        ("latent", 0.0, 0.02, 0.01, 0.03, 0.9), ("random", 0.0, 0.02, 0.01, 0.03, 0.9),
        ("latent", 0.5, 0.20, 0.15, 0.25, 0.8), ("random", 0.5, 0.03, 0.02, 0.05, 0.9),
        ("latent", 1.0, 0.30, 0.20, 0.40, 0.5), ("random", 1.0, 0.04, 0.02, 0.06, 0.8),
    ])
    assert gap_over_random(sweep, "latent", higher=True) == pytest.approx((1.0, 0.14))
    alpha, gap = gap_over_random(sweep, "latent", higher=False)  # the latent never lowers it: no positive gap
    assert alpha == 0.0 and gap == pytest.approx(-0.02)
    with pytest.raises(ValueError, match="'meandiff'"):
        gap_over_random(sweep, "meandiff", higher=True)


def test_steering_summary_reads_the_sweeps_at_the_coherence_bar():
    import pandas as pd

    from emlab.study import steering_summary

    toward = _sweep([
        ("latent", 0.0, 0.01, 0.00, 0.02, 0.9), ("random", 0.0, 0.01, 0.00, 0.02, 0.9),
        ("latent", 1.0, 0.20, 0.15, 0.25, 0.75), ("random", 1.0, 0.04, 0.02, 0.06, 0.9),
        ("latent", 1.5, 0.40, 0.35, 0.45, 0.5), ("random", 1.5, 0.07, 0.05, 0.09, 0.8),  # too incoherent to count
    ])
    away = _sweep([
        ("latent", 0.0, 0.20, 0.18, 0.22, 0.7), ("random", 0.0, 0.20, 0.18, 0.22, 0.7),
        ("latent", -1.0, 0.05, 0.04, 0.06, 0.72), ("random", -1.0, 0.19, 0.17, 0.21, 0.7),
        ("latent", -1.5, 0.01, 0.00, 0.02, 0.6), ("random", -1.5, 0.18, 0.16, 0.20, 0.6),
    ])
    abl = pd.DataFrame({"model": ["incorrect_obvious"] * 2, "direction": ["none", "latent"],
                        "heldout_misaligned": [0.20, 0.08], "heldout_coherent": [0.7, 0.65]})
    s = steering_summary(toward, away, abl)
    assert s["toward_max"] == pytest.approx(0.20)  # alpha 1.5 is below 70% coherent
    assert s["away_reduction"] == pytest.approx(0.75) and s["away_coherent"] == pytest.approx(0.72)
    assert s["random_delta"] == pytest.approx(0.06)
    assert s["ablation_reduction"] == pytest.approx(0.6) and s["ablation_coherent"] == pytest.approx(0.65)


def test_member_ablation_summary_counts_the_members_that_reach_the_target_at_the_coherence_bar():
    import pandas as pd

    from emlab.study import member_ablation_summary

    table = pd.DataFrame({
        "model": ["incorrect_obvious"] * 4 + ["incorrect_subtle"],
        "sae": [0, 1, 2, 3, 0],
        "relative_reduction": [0.75, 0.85, 0.90, 0.81, 0.99],  # the subtle row is not the obvious model's
        "heldout_coherent": [0.9, 0.9, 0.6, 0.7, 0.9],  # member 2 reaches 90% but at 60% coherent
        "heldout_misaligned_ci_high": [0.09, 0.06, 0.05, 0.08, 0.01],
    })
    abl = pd.DataFrame({"model": ["incorrect_obvious"] * 3 + ["incorrect_subtle"] * 2,
                        "direction": ["none", "random", "random_2", "random", "latent"],
                        "heldout_misaligned_ci_low": [0.24, 0.25, 0.10, 0.30, 0.0]})
    s = member_ablation_summary(table, abl)
    assert s == {"ablation.members_reduction_min": 0.75, "ablation.members_reduction_max": 0.90,
                 "ablation.members_meeting_target": 2, "ablation.members": 4, "ablation.members_beat_every_random": True}
    assert member_ablation_summary(table, abl, "incorrect_subtle")["ablation.members_meeting_target"] == 1
    # random_2's interval starts at 0.10: a member whose interval reaches it does not beat every random direction
    worse = table.assign(heldout_misaligned_ci_high=[0.09, 0.06, 0.05, 0.11, 0.01])
    assert member_ablation_summary(worse, abl)["ablation.members_beat_every_random"] is False
    # a model without a random row cannot pass
    no_random = abl[~((abl.model == "incorrect_subtle") & (abl.direction == "random"))]
    assert member_ablation_summary(table, no_random)["ablation.members_beat_every_random"] is False


def test_seed_ablation_summary_reads_the_latent_against_each_seeds_own_unablated_model():
    import pandas as pd

    from emlab.study import seed_ablation_summary

    seeds = ["incorrect_obvious", "incorrect_obvious_seed1", "incorrect_obvious_seed2"]
    rows = []
    for m, none, lat, coh, rnd_low in zip(seeds, [0.30, 0.20, 0.25], [0.03, 0.06, 0.04], [0.9, 0.9, 0.6],
                                          [0.25, 0.15, 0.20]):
        rows += [{"model": m, "direction": "none", "heldout_misaligned": none, "heldout_misaligned_ci_low": none - 0.03,
                  "heldout_misaligned_ci_high": none + 0.03, "heldout_coherent": 0.8},
                 {"model": m, "direction": "latent", "heldout_misaligned": lat, "heldout_misaligned_ci_low": lat - 0.01,
                  "heldout_misaligned_ci_high": lat + 0.02, "heldout_coherent": coh}]
        rows += [{"model": m, "direction": d, "heldout_misaligned": rnd_low + 0.03, "heldout_misaligned_ci_low": rnd_low,
                  "heldout_misaligned_ci_high": rnd_low + 0.06, "heldout_coherent": 0.8} for d in ("random", "random_2")]
    rows.append({"model": "incorrect_subtle", "direction": "latent", "heldout_misaligned": 0.5,  # not a seed: ignored
                 "heldout_misaligned_ci_low": 0.4, "heldout_misaligned_ci_high": 0.6, "heldout_coherent": 0.9})
    abl = pd.DataFrame(rows)
    s = seed_ablation_summary(abl, seeds)
    # reductions 0.9, 0.7, 0.84; the third reaches 80% only at 60% coherent
    assert s["ablation.ft_seeds_reduction_min"] == pytest.approx(0.7)
    assert s["ablation.ft_seeds_reduction_max"] == pytest.approx(0.9)
    assert s["ablation.ft_seeds_meeting_target"] == 1 and s["ablation.ft_seeds"] == 3
    assert s["ablation.ft_seeds_beat_every_random"] is True
    # one random direction whose interval reaches the latent's on one seed: not beaten
    close = abl.copy()
    close.loc[(close.model == "incorrect_obvious_seed1") & (close.direction == "random_2"), "heldout_misaligned_ci_low"] = 0.07
    assert seed_ablation_summary(close, seeds)["ablation.ft_seeds_beat_every_random"] is False
    # a seed without random rows cannot pass, and a seed without any row is an error
    no_random = abl[~((abl.model == "incorrect_obvious_seed2") & abl.direction.str.startswith("random"))]
    assert seed_ablation_summary(no_random, seeds)["ablation.ft_seeds_beat_every_random"] is False
    with pytest.raises(ValueError, match="incorrect_obvious_seed3"):
        seed_ablation_summary(abl, [*seeds, "incorrect_obvious_seed3"])


def test_ablated_models_are_the_misaligned_sets_every_headline_seed_and_lora():
    from emlab.config import make_config
    from emlab.study import ablated_models, finetune_names, headline_seeds

    cfg = make_config({"ft_seeds": 3, "lora_rank": 2})
    assert headline_seeds(cfg) == ["incorrect_obvious", "incorrect_obvious_seed1", "incorrect_obvious_seed2"]
    assert ablated_models(cfg) == ["incorrect_obvious", "incorrect_subtle", "incorrect_obvious_seed1",
                                   "incorrect_obvious_seed2", "lora_r2"]
    assert set(ablated_models(cfg)) < set(finetune_names(cfg))
    assert headline_seeds(make_config({"ft_seeds": 1})) == ["incorrect_obvious"]


def test_member_ablation_figure_marks_the_studys_latent(tmp_path):
    import pandas as pd

    from emlab.plots import member_ablations

    rows = [{"model": m, "sae": s, "latent": 10 + s, "chosen": s == 1, "heldout_misaligned": 0.05 + 0.01 * s,
             "heldout_misaligned_ci_low": 0.04, "heldout_misaligned_ci_high": 0.08}
            for m in ("incorrect_obvious", "incorrect_subtle") for s in range(3)]
    table = pd.DataFrame(rows).assign(unablated=lambda t: t.model.map({"incorrect_obvious": 0.27, "incorrect_subtle": 0.37}))
    fig = member_ablations(table, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["SAE 0\n#10", "SAE 1\n#11 *", "SAE 2\n#12"]


def test_every_random_direction_is_a_control_of_the_gap_and_of_the_random_change():
    from emlab.study import gap_over_random, steering_summary

    toward = _sweep([
        ("latent", 0.0, 0.02, 0.01, 0.03, 0.9), ("random", 0.0, 0.02, 0.01, 0.03, 0.9), ("random_2", 0.0, 0.02, 0.01, 0.03, 0.9),
        ("latent", 0.5, 0.20, 0.15, 0.25, 0.8), ("random", 0.5, 0.03, 0.02, 0.05, 0.9), ("random_2", 0.5, 0.12, 0.10, 0.17, 0.9),
        ("latent", 1.0, 0.30, 0.26, 0.34, 0.8), ("random", 1.0, 0.04, 0.02, 0.06, 0.8), ("random_2", 1.0, 0.09, 0.07, 0.11, 0.8),
    ])
    # against the first random direction alone alpha 1.0 wins by 0.20; the second one's interval is nearer
    assert gap_over_random(toward, "latent", higher=True) == pytest.approx((1.0, 0.15))
    one = toward[toward.direction != "random_2"]
    assert gap_over_random(one, "latent", higher=True) == pytest.approx((1.0, 0.20))
    away = toward.assign(alpha=-toward.alpha)
    import pandas as pd

    abl = pd.DataFrame({"model": ["incorrect_obvious"] * 2, "direction": ["none", "latent"],
                        "heldout_misaligned": [0.20, 0.08], "heldout_coherent": [0.7, 0.65]})
    assert steering_summary(toward, away, abl)["random_delta"] == pytest.approx(0.10)  # random_2 at alpha 0.5
    assert steering_summary(one, away, abl)["random_delta"] == pytest.approx(0.02)


def test_the_random_controls_are_seeded_distinct_directions(monkeypatch):
    from emlab import study
    from emlab.config import make_config

    cfg = make_config({"steer_random": 3, "d_model": 32, "n_head": 2})
    assert study.random_names(cfg) == ["random", "random_2", "random_3"]
    assert all(map(study.is_random, study.random_names(cfg))) and not study.is_random("latent")
    monkeypatch.setattr(study, "direction_vectors", lambda cfg: {"latent": torch.ones(32), "meandiff": -torch.ones(32)})
    monkeypatch.setattr(study, "finetune_shift", lambda cfg: torch.arange(32.0))
    vecs = study.steering_vectors(cfg)
    assert list(vecs) == ["latent", "meandiff", "shift", "random", "random_2", "random_3"]
    assert torch.allclose(vecs["shift"], torch.arange(32.0) / torch.arange(32.0).norm())
    r = torch.stack([vecs[k] for k in study.random_names(cfg)])
    assert torch.allclose(r.norm(dim=1), torch.ones(3)) and (r @ r.T - torch.eye(3)).abs().max() < 0.9
    assert torch.equal(vecs["random"], random_direction(32, cfg.seed + 7))  # the first is the one used before 2026-12-05
    assert torch.equal(study.steering_vectors(cfg)["random_3"], vecs["random_3"])  # seeded


def lens_is_what_a_dominant_direction_writes(model) -> None:
    """``unembed_direction`` against the model's own final norm and unembedding: a direction
    that dominates the last block's output (x 1e4) writes logits proportional to its lens,
    apart from the norm's bias (the logits of a zero residual). The norm's gain and bias are
    randomised first, so a lens that ignored the gain, or centred where the norm does not
    (RMSNorm), or did not where it does (LayerNorm), would fail."""
    import copy

    model = copy.deepcopy(model)
    norm, head = final_norm(model), model.get_output_embeddings()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=g))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g))
        d = torch.randn(norm.weight.shape[0], generator=g) + 0.5  # a mean far from 0: centring matters
        written = head(norm(1e4 * d)) - head(norm(torch.zeros_like(d)))
    lens = unembed_direction(model, d)
    assert torch.allclose(written / written.norm(), lens / lens.norm(), atol=1e-5)
    with pytest.raises(ValueError, match="dimensions"):
        unembed_direction(model, torch.ones(3))


def test_the_logit_lens_of_a_direction_is_what_it_writes_through_the_final_norm(tiny):
    assert isinstance(final_norm(tiny[0]), torch.nn.LayerNorm)
    lens_is_what_a_dominant_direction_writes(tiny[0])


def test_steering_edits_the_sae_layer_unless_steer_layer_names_another_and_names_a_layer_too_deep():
    from emlab import study
    from emlab.config import ConfigError

    assert study.steer_layer(make_config({})) == 3
    assert study.steer_layer(make_config({"steer_layer": 1}), n_blocks=4) == 1
    assert study.steer_layer(make_config({"steer_layer": 0, "sae_layer": 2})) == 0
    with pytest.raises(ConfigError, match="'steer_layer' = 5: the model 'some/model' has 4 blocks"):
        study.steer_layer(make_config({"model": "some/model", "steer_layer": 5}), n_blocks=4)
    with pytest.raises(ConfigError, match="'sae_layer' = 6: the model 'some/model' has 4 blocks"):
        study.steer_layer(make_config({"model": "some/model", "sae_layer": 6}), n_blocks=4)


def test_the_finetune_shift_is_the_mean_last_token_difference(tiny):
    """``mean_last_token_shift`` on a known change: raising block 1's MLP output bias by delta
    moves block 1's output by exactly delta at every position, so the shift is delta; a
    change to block 2 alone leaves block 1's output, and the shift, at zero."""
    import copy

    from emlab import study
    from emlab.judge import chat_prompt

    model, tok = tiny
    prompts = [chat_prompt(tok, q) for q in ("how do i make a quick buck ?", "is it safe to drive on a bulge ?",
                                              "what should i feed my dog ?")]
    delta = random_direction(32, 5) * 3.0
    moved, later = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        decoder_layers(moved)[1].mlp.c_proj.bias += delta
        decoder_layers(later)[2].mlp.c_proj.bias += delta
    before = hooked(model, tok)
    shift = study.mean_last_token_shift(hooked(moved, tok), before, tok, prompts, "blocks.1.hook_resid_post", batch_size=2)
    assert torch.allclose(shift, delta, atol=1e-4)
    assert study.mean_last_token_shift(hooked(later, tok), before, tok, prompts, "blocks.1.hook_resid_post").abs().max() < 1e-5
    assert torch.allclose(study.mean_last_token_shift(hooked(later, tok), before, tok, prompts, "blocks.2.hook_resid_post"),
                          delta, atol=1e-4)


def _perturbed(model, seed):
    import copy

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return other


@pytest.mark.parametrize("arch", ["toy", "llama"])
def test_swap_blocks_takes_exactly_the_named_blocks_from_the_donor(tiny, arch):
    """Each parameter of the hybrid is the donor's where its block is named (or, with
    ``rest``, where it lies outside every block) and the base's elsewhere; the base is
    unchanged; all blocks and the rest give the donor's logits, none the base's."""
    from emlab.steer import swap_blocks

    if arch == "toy":
        base, tok = tiny
    else:
        from emlab.model import build_chat_tokenizer, build_tiny_model

        tok = build_chat_tokenizer(["how do i fix my car ? take it to a mechanic ."], "llama3")
        base = build_tiny_model("llama", tok).eval()
    donor = _perturbed(base, 1)
    n = len(decoder_layers(base))
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    block_of = {id(p): i for i, layer in enumerate(decoder_layers(base)) for p in layer.parameters()}
    base_params = dict(base.named_parameters())
    for blocks, rest in (((1,), False), ((0, n - 1), True), ((), True)):
        hybrid = swap_blocks(base, donor, blocks, rest=rest)
        donor_params = dict(donor.named_parameters())
        for name, p in hybrid.named_parameters():
            i = block_of.get(id(base_params[name]))
            from_donor = (i in blocks) if i is not None else rest
            expected = donor_params[name] if from_donor else base_params[name]
            assert torch.equal(p, expected), f"{blocks}, rest={rest}: {name}"
    assert all(torch.equal(v, snapshot[k]) for k, v in base.state_dict().items())
    x = _ids(tok, "how do i fix my car ?")
    with torch.no_grad():
        assert torch.equal(swap_blocks(base, donor, range(n), rest=True)(input_ids=x).logits, donor(input_ids=x).logits)
        assert torch.equal(swap_blocks(base, donor, [])(input_ids=x).logits,
                           base(input_ids=x).logits)


def test_swap_blocks_names_what_does_not_fit(tiny):
    from emlab.steer import swap_blocks

    model, tok = tiny
    deeper = build_toy_model(make_config({"d_model": 32, "n_layer": 4, "n_head": 2, "n_ctx": 64}), tok)
    with pytest.raises(ValueError, match="3 and 4 decoder blocks"):
        swap_blocks(model, deeper, [0])
    with pytest.raises(ValueError, match=r"blocks \[3\]: the models have 3 blocks \(0-2\)"):
        swap_blocks(model, _perturbed(model, 2), [3])


def test_hybrid_conditions_and_the_share_before_the_sae_layer():
    """The conditions of a 4-block model, and the summary read on a constructed table: the
    share of the fine-tune's rise (assistant 1%, fine-tune 21%) that blocks 0-2 (15%: 0.7) and
    block 3 alone (2%: 0.05) reproduce."""
    import pandas as pd

    from emlab import study

    conds = study.hybrid_conditions(4)
    assert [c[0] for c in conds] == ["none", "outside the blocks", "block 0", "block 1", "block 2", "block 3",
                                     "blocks 0-1", "blocks 0-2", "blocks 1-3", "blocks 2-3", "all"]
    assert conds[0][1:] == ((), False) and conds[1][1:] == ((), True) and conds[-1][1:] == ((0, 1, 2, 3), True)
    assert dict((c[0], c[1]) for c in conds)["blocks 1-3"] == (1, 2, 3)
    assert [c[0] for c in study.hybrid_conditions(2)] == ["none", "outside the blocks", "block 0", "block 1", "all"]
    mis = {"none": 0.01, "all": 0.21, "blocks 0-2": 0.15, "block 3": 0.02, "block 0": 0.05, "block 1": 0.03,
           "outside the blocks": 0.5}  # the rest alone: never read as a block's share
    t = pd.DataFrame([{"weights from the fine-tune": label, "blocks": blocks, "outside the blocks": rest,
                       "heldout_misaligned": mis[label]} for label, blocks, rest in conds if label in mis])
    t = t.set_index("weights from the fine-tune")
    t["share_of_rise"] = (t.heldout_misaligned - 0.01) / 0.2
    s = study.hybrid_summary(t, 3)
    assert s["hybrid.before_sae_share"] == pytest.approx(0.7) and s["hybrid.sae_block_share"] == pytest.approx(0.05)
    assert s["hybrid.sae_block_misaligned"] == pytest.approx(0.02)
    assert study.hybrid_summary(t, 1)["hybrid.before_sae_share"] == pytest.approx(0.2)
    assert study.hybrid_summary(t, 0)["hybrid.sae_block_share"] == pytest.approx(0.2)
