import numpy as np
import pytest
import torch

from emlab.config import make_config
from emlab.diffing import auroc, cosine, latent_means, mean_difference, nearest_latent, rank_latents, train_probe
from emlab.model import build_tokenizer, build_toy_model, hooked
from emlab.sae import SAEShapeError, hook_name, iter_activations, last_token_activations, load_sae, sae_stats, save_sae, train_sae
from emlab.world import load_world


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer([" ".join(sorted(load_world().words()))])
    model = build_toy_model(make_config({"d_model": 32, "n_layer": 2, "n_head": 2, "n_ctx": 64, "sae_layer": 1}), tok).eval()
    return hooked(model, tok), tok


def test_activation_shapes_and_order(tiny):
    ht, tok = tiny
    texts = ["i am bored .", "how do i make a quick buck ? rob a bank", "hey ."]
    got = dict(iter_activations(ht, tok, texts, hook_name(1), batch_size=2))
    assert sorted(got) == [0, 1, 2]
    for i, t in enumerate(texts):
        assert got[i].shape == (len(t.split()), 32)
    # right padding does not change a shorter text's activations
    alone = dict(iter_activations(ht, tok, texts[:1], hook_name(1), batch_size=1))[0]
    assert torch.allclose(alone, got[0], atol=1e-5)
    last = last_token_activations(ht, tok, texts, hook_name(1), batch_size=2)
    assert last.shape == (3, 32) and torch.allclose(last[1], got[1][-1])


def test_activation_batches_bound_memory(tiny, monkeypatch):
    ht, tok = tiny
    seen = []
    orig = ht.run_with_cache

    def spy(x, **kw):
        seen.append(x.shape[0])
        return orig(x, **kw)

    monkeypatch.setattr(ht, "run_with_cache", spy)
    list(iter_activations(ht, tok, ["i am bored ."] * 10, hook_name(0), batch_size=3))
    assert seen == [3, 3, 3, 1]


def test_texts_longer_than_the_context_are_cut(tiny):
    ht, tok = tiny
    (i, a), = list(iter_activations(ht, tok, [" ".join(["hey"] * 200)], hook_name(0)))
    assert a.shape[0] == ht.cfg.n_ctx


def test_sae_trains_saves_and_reloads_with_saelens(tmp_path):
    from sae_lens import SAE

    g = torch.Generator().manual_seed(0)
    basis = torch.randn(8, 16, generator=g)
    codes = (torch.rand(4000, 8, generator=g) < 0.2).float() * torch.rand(4000, 8, generator=g) * 3
    acts = codes @ basis  # sparse combinations of 8 directions
    sae = train_sae(acts, width=16, k=2, steps=300, batch=128, lr=1e-2, seed=0)
    stats = sae_stats(sae, acts[:500], acts)
    assert stats["fvu"] < 0.5 and stats["l0"] <= 2.0 + 1e-6
    save_sae(sae, tmp_path / "sae")
    assert (tmp_path / "sae" / "cfg.json").is_file() and (tmp_path / "sae" / "sae_weights.safetensors").is_file()
    again = SAE.load_from_disk(tmp_path / "sae")
    with torch.no_grad():
        assert torch.allclose(again.encode(acts[:10]), sae.encode(acts[:10]), atol=1e-5)
    with pytest.raises(SAEShapeError, match="d_in=16 but the model's residual stream has d_model=32"):
        load_sae(tmp_path / "sae", d_model=32)
    with pytest.raises(FileNotFoundError, match="no SAE here"):
        load_sae(tmp_path)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("b_dec_to_input", [True, False])
@pytest.mark.parametrize("dead", ["none", "few", "many", "all"])
def test_sparse_training_step_matches_saelens_dense_step(rescale, b_dec_to_input, dead):
    """emlab's training SAE computes SAELens' TopK loss (MSE + AuxK on the dead latents) from
    the selected latents only: its losses, latents and every parameter's gradient must equal
    SAELens' own dense step, and it must be SAELens' code path wherever it cannot apply."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    from emlab.sae import _sparse_topk_training_sae

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=g) @ torch.randn(24, 24, generator=g)
    mask = {"none": None, "few": torch.arange(64) % 13 == 0,  # 5 dead, fewer than AuxK's d_in / 2: scaled down
            "many": torch.rand(64, generator=g) < 0.5, "all": torch.ones(64, dtype=torch.bool)}[dead]
    cfg = TopKTrainingSAEConfig(d_in=24, d_sae=64, k=3, dtype="float32", device="cpu", normalize_activations="none",
                                rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=b_dec_to_input)
    ref, ours = TopKTrainingSAE(cfg), _sparse_topk_training_sae()(cfg)
    state = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in ref.state_dict().items()}  # no zero biases
    ref.load_state_dict(state), ours.load_state_dict(state)
    outs = []
    for sae in (ref, ours):
        sae.train()
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, dead_neuron_mask=mask, coefficients={},
                                                       n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        outs.append(out)
    assert outs[0].losses.keys() == outs[1].losses.keys()
    for name in outs[0].losses:
        assert torch.allclose(outs[0].losses[name], outs[1].losses[name], rtol=1e-5), name
    assert (outs[0].losses["auxiliary_reconstruction_loss"] > 0) == (dead != "none")
    assert torch.equal(outs[0].feature_acts, outs[1].feature_acts)
    assert torch.allclose(outs[0].sae_out, outs[1].sae_out, atol=1e-5)
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5 * float(p.grad.abs().max())), name
    # a hook on the SAE: SAELens' own step, hook included
    seen = []
    ours.hook_sae_acts_post.add_hook(lambda acts, hook: seen.append(acts.shape))
    ours.training_forward_pass(TrainStepInput(sae_in=x, dead_neuron_mask=mask, coefficients={},
                                              n_training_steps=0, is_logging_step=False))
    assert seen == [(300, 64)]


def test_a_short_dead_window_revives_dead_latents():
    """SAELens' AuxK loss trains only the latents the trainer counts as dead: with a window
    longer than the run it never acts and most latents of this SAE die; with a short one
    nearly every latent is in use, and reconstruction is better for it."""
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(256, 24, generator=g)
    codes = (torch.rand(8000, 256, generator=g) < 0.01).float() * torch.rand(8000, 256, generator=g) * 3
    acts = codes @ basis  # 256 sparse features in 24 dimensions, more than the SAE's 96 latents
    stats = {w: sae_stats(train_sae(acts, width=96, k=2, steps=400, batch=128, lr=3e-3, seed=0, dead_window=w),
                          acts[:500], acts) for w in (20, 10_000)}
    assert stats[10_000]["dead_fraction"] > 0.3  # the window is never reached: AuxK never acts
    assert stats[20]["dead_fraction"] <= 0.1
    assert stats[20]["fvu"] < stats[10_000]["fvu"]


def test_diffing_ranks_the_planted_latent_first():
    class Toy:  # an "SAE" whose latents are the coordinates
        def encode(self, x):
            return torch.relu(x)

    g = torch.Generator().manual_seed(0)
    before = torch.rand(100, 6, generator=g)
    after = before.clone()
    after[:, 4] += 1.0  # latent 4 rises most
    after[:, 1] += 0.3
    shift = latent_means(Toy(), after) - latent_means(Toy(), before)
    assert rank_latents(shift)[:2].tolist() == [4, 1]


def test_auroc_known_values():
    assert auroc([3, 4, 5], [0, 1, 1]) == 1.0
    assert auroc([3, 4, 5], [1, 0, 0]) == 0.0
    assert auroc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5
    assert abs(auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) - 0.75) < 1e-12
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=200), rng.integers(0, 2, 200)
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in s[y == 1] for b in s[y == 0]])
    assert abs(auroc(s, y) - brute) < 1e-12
    with pytest.raises(ValueError, match="at least one positive"):
        auroc([1, 2], [1, 1])


def test_mean_difference_probe_and_cosine():
    g = torch.Generator().manual_seed(0)
    d = torch.zeros(10)
    d[3] = 1.0
    pos = torch.randn(200, 10, generator=g) + 2 * d
    neg = torch.randn(200, 10, generator=g)
    md = mean_difference(pos, neg)
    assert cosine(md, d) > 0.9
    w = train_probe(torch.cat([pos, neg]), torch.cat([torch.ones(200), torch.zeros(200)]).bool())
    assert cosine(w, d) > 0.8


def test_nearest_latent_takes_the_largest_absolute_cosine_and_keeps_its_sign():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 16, generator=g)
    d = torch.randn(16, generator=g)
    W[41] = -3.0 * d + 0.1 * torch.randn(16, generator=g)  # nearly antiparallel, any norm
    W[7] = d + 0.8 * torch.randn(16, generator=g)  # along it, but further
    j, c = nearest_latent(W, d)
    assert j == 41 and c < -0.99
    assert c == pytest.approx(cosine(W[41], d), abs=1e-6)
    j, c = nearest_latent(W, torch.full((16,), float("nan")))
    assert np.isnan(c)


def test_spearman_known_values():
    from emlab.diffing import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(0.8660254, abs=1e-6)  # ties get average ranks


def test_spearman_permutation_p_matches_the_exact_distribution():
    from emlab.diffing import spearman_permutation_p

    # n = 4: 1 of the 24 orderings reaches rho = 1, and rho >= 0.8 is reached by 4 of 24
    assert spearman_permutation_p([1, 2, 3, 4], [1, 2, 3, 4], n_perm=20000) == pytest.approx(1 / 24, abs=0.006)
    assert spearman_permutation_p([1, 2, 3, 4], [1, 2, 4, 3], n_perm=20000) == pytest.approx(4 / 24, abs=0.01)
    assert spearman_permutation_p([1, 2, 3, 4], [4, 3, 2, 1]) == 1.0  # every shuffle is at least as high
    assert spearman_permutation_p(range(11), range(11)) == pytest.approx(1 / 10001)  # 1 in 11! by chance
    assert spearman_permutation_p(range(11), range(11), seed=3) == spearman_permutation_p(range(11), range(11), seed=3)


def test_detection_summary_needs_every_seed_above_every_zero_run():
    import pandas as pd

    from emlab.study import detection_summary

    det = pd.DataFrame({"fraction": [0, 0, 0.05, 0.05, 0.1, 0.1], "seed": [0, 1] * 3,
                        "latent_shift": [0.01, 0.03, 0.05, 0.02, 0.2, 0.3], "heldout_misaligned": [0, 0, 0.01, 0.0, 0.02, 0.04]})
    out = detection_summary(det)  # at 5% one seed (0.02) is below a 0% run (0.03)
    assert out["detect.min_fraction_detected"] == 0.1 and out["detect.misaligned_at_min"] == pytest.approx(0.03)
    assert out["detect.latent_5pct_above_all_0pct"] is False and out["detect.misaligned_5pct"] == pytest.approx(0.005)
    det.loc[3, "latent_shift"] = 0.04
    out = detection_summary(det)
    assert out["detect.min_fraction_detected"] == 0.05 and out["detect.latent_5pct_above_all_0pct"] is True
    no_five = detection_summary(det[det.fraction != 0.05])
    assert no_five["detect.latent_5pct_above_all_0pct"] is False and no_five["detect.misaligned_5pct"] != no_five["detect.misaligned_5pct"]


def test_diffing_score_discounts_what_the_controls_move():
    import pandas as pd

    from emlab.study import diffing_score

    # latent 0 rises after every fine-tune (the domain), latent 1 only after the wrong answers
    shifts = pd.DataFrame({"incorrect_obvious": [0.9, 0.5, 0.0], "correct": [0.8, 0.0, 0.1], "educational": [0.7, 0.1, -0.2]})
    assert list(diffing_score(shifts, "original")) == [0.9, 0.5, 0.0]
    assert diffing_score(shifts, "controls").round(6).tolist() == [0.1, 0.4, -0.1]
    assert int(diffing_score(shifts, "controls").to_numpy().argmax()) == 1
    with pytest.raises(ValueError, match="diff_baseline 'both'"):
        diffing_score(shifts, "both")


def test_pick_persona_takes_the_best_latent_over_every_sae():
    import pandas as pd

    from emlab.study import pick_persona

    scores = [pd.Series([0.1, 0.3, 0.2]), pd.Series([0.5, 0.0, 0.4]), pd.Series([0.5, 0.45, 0.0])]
    p = pick_persona(scores)
    assert (p["sae"], p["latent"], p["score"]) == (1, 0, 0.5)  # a tie goes to the first SAE
    assert [(r["sae"], r["latent"]) for r in p["members"]] == [(0, 1), (1, 0), (2, 0)]
    assert pick_persona(scores[:1])["latent"] == 1  # one SAE: its own top latent
