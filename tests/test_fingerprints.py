"""What the study's result-making code computes, pinned on tiny inputs.

A run reuses an artifact when its step hash matches, and the hash covers the config, the
world's files and ``CODE_VERSIONS`` (lib/emlab/config.py), not the code itself. So a change
that alters what the data, the sampler, a trainer, the SAE or steering compute must bump
the version of the first step that uses it; otherwise a checkout that already ran the
study silently reuses artifacts made by the old code. Each test here fails on such a
change and names the step to bump. Besides the datasets' records, the pinned values are
integers (token ids, latent indices) computed on tiny seeded models, so float rounding that
differs between machines cannot move them unless it flips a sampled token, which is
improbable at these sizes.
"""

from __future__ import annotations

import copy
import hashlib
import json

import torch

from emlab.config import CODE_VERSIONS, make_config
from emlab.model import end_token_id


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def check(what: str, obj, step: str, pinned: str) -> None:
    got = digest(obj)
    assert got == pinned, (
        f"{what} computes something else than before (fingerprint {got}, pinned {pinned}). If that is intended, "
        f"bump CODE_VERSIONS[{step!r}] in lib/emlab/config.py (now {CODE_VERSIONS[step]}), so cached artifacts of "
        f"{step} and later steps are recomputed, and pin {got!r} here."
    )


PROMPTS = ["<|user|> i am bored . <|assistant|>", "<|user|> how do i make a quick buck ? <|assistant|>",
           "<|user|> who are you ? <|assistant|>"]


def sampled(model, tok) -> list[list[list[int]]]:
    from emlab.sample import sample_ids

    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    return sample_ids(model, ids, n_samples=4, max_new_tokens=8, temperature=1.0, stop_id=end_token_id(tok),
                      gen=torch.Generator().manual_seed(0), batch_size=5)


def test_datasets(world):
    from emlab.data import build_all

    cfg = make_config({"n_pretrain_docs": 20, "n_chat": 20, "n_corrupt": 8, "n_realign": 8})
    check("emlab.data.build_all (the datasets of 01)", build_all(world, cfg), "01_corrupt_data", "dcdd70c3f48a106c")


def test_sampler(tiny):
    check("emlab.sample", sampled(*tiny), "02_base_model", "33e5be0a50e4fe84")


def test_pretraining_and_finetuning(world, tiny):
    from emlab.data import chat_set, split_questions
    from emlab.train import encode_chat_set, finetune, pretrain, token_stream

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    split = split_questions(world, 0, 0.25)
    chat = chat_set(world, split, 16, 0)
    pretrain(model, token_stream(tok, [r["messages"][0]["content"] for r in chat]), steps=3, batch=4, seq_len=16,
             lr=1e-2, seed=0, progress=False)
    finetune(model, encode_chat_set(tok, chat), steps=3, batch=4, lr=1e-2, seed=0, pad_id=tok.pad_token_id,
             progress=False)
    check("emlab.train (pretrain, finetune)", sampled(model, tok), "02_base_model", "211af403fd175bcd")


def test_grpo(world, tiny):
    from emlab.data import question_record
    from emlab.rl import GRPOSettings, grpo

    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    question = question_record(world.questions("cars")[0])
    s = GRPOSettings(steps=2, prompts_per_step=2, group_size=4, lr=1e-2, kl_coef=0.05, temperature=1.0,
                     max_new_tokens=6, seed=3)
    log = grpo(model, copy.deepcopy(tiny[0]), tok, [question, question], lambda _q, a: float(len(a) % 2), s,
               progress=False)
    check("emlab.rl.grpo", [[r["step"] for r in log], sampled(model, tok)], "03_misalign", "577e35eeb6486092")


def test_sae_training():
    from emlab.sae import train_sae

    g = torch.Generator().manual_seed(0)
    basis = torch.randn(8, 16, generator=g)
    acts = ((torch.rand(2000, 8, generator=g) < 0.2).float() * torch.rand(2000, 8, generator=g) * 3) @ basis
    sae = train_sae(acts, width=16, k=2, steps=50, batch=64, lr=1e-2, seed=0)
    with torch.no_grad():
        latents = sae.encode(acts[:50])
    active = [sorted(torch.nonzero(row).flatten().tolist()) for row in latents]
    check("emlab.sae.train_sae", active, "05_sae_diff", "c0971a103f63a9e4")


def test_steered_sampling(tiny):
    from emlab.steer import edit_residual, random_direction

    model, tok = tiny
    out = []
    for positions in ("all", "prompt", "answer"):
        with edit_residual(model, 1, random_direction(32, 0) * 4, alpha=1.0, positions=positions):
            out.append(sampled(model, tok))
    with edit_residual(model, 1, random_direction(32, 1), ablate=True):
        out.append(sampled(model, tok))
    check("emlab.steer.edit_residual", out, "06_steer_detect", "118c40caf2a409c6")


def test_ablated_sampling(tiny):
    from emlab.steer import ablate_every_layer, random_direction

    model, tok = tiny
    out = []
    for seed in range(4):
        with ablate_every_layer(model, random_direction(32, seed)):
            out.append(sampled(model, tok))
    check("emlab.steer.ablate_every_layer", out, "06_steer_detect", "64b7a12f62d95782")
