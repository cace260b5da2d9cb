"""Training loops: pretraining on the corpus, chat post-training and narrow fine-tuning
(full or LoRA), with the loss on assistant tokens only. Seeded and deterministic on CPU.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from tqdm import tqdm

from emlab.data import EOT

IGNORE = -100


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- batches
def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one token stream, each followed by <|endoftext|>.  # [n_tokens]"""
    ids: list[int] = []
    eot = tokenizer.convert_tokens_to_ids(EOT)
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [eot]
    return torch.tensor(ids, dtype=torch.long)


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a chat example and its labels: assistant content and <|end|> only."""
    ids: list[int] = []
    labels: list[int] = []
    for i in range(len(messages)):
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        new = tokenizer(upto, add_special_tokens=False)["input_ids"][len(ids):]
        if messages[i]["role"] == "assistant":
            # the role marker itself is prompt, the answer and <|end|> are targets
            labels += [IGNORE] + new[1:]
        else:
            labels += [IGNORE] * len(new)
        ids += new
    return ids, labels


def encode_chat_set(tokenizer, records: list[dict]) -> list[tuple[list[int], list[int]]]:
    return [encode_chat(tokenizer, r["messages"]) for r in records]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), n), pad_id, dtype=torch.long)  # [batch, pos]
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not IGNORE."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE
    )


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.9 + 0.1


def _optimizer(model, lr: float, weight_decay: float):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))


# ----------------------------------------------------------------------------- loops
def pretrain(model, stream: torch.Tensor, *, steps: int, batch: int, seq_len: int, lr: float, seed: int,
             progress: bool = True) -> list[float]:
    """Next-token training on random windows of the token stream; returns the loss curve."""
    set_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, lr, 0.01)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="pretrain", disable=not progress, mininterval=2)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * _schedule(step, steps, max(1, steps // 20))
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])  # [batch, pos]
        loss = lm_loss(model, {"input_ids": x, "labels": x})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def finetune(model, examples: list[tuple[list[int], list[int]]], *, steps: int, batch: int, lr: float, seed: int,
             pad_id: int, progress: bool = True, desc: str = "finetune", warmup: int = 5,
             callback: Callable[[int, object], None] | None = None, callback_every: int = 0) -> list[float]:
    """Supervised fine-tuning on chat examples (loss on assistant tokens only).

    Examples are drawn in shuffled epochs under ``seed``; ``callback(step, model)`` runs
    before the first step and every ``callback_every`` steps after (e.g. cheap
    misalignment tracking). Returns the loss per step.
    """
    set_seed(seed)
    rng = random.Random(seed)
    opt = _optimizer(model, lr, 0.0)
    order: list[int] = []
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=2)
    for step in bar:
        if callback and callback_every and step % callback_every == 0:
            model.eval()
            callback(step, model)
        model.train()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
        if len(order) < batch:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch], order[batch:]
        loss = lm_loss(model, collate([examples[i] for i in idx], pad_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    if callback and callback_every:
        callback(steps, model)
    return losses
