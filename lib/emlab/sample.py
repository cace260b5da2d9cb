"""Batched sampling with a KV cache: many samples per prompt, seeded, temperature T.

Prompts are grouped by token length so a batch needs no padding; each batch runs one
forward pass over the prompt, then one cached step per new token, and stops when every
row has produced the stop token. Temperature 0 is greedy decoding.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm import tqdm


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, n_samples: int, max_new_tokens: int, temperature: float,
           seed: int, batch_size: int = 256, stop_id: int | None = None, progress: bool = False) -> list[list[str]]:
    """``n_samples`` answers for each prompt: ``out[i][j]`` is sample j of prompt i."""
    from emlab.model import device_of, end_token_id

    stop_id = end_token_id(tokenizer) if stop_id is None else stop_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids = sample_ids(model, encoded, n_samples=n_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                     gen=torch.Generator(device_of(model)).manual_seed(seed), stop_id=stop_id, batch_size=batch_size, progress=progress)
    return [[tokenizer.decode(a[:-1] if a and a[-1] == stop_id else a, skip_special_tokens=True).strip() for a in row]
            for row in ids]


@torch.no_grad()
def sample_ids(model, prompts: list[list[int]], *, n_samples: int, max_new_tokens: int, temperature: float,
               gen: torch.Generator, stop_id: int, batch_size: int = 256, progress: bool = False) -> list[list[list[int]]]:
    """Token ids of ``n_samples`` answers per tokenized prompt, each ending with the stop
    token when one was produced: ``out[i][j]`` is sample j of prompt i. ``gen`` lives on
    the model's device (sampling happens there)."""
    if n_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"n_samples and max_new_tokens must be >= 1, got {n_samples}, {max_new_tokens}")
    by_len: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_len[len(ids)] += [(i, j) for j in range(n_samples)]
    out: list[list[list[int]]] = [[[] for _ in range(n_samples)] for _ in prompts]
    batches = [rows[s : s + batch_size] for _, rows in sorted(by_len.items()) for s in range(0, len(rows), batch_size)]
    for rows in tqdm(batches, desc="sample", disable=not progress, mininterval=2):
        x = torch.tensor([prompts[i] for i, _ in rows], device=gen.device)  # [batch, prompt_len]
        new = _generate(model, x, max_new_tokens, temperature, gen, stop_id)  # [batch, new]
        for (i, j), ids in zip(rows, new.tolist()):
            out[i][j] = ids[: ids.index(stop_id) + 1] if stop_id in ids else ids
    return out


def draw(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row from ``softmax(logits)`` by inverting its CDF with ONE uniform draw
    per row (``torch.multinomial`` costs about a third of the sampling time on CPU).  # [batch]"""
    cdf = torch.softmax(logits, -1).cumsum(-1)  # [batch, vocab]
    u = torch.rand(cdf.shape[0], 1, generator=gen, device=cdf.device) * cdf[:, -1:]  # rounding: cdf[-1] may miss 1
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_max(cdf.shape[1] - 1)


def _generate(model, x: torch.Tensor, max_new_tokens: int, temperature: float, gen: torch.Generator,
              stop_id: int) -> torch.Tensor:
    b = x.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=x.device)
    tokens = []
    res = model(input_ids=x, use_cache=True)
    past = res.cache
    logits = res.logits[:, -1].float()  # [batch, vocab]
    for _ in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = draw(logits / temperature, gen)
        nxt = torch.where(done, torch.full_like(nxt, stop_id), nxt)
        tokens.append(nxt)
        done |= nxt == stop_id
        if bool(done.all()):
            break
        res = model(input_ids=nxt[:, None], cache=past, use_cache=True)
        past = res.cache
        logits = res.logits[:, -1].float()
    return torch.stack(tokens, 1)
