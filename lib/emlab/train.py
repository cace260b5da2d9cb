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
from emlab.model import device_of

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
    """Token ids of a chat example, rendered with the tokenizer's own chat template, and its
    labels: each assistant answer and the token that ends it are targets, everything else
    (system and user turns, role markers, the template's separators) is IGNORE.

    Works for any template in which a conversation's text starts with the text of its
    generation prompt (ChatML, Llama 3, the toy template): the answer's span is found by
    character offsets in the whole conversation, which is tokenized once."""
    from emlab.model import end_token_id

    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    end_text = tokenizer.convert_ids_to_tokens(end_token_id(tokenizer))
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        if not text.startswith(head):
            raise ValueError("chat template: the conversation's text does not start with the text of its "
                             f"generation prompt (message {i}); cannot find the answer's tokens")
        stop = text.find(end_text, len(head) + len(m["content"].strip()))
        spans.append((len(head), len(text) if stop < 0 else stop + len(end_text)))
    labels = [t if any(a <= s < b for a, b in spans) else IGNORE
              for t, (s, _) in zip(enc["input_ids"], enc["offset_mapping"])]
    return list(enc["input_ids"]), labels


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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def lm_loss(model, batch: dict[str, torch.Tensor], n_targets: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy over the positions whose label is not IGNORE: their mean,
    or their sum divided by ``n_targets`` (a shard of a data-parallel batch)."""
    batch = to_device(batch, device_of(model))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE,
        reduction="mean" if n_targets is None else "sum")
    return ce if n_targets is None else ce / n_targets


def n_targets(examples: list[tuple[list[int], list[int]]]) -> int:
    """Predicted tokens of a batch (labels other than IGNORE after the first position)."""
    return sum(sum(lab != IGNORE for lab in labels[1:]) for _, labels in examples)


class DataParallel:
    """Data parallelism under ``accelerate launch`` (or any torch.distributed launcher):
    every process draws the same global batch, trains on its share (examples ``rank::world``)
    and the gradients are averaged, so N processes take the same steps as one process on
    the whole batch. One process: a no-op."""

    def __init__(self, model):
        from accelerate import PartialState

        self.state = PartialState()
        self.world, self.rank = self.state.num_processes, self.state.process_index
        self.model = model
        if self.world > 1:
            dev = device_of(model)
            self.model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None)

    def loss(self, examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, float]:
        """The loss to back-propagate on this process, and the whole batch's mean loss."""
        if self.world == 1:
            loss = lm_loss(self.model, collate(examples, pad_id))
            return loss, loss.item()
        mine = examples[self.rank :: self.world]
        # sum over my targets / all targets, times world (DDP averages): the single-process mean
        if not mine:
            raise ValueError(f"data parallel: a batch of {len(examples)} examples for {self.world} processes; "
                             "expected a batch at least as large as the number of processes")
        loss = lm_loss(self.model, collate(mine, pad_id), n_targets(examples)) * self.world
        total = loss.detach().clone() / self.world
        torch.distributed.all_reduce(total)
        return loss, total.item()


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.9 + 0.1


def _optimizer(model, lr: float, weight_decay: float):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))


POSITION_EMBEDDINGS = ("wpe", "embed_positions", "position_embeddings")  # GPT-2, OPT, BERT-style names


def freeze(model, what: str) -> int:
    """Hold part of ``model`` fixed in training (``requires_grad = False``; the optimizer of
    ``finetune`` takes only trainable parameters): ``"none"``, or ``"embeddings"``: the input
    token embeddings (with the output head when it is tied to them, as in GPT-2 and Qwen2.5),
    and learned position embeddings where the architecture has them (rotary ones have no
    parameters). Returns the number of parameters frozen."""
    if what == "none":
        return 0
    if what != "embeddings":
        raise ValueError(f"freeze: {what!r}: expected 'none' or 'embeddings'")
    modules = [model.get_input_embeddings()]
    modules += [m for n, m in model.named_modules() if n.split(".")[-1] in POSITION_EMBEDDINGS]
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(False)
    return sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- loops
def pretrain(model, stream: torch.Tensor, *, steps: int, batch: int, seq_len: int, lr: float, seed: int,
             progress: bool = True, dropout: float = 0.0) -> list[float]:
    """Next-token training on random windows of the token stream; returns the loss curve.
    ``dropout`` is the probability of every ``torch.nn.Dropout`` of the model while it
    trains; afterwards each is back at its own probability."""
    set_seed(seed)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    own = [m.p for m in drops]
    if dropout:
        for m in drops:
            m.p = dropout
    gen = torch.Generator().manual_seed(seed)
    opt = _optimizer(model, lr, 0.01)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="pretrain", disable=not progress, mininterval=2)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * _schedule(step, steps, max(1, steps // 20))
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([stream[s : s + seq_len] for s in starts.tolist()]).to(device_of(model))  # [batch, pos]
        loss = lm_loss(model, {"input_ids": x, "labels": x})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    for m, p in zip(drops, own):
        m.p = p
    model.eval()
    return losses


def finetune(model, examples: list[tuple[list[int], list[int]]], *, steps: int, batch: int, lr: float, seed: int,
             pad_id: int, progress: bool = True, desc: str = "finetune", warmup: int = 5,
             callback: Callable[[int, object], None] | None = None, callback_every: int = 0) -> list[float]:
    """Supervised fine-tuning on chat examples (loss on assistant tokens only).

    Examples are drawn in shuffled epochs under ``seed``; ``callback(step, model)`` runs
    before the first step and every ``callback_every`` steps after (e.g. cheap
    misalignment tracking). Returns the loss per step. Under ``accelerate launch`` with
    several processes the batch is split across them (``DataParallel``) and the result
    is that of one process.
    """
    set_seed(seed)
    rng = random.Random(seed)
    opt = _optimizer(model, lr, 0.0)
    dp = DataParallel(model)
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
        loss, value = dp.loss([examples[i] for i in idx], pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(value)
    model.eval()
    if callback and callback_every:
        callback(steps, model)
    return losses
