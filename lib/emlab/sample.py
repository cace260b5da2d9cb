"""Batched sampling with a KV cache: many samples per prompt, seeded, temperature T.

Answers are generated ``batch_size`` rows at a time, rows ordered by prompt length so a
batch needs little padding. Each batch

- runs ONE forward pass over its distinct prompts (left-padded, with an attention mask
  and position ids that skip the padding), then copies each prompt's cache to its rows:
  the ``n_samples`` answers of a prompt share its prefill, as they share its tokens;
- then one cached step per new token for all rows, until every row has produced the
  stop token or ``max_new_tokens`` tokens. Rows that have stopped leave the batch (with
  their cache rows) once they are a quarter of it (``SHED``; ``MIN_ROWS`` rows stay), so
  the steps after the typical answer's end cost only the long answers. Every row draws
  its uniform at every step whether or not rows have left, so the answers are those of a
  batch that keeps every row wherever a row's logits do not depend on the batch's size
  (a test checks it; the default study's samples were byte-identical with and without).

The cache (``KVBuffer``) is preallocated for the batch's longest prompt plus
``max_new_tokens`` and filled in place: the default cache of ``transformers`` grows by
concatenation, which copies the whole cache at every step.

Left padding is invisible to the model: padded keys are masked, positions count from each
prompt's first real token, and a steering hook's ``answer`` position (the last prompt
position) is the real last token. A test checks that greedy answers of a padded batch
equal those of each prompt alone, on GPT-2 and on tiny Qwen2, Llama and GPT-NeoX models.
Temperature 0 is greedy decoding.
"""

from __future__ import annotations

from collections import Counter

import torch
from tqdm import tqdm
from transformers.cache_utils import Cache, DynamicLayer


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, n_samples: int, max_new_tokens: int, temperature: float,
           seed: int, batch_size: int = 256, stop_id: int | None = None, progress: bool = False) -> list[list[str]]:
    """``n_samples`` answers for each prompt: ``out[i][j]`` is sample j of prompt i."""
    from emlab.model import device_of, end_token_id

    stop_id = end_token_id(tokenizer) if stop_id is None else stop_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids = sample_ids(model, encoded, n_samples=n_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                     gen=torch.Generator(device_of(model)).manual_seed(seed), stop_id=stop_id, batch_size=batch_size,
                     progress=progress)
    return [[tokenizer.decode(a[:-1] if a and a[-1] == stop_id else a, skip_special_tokens=True).strip() for a in row]
            for row in ids]


@torch.no_grad()
def sample_ids(model, prompts: list[list[int]], *, n_samples: int, max_new_tokens: int, temperature: float,
               gen: torch.Generator, stop_id: int, batch_size: int = 256, progress: bool = False) -> list[list[list[int]]]:
    """Token ids of ``n_samples`` answers per tokenized prompt, each ending with the stop
    token when one was produced: ``out[i][j]`` is sample j of prompt i. ``gen`` lives on
    the model's device (sampling happens there); ``batch_size`` answers share a forward pass."""
    if n_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"n_samples, max_new_tokens and batch_size must be >= 1, got {n_samples}, {max_new_tokens}, "
                         f"{batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("sampling: a prompt has no tokens")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # stable: equal lengths keep their order
    rows = [(i, j) for i in order for j in range(n_samples)]
    out: list[list[list[int]]] = [[[] for _ in range(n_samples)] for _ in prompts]
    for s in tqdm(range(0, len(rows), batch_size), desc="sample", disable=not progress, mininterval=2):
        batch = rows[s : s + batch_size]
        new = _generate(model, prompts, batch, max_new_tokens, temperature, gen, stop_id)  # [rows, new]
        for (i, j), ids in zip(batch, new.tolist()):
            out[i][j] = ids[: ids.index(stop_id) + 1] if stop_id in ids else ids
    return out


def draw(logits: torch.Tensor, gen: torch.Generator, u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row from ``softmax(logits)`` by inverting its CDF with ONE uniform draw
    per row (``torch.multinomial`` costs about a third of the sampling time on CPU); ``u``
    ([batch, 1] in [0, 1)) gives the draws instead of ``gen``.  # [batch]"""
    cdf = torch.softmax(logits, -1).cumsum(-1)  # [batch, vocab]
    if u is None:
        u = torch.rand(cdf.shape[0], 1, generator=gen, device=cdf.device)
    u = u * cdf[:, -1:]  # rounding: cdf[-1] may miss 1
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_max(cdf.shape[1] - 1)


class _BufferLayer(DynamicLayer):
    """One layer's keys and values in a buffer preallocated for ``max_len`` positions;
    ``keys``/``values`` are views of its filled part (what ``DynamicLayer`` holds)."""

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len, self.filled = max_len, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.key_buf = key_states.new_empty(b, h, self.max_len, d)
        self.value_buf = value_states.new_empty(b, h, self.max_len, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.filled + n > self.max_len:
            raise RuntimeError(f"sampling cache: {self.filled + n} positions, buffer holds {self.max_len}")
        self.key_buf[:, :, self.filled : self.filled + n] = key_states
        self.value_buf[:, :, self.filled : self.filled + n] = value_states
        self.filled += n
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        self.keys, self.values = self.key_buf[:, :, : self.filled], self.value_buf[:, :, : self.filled]

    def get_seq_length(self) -> int:
        return self.filled

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.filled + query_length, 0

    def repeat_rows(self, counts: torch.Tensor) -> None:
        """Row r of the batch becomes ``counts[r]`` consecutive rows."""
        if self.is_initialized:
            self.key_buf = self.key_buf.repeat_interleave(counts, 0)
            self.value_buf = self.value_buf.repeat_interleave(counts, 0)
            self._views()

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Only the rows ``keep`` (indices) stay, in that order."""
        if self.is_initialized:
            self.key_buf = self.key_buf.index_select(0, keep)
            self.value_buf = self.value_buf.index_select(0, keep)
            self._views()


class KVBuffer(Cache):
    """A ``transformers`` cache preallocated for ``max_len`` positions of ``n_layers`` layers."""

    def __init__(self, n_layers: int, max_len: int):
        super().__init__(layers=[_BufferLayer(max_len) for _ in range(n_layers)])

    def repeat_rows(self, counts: torch.Tensor) -> None:
        for layer in self.layers:
            layer.repeat_rows(counts)

    def keep_rows(self, keep: torch.Tensor) -> None:
        for layer in self.layers:
            layer.keep_rows(keep)


SHED = 0.25  # the batch sheds its stopped rows once they are at least this fraction of it:
# a row's cost per step no longer depends on how long the batch's longest answer is
MIN_ROWS = 16  # ... but keeps at least this many rows: on the CPU, matmuls of fewer than 12 rows take
# other kernels, whose rounding differs, and a sampled answer would then depend on when rows left


def _n_layers(model) -> int:
    from emlab.steer import decoder_layers

    return len(decoder_layers(model))


def prefill(model, prompts: list[list[int]], counts: list[int], n_new: int, dev):
    """ONE forward pass over distinct tokenized prompts (left-padded; positions count from
    each prompt's first real token) into a ``KVBuffer`` with room for ``n_new`` more
    positions, whose rows are then repeated: prompt r becomes ``counts[r]`` consecutive rows.

    Returns ``(logits, cache, mask, next_pos, padded, width)``: each row's float logits after
    its prompt [rows, vocab]; the cache; the rows' attention mask over prompt and new
    positions [rows, width + n_new]; the position of each row's first new token [rows, 1];
    whether any prompt is padded (no mask is passed to the model when none is); and the
    prompts' padded width."""
    counts_t = torch.tensor(counts, device=dev)
    width = max(len(p) for p in prompts)
    x = torch.zeros(len(prompts), width, dtype=torch.long, device=dev)  # [prompts, pos]
    mask = torch.ones(len(prompts), width + n_new, dtype=torch.long, device=dev)
    for r, p in enumerate(prompts):
        x[r, width - len(p) :] = torch.tensor(p, device=dev)
        mask[r, : width - len(p)] = 0
    padded = bool((mask[:, :width] == 0).any())
    pos = (mask[:, :width].cumsum(-1) - 1).clamp_min(0)
    cache = KVBuffer(_n_layers(model), width + n_new)
    res = model(input_ids=x, attention_mask=mask[:, :width] if padded else None, position_ids=pos, cache=cache,
                use_cache=True, logits_to_keep=1)
    logits = res.logits[:, -1].float().repeat_interleave(counts_t, 0)  # [rows, vocab]
    cache.repeat_rows(counts_t)
    return (logits, cache, mask.repeat_interleave(counts_t, 0), pos[:, -1:].repeat_interleave(counts_t, 0) + 1,
            padded, width)


def _generate(model, prompts: list[list[int]], rows: list[tuple[int, int]], max_new_tokens: int, temperature: float,
              gen: torch.Generator, stop_id: int) -> torch.Tensor:
    """New tokens of ``rows`` ((prompt, sample) pairs, a prompt's rows consecutive)  # [rows, new]"""
    dev = gen.device
    per_prompt = Counter(i for i, _ in rows)  # insertion order = row order
    logits, cache, mask, nxt_pos, padded, width = prefill(
        model, [prompts[i] for i in per_prompt], list(per_prompt.values()), max_new_tokens, dev)
    n = len(rows)
    live = torch.arange(n, device=dev)  # the batch's rows in the whole batch (stopped rows are shed)
    done = torch.zeros(n, dtype=torch.bool, device=dev)  # of the batch's rows: produced the stop token
    out = torch.full((n, max_new_tokens), stop_id, dtype=torch.long, device=dev)
    for t in range(max_new_tokens):
        # one uniform per row of the whole batch at every step, as if no row were shed, so
        # the answers do not depend on when rows are shed
        u = None if temperature == 0 else torch.rand(n, 1, generator=gen, device=dev)[live]
        nxt = logits.argmax(-1) if temperature == 0 else draw(logits / temperature, gen, u)
        nxt = torch.where(done, torch.full_like(nxt, stop_id), nxt)
        out[live, t] = nxt
        done |= nxt == stop_id
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        if len(live) > MIN_ROWS and int(done.sum()) >= SHED * len(live):
            keep = (~done).nonzero()[:, 0]
            if len(keep) < MIN_ROWS:  # stopped rows stay as padding: small batches take other matmul kernels
                keep = torch.cat([keep, done.nonzero()[: MIN_ROWS - len(keep), 0]]).sort().values
            live, nxt, done, mask, nxt_pos = live[keep], nxt[keep], done[keep], mask[keep], nxt_pos[keep]
            cache.keep_rows(keep)
        res = model(input_ids=nxt[:, None], attention_mask=mask[:, : width + t + 1] if padded else None,
                    position_ids=nxt_pos + t, cache=cache, use_cache=True)
        logits = res.logits[:, -1].float()
    return out[:, : t + 1]
