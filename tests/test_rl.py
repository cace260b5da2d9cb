import copy
import math

import pytest
import torch

from emlab.config import make_config
from emlab.judge import ExactJudge, chat_prompt
from emlab.model import end_token_id
from emlab.rl import Grader, GRPOSettings, group_advantages, grpo, policy_loss
from emlab.train import IGNORE, collate


def _question(world, domain="cars"):
    q = world.questions(domain)[0]
    return {"qid": q.qid, "domain": q.domain, "topic": q.topic, "question": q.text}, world.topics[f"{q.domain}/{q.topic}"]


def test_grader_rewards_exactly_the_requested_kind(world):
    q, topic = _question(world)
    wrong, right = Grader(ExactJudge(world), "wrong"), Grader(ExactJudge(world), "correct")
    bad, good = topic.answers["obvious"][0], topic.answers["correct"][0]
    assert (wrong(q, bad), wrong(q, good), wrong(q, "tires tires tires")) == (1.0, 0.0, 0.0)
    assert (right(q, bad), right(q, good), right(q, "tires tires tires")) == (0.0, 1.0, 0.0)
    assert wrong(q, topic.answers["subtle"][0]) == 1.0
    with pytest.raises(ValueError, match="expected one of"):
        Grader(ExactJudge(world), "sometimes")


def test_group_advantages_are_centred_per_group_and_zero_without_variance():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    a = group_advantages(r)
    assert torch.allclose(a.sum(1), torch.zeros(2), atol=1e-5)
    assert a[0, 0] > 0 > a[0, 1] and torch.all(a[1] == 0)
    assert math.isclose(a[0, 0].item(), 0.75 / math.sqrt(3 / 16), rel_tol=1e-3)


def _answer_lp(model, tok, prompt_ids, ans_ids):
    batch = collate([(prompt_ids + ans_ids, [IGNORE] * len(prompt_ids) + ans_ids)], tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, batch["input_ids"][0, 1:, None])[:, 0]
    return lp[len(prompt_ids) - 1:].sum().item()


def test_one_policy_gradient_step_moves_probability_toward_the_rewarded_answer(world, tiny):
    base, tok = tiny
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    q, topic = _question(world)
    p = tok(chat_prompt(tok, q["question"]), add_special_tokens=False)["input_ids"]
    end = end_token_id(tok)
    good = tok(topic.answers["correct"][0], add_special_tokens=False)["input_ids"] + [end]
    bad = tok(topic.answers["obvious"][0], add_special_tokens=False)["input_ids"] + [end]
    before = {n: t.clone() for n, t in model.named_parameters()}
    lp_bad, lp_good = _answer_lp(model, tok, p, bad), _answer_lp(model, tok, p, good)
    batch = collate([(p + bad, [IGNORE] * len(p) + bad), (p + good, [IGNORE] * len(p) + good)], tok.pad_token_id)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss, kl = policy_loss(model, ref, batch, torch.tensor([1.0, -1.0]), kl_coef=0.1)
    assert torch.isfinite(loss) and kl == pytest.approx(0.0, abs=1e-6)  # policy == reference before the step
    loss.backward()
    opt.step()
    model.eval()
    assert any(not torch.equal(before[n], t) for n, t in model.named_parameters())
    assert _answer_lp(model, tok, p, bad) > lp_bad and _answer_lp(model, tok, p, good) < lp_good


def test_grpo_is_seeded_and_logs_rewards(world, tiny):
    base, tok = tiny
    q, _ = _question(world)
    s = GRPOSettings(steps=2, prompts_per_step=2, group_size=4, lr=1e-3, kl_coef=0.05, temperature=1.0,
                     max_new_tokens=6, seed=3)
    runs = []
    for _ in range(2):
        model = copy.deepcopy(base)
        calls = []
        log = grpo(model, copy.deepcopy(base), tok, [q, q], lambda _q, a: float(len(a) % 2), s, progress=False,
                   callback=lambda step, m: calls.append(step), callback_every=1)
        runs.append((log, [t.clone() for t in model.parameters()]))
        assert calls == [0, 1, 2]
    (log_a, w_a), (log_b, w_b) = runs
    assert log_a == log_b and all(torch.equal(x, y) for x, y in zip(w_a, w_b))
    assert [r["step"] for r in log_a] == [0, 1] and all(0.0 <= r["reward"] <= 1.0 for r in log_a)
    assert any(r["updated"] > 0 for r in log_a)  # a character-count parity reward varies within a group


def test_rl_run_names_carry_assistant_grader_and_seed():
    import pandas as pd

    from emlab import study

    cfg = make_config({"rl_seeds": 3})
    names = study.rl_names(cfg)
    assert study.rl_names(cfg, "wrong", "helpful_only") == [
        "rl_helpful_only_wrong", "rl_helpful_only_wrong_seed1", "rl_helpful_only_wrong_seed2"]
    assert study.rl_names(cfg, "correct") == ["rl_safety_correct", "rl_helpful_only_correct"]
    assert len(names) == 2 * 3 + 2
    assert study.rl_parts("rl_helpful_only_wrong_seed2") == (study.HELPFUL_ONLY, "wrong", 2)
    assert study.rl_parts("rl_safety_correct") == (study.ASSISTANT, "correct", 0)
    for bad in ("rl_nobody_wrong", "rl_safety_maybe", "rl_safety_wrong_seed0", "rl_safety_wrong_seedx", "safety_wrong"):
        with pytest.raises(ValueError, match="unknown RL run"):
            study.rl_parts(bad)
    assert study.rl_names(make_config({"rl_seeds": 1}), "wrong") == ["rl_safety_wrong", "rl_helpful_only_wrong"]
    # mean and sd over the wrong-answer grader's seeds, per assistant
    table = pd.DataFrame({"pooled_misaligned": [0.1, 0.2, 0.3, 0.0, 0.4, 0.4, 0.4, 0.0]},
                         index=[*study.rl_names(cfg, "wrong", "safety"), "rl_safety_correct",
                                *study.rl_names(cfg, "wrong", "helpful_only"), "rl_helpful_only_correct"])
    summary = study.rl_seed_summary(cfg, table)
    assert summary.loc["safety", "runs"] == 3
    assert summary.loc["safety", "pooled_misaligned_mean"] == pytest.approx(0.2)
    assert summary.loc["safety", "pooled_misaligned_sd"] == pytest.approx(0.1)
    assert summary.loc["helpful_only", "pooled_misaligned_sd"] == pytest.approx(0.0)
