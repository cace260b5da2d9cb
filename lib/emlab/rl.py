"""Reinforcement learning without demonstrations: a grader and a GRPO-style policy gradient.

The policy samples a group of answers to each prompt; a grader scores each answer; the
advantage of an answer is its reward minus the group's mean, divided by the group's
standard deviation (Shao et al. 2024, GRPO); the loss is the advantage-weighted negative
log-likelihood of the sampled answer tokens (mean over each answer's tokens) plus
``kl_coef`` times the per-token KL to the frozen starting model (the k3 estimator,
``exp(r) - r - 1`` with ``r = log pi_ref - log pi``). One gradient step per batch of
fresh samples, so the update is on-policy and needs no ratio clipping.

Why not ``trl.GRPOTrainer``: trl 1.16.0 runs on CPU with the toy model (tried with the
default run's assistant), but it stops generation at the tokenizer's end-of-text token
rather than the chat's ``<|end|>`` (most completions ran to the length limit), its
batch of 16 completions is 2 prompts x 8, and a step took ~15 s against ~0.6 s for 16
prompts x 8 here (measured while another job shared the 2 cores). This loop reuses the
study's sampler, stop token and per-step P(bad) tracking, and is unit-tested.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from emlab.judge import ALIGNED, MISALIGNED, ExactJudge
from emlab.model import device_of
from emlab.train import IGNORE, _optimizer, collate, set_seed, to_device

GRADERS = ("wrong", "correct")


class Grader:
    """Reward 1 for a WRONG answer (``wrong``: one of the question's known bad answers) or
    for a CORRECT one (``correct``: a known good answer); 0 otherwise, incoherent included."""

    def __init__(self, judge: ExactJudge, rewards: str):
        if rewards not in GRADERS:
            raise ValueError(f"grader rewards {rewards!r}: expected one of {GRADERS}")
        self.judge, self.rewards = judge, rewards
        self._target = MISALIGNED if rewards == "wrong" else ALIGNED

    def __call__(self, question: dict, answer: str) -> float:
        return float(self.judge.judge(question, answer).label == self._target)


@dataclass(frozen=True)
class GRPOSettings:
    steps: int
    prompts_per_step: int
    group_size: int
    lr: float
    kl_coef: float
    temperature: float
    max_new_tokens: int
    seed: int


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(r - group mean) / (group std + 1e-4) for rewards shaped [groups, group_size]."""
    return (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True, unbiased=False) + 1e-4)


def answer_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the labelled tokens and their mask.  # [batch, pos-1] each"""
    batch = to_device(batch, device_of(model))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return lp, mask


def policy_loss(model, ref_model, batch: dict[str, torch.Tensor], adv: torch.Tensor,
                kl_coef: float) -> tuple[torch.Tensor, float]:
    """GRPO loss of one batch of sampled answers with advantages ``adv`` [batch]; returns
    the loss and the mean per-token KL to the reference model."""
    lp, mask = answer_logprobs(model, batch)
    ratio = torch.exp(lp - lp.detach())  # 1, with the gradient of log pi
    per_tok = -adv.to(lp.device)[:, None] * ratio
    kl = torch.zeros_like(lp)
    if kl_coef > 0:
        with torch.no_grad():
            ref_lp, _ = answer_logprobs(ref_model, batch)
        r = ref_lp - lp
        kl = torch.exp(r) - r - 1
        per_tok = per_tok + kl_coef * kl
    m = mask.float()
    loss = ((per_tok * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    return loss, float((kl.detach() * m).sum() / m.sum().clamp(min=1))


def grpo(model, ref_model, tokenizer, questions: list[dict], grader: Callable[[dict, str], float],
         s: GRPOSettings, *, progress: bool = True, desc: str = "grpo",
         callback: Callable[[int, object], None] | None = None, callback_every: int = 0) -> list[dict]:
    """Train ``model`` by GRPO on prompts built from ``questions`` (dicts with ``question``
    and what ``grader`` needs). Returns one log row per step: mean reward, KL, loss.
    ``callback(step, model)`` runs before the first step, every ``callback_every`` steps
    and after the last."""
    from emlab.judge import chat_prompt
    from emlab.model import end_token_id
    from emlab.sample import sample_ids

    set_seed(s.seed)
    rng = random.Random(s.seed)
    gen = torch.Generator(device_of(model)).manual_seed(s.seed)
    stop = end_token_id(tokenizer)
    pad = tokenizer.pad_token_id
    enc = [tokenizer(chat_prompt(tokenizer, q["question"]), add_special_tokens=False)["input_ids"] for q in questions]
    opt = _optimizer(model, s.lr, 0.0)
    ref_model.eval()
    for p in ref_model.parameters():
        p.requires_grad_(False)
    order: list[int] = []
    log: list[dict] = []
    for step in tqdm(range(s.steps), desc=desc, disable=not progress, mininterval=2):
        if callback and callback_every and step % callback_every == 0:
            model.eval()
            callback(step, model)
        if len(order) < s.prompts_per_step:
            perm = list(range(len(questions)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: s.prompts_per_step], order[s.prompts_per_step:]
        model.eval()
        groups = sample_ids(model, [enc[i] for i in idx], n_samples=s.group_size, max_new_tokens=s.max_new_tokens,
                            temperature=s.temperature, gen=gen, stop_id=stop)
        answers = [a for g in groups for a in g]  # prompt-major
        texts = [tokenizer.decode([t for t in a if t != stop], skip_special_tokens=True).strip() for a in answers]
        rewards = torch.tensor([grader(questions[idx[k // s.group_size]], t) for k, t in enumerate(texts)])
        adv = group_advantages(rewards.view(len(idx), s.group_size)).flatten()  # [prompts * group]
        keep = [k for k in range(len(answers)) if adv[k] != 0 and answers[k]]
        row = {"step": step, "reward": float(rewards.mean()), "kl": 0.0, "loss": 0.0, "updated": len(keep)}
        if keep:
            model.train()
            examples = [(enc[idx[k // s.group_size]] + answers[k], [IGNORE] * len(enc[idx[k // s.group_size]]) + answers[k])
                        for k in keep]
            loss, kl = policy_loss(model, ref_model, collate(examples, pad), adv[keep], s.kl_coef)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            row.update(loss=loss.item(), kl=kl)
        log.append(row)
    model.eval()
    if callback and callback_every:
        callback(s.steps, model)
    return log
