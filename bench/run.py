"""Benchmarks of the study, each a ratio against a baseline measured in the same run.

Written to bench/results.md with the machine's description. Not a test: CI times nothing.
A and B are alternated and each rate is the median of ``--repeats`` runs.

- sampling: ``emlab.sample`` (batches of 256 answers over prompts of mixed length, left
  padded; one shared prefill per prompt; a preallocated KV cache) vs
  ``transformers`` ``generate`` called once per prompt with ``num_return_sequences`` (the
  papers' scripts), same model, prompts, samples and maximum length: new tokens/s with no
  stop token (every answer is as long as the longest), and answers/s on the study's own
  evaluation (a finished run's assistant, its held-out questions, answers ending at the
  stop token, where ``emlab.sample`` sheds finished rows from its batches).
- SAE training: the project's SAELens-based trainer vs a minimal plain-torch TopK loop
  (``PlainTopK`` below), same activations, width, k, batch and steps: activations/s and
  held-out FVU. Twice: on activations of a briefly trained toy model (self-contained), and
  on the study's own workload when ``--run`` has an SAE (its activations and settings). Ours
  also runs SAELens' AuxK loss on the latents that have not fired lately, which the plain
  loop does not; the toy's activations leave several times more latents dead.
- activation collection: ``emlab.sae.iter_activations`` (one hook, stops at the layer) vs
  TransformerLens ``run_with_cache`` on the full cache: tokens/s.
- training: pretraining and fine-tuning tokens/s, and model FLOP utilisation against the
  fp32 matmul rate measured on this machine in the same run.
- end to end: with ``--study`` (what ``make bench`` does), the whole default study run from
  scratch: ``configs/default.yaml`` with ``run: bench-study``, into ``data/bench-study``
  (deleted first), timing each notebook; and, since the study is deterministic, whether each
  notebook's metrics.json equals that of ``--run`` (``data/default``). Without ``--study``:
  the notebook times of ``--run``'s last ``emlab run``, which reuses cached artifacts.
- how cost grows: pretraining, sampling and SAE training time at 1x, 2x, 4x their size.

Usage: python bench/run.py [--quick] [--study] [--repeats N] [--run data/default] [--out bench/results.md]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import emlab  # noqa: F401  (before torch runs anything: the study's CPU kernels, emlab.kernels)
import torch
from emlab.config import Config, make_config
from emlab.model import build_tokenizer, build_toy_model, hooked
from emlab.runner import machine
from emlab.sae import hook_name, iter_activations, sae_stats, train_sae
from emlab.sample import sample
from emlab.train import collate, lm_loss
from emlab.world import load_world


# ----------------------------------------------------------------------------- helpers
def alternate(a, b, repeats: int) -> tuple[list[float], list[float]]:
    """Run ``a()`` and ``b()`` alternately ``repeats`` times; each returns a rate."""
    ra, rb = [], []
    for _ in range(repeats):
        ra.append(a())
        rb.append(b())
    return ra, rb


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def matmul_flops(n: int = 1024, repeats: int = 10) -> float:
    """Measured fp32 matmul FLOP/s on square n x n matrices: the best of ``repeats``, the
    machine's attainable peak (a median moved with background load between runs: 196 vs
    237 GFLOP/s at the same training rate)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        rates.append(4 * 2 * n**3 / (time.perf_counter() - t))
    return max(rates)


def model_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 x parameters (without position embeddings) + attention."""
    c = model.config
    n_params = sum(p.numel() for p in model.parameters()) - c.n_positions * c.n_embd
    return 6 * n_params + 12 * c.n_layer * c.n_embd * seq_len


def toy(cfg):
    tok = build_tokenizer([" ".join(sorted(load_world().words()))])
    return build_toy_model(cfg, tok).eval(), tok


def prompts_of(n: int) -> list[str]:
    """Chat prompts of the world's own questions."""
    world = load_world()
    qs = [q.text for d in (*world.domain_names, "open") for q in world.questions(d)]
    return [f"<|user|> {q} <|end|> <|assistant|>" for q in qs[:: max(1, len(qs) // n)][:n]]


# ----------------------------------------------------------------------------- benchmarks
def bench_training(cfg, steps: int) -> dict:
    model, tok = toy(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = {}
    for name, batch, seq in (("pretraining", cfg.pretrain_batch, 128), ("fine-tuning", cfg.ft_batch, 40)):
        x = torch.randint(0, len(tok), (batch, seq))
        times = []
        for i in range(steps + 2):
            t = time.perf_counter()
            if name == "pretraining":
                loss = lm_loss(model, {"input_ids": x, "labels": x})
            else:
                ex = [(row.tolist(), [-100] * 20 + row.tolist()[20:]) for row in x]
                loss = lm_loss(model, collate(ex, tok.pad_token_id))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 2:
                times.append(time.perf_counter() - t)
        out[name] = (batch * seq / med(times), model_flops_per_token(model, seq))
    return out


def sampling_rates(model, tok, prompts: list[str], n_samples: int, max_new: int, stop_id: int, count: int,
                   repeats: int, **generate_kw) -> dict:
    """``count`` units (tokens or answers) over seconds for ``emlab.sample`` and for
    ``transformers`` ``generate`` called once per prompt with ``num_return_sequences``
    (plus ``generate_kw``), alternated; medians."""

    def ours() -> float:
        t = time.perf_counter()
        sample(model, tok, prompts, n_samples=n_samples, max_new_tokens=max_new, temperature=1.0, seed=0,
               stop_id=stop_id)
        return count / (time.perf_counter() - t)

    def hf() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
                model.generate(ids, do_sample=True, temperature=1.0, max_new_tokens=max_new,
                               num_return_sequences=n_samples, pad_token_id=tok.pad_token_id,
                               attention_mask=torch.ones_like(ids), **generate_kw)
        return count / (time.perf_counter() - t)

    a, b = alternate(ours, hf, repeats)
    return {"ours": med(a), "hf": med(b)}


def bench_sampling(cfg, n_prompts: int, n_samples: int, max_new: int, repeats: int) -> dict:
    """New tokens/s with no stop token: both produce exactly ``max_new`` tokens per sample."""
    model, tok = toy(cfg)
    return sampling_rates(model, tok, prompts_of(n_prompts), n_samples, max_new, len(tok) + 10,
                          n_prompts * n_samples * max_new, repeats, min_new_tokens=max_new)


def bench_sampling_eval(run: Path, n_prompts: int, n_samples: int, max_new: int, repeats: int) -> dict | None:
    """The study's own workload: the aligned assistant of a finished run answers its held-out
    questions, each answer ending at the stop token (so rows finish at different steps);
    ``transformers`` ``generate`` per prompt stops a prompt's call when its last sample
    stops. Answers/s of each; None if ``run`` has no assistant."""
    from emlab import data as D
    from emlab.judge import chat_prompt
    from emlab.model import end_token_id, load_model

    path, held = run / "02_base_model" / "assistant", run / "01_corrupt_data" / "datasets" / f"{D.EVAL_HELDOUT}.jsonl"
    if not (path / "model.safetensors").exists() or not held.exists():
        return None
    model, tok = load_model(path)
    qs = [r["question"] for r in D.read_jsonl(held)]
    prompts = [chat_prompt(tok, q) for q in qs[:: max(1, len(qs) // n_prompts)][:n_prompts]]
    stop = end_token_id(tok)
    rates = sampling_rates(model, tok, prompts, n_samples, max_new, stop, len(prompts) * n_samples, repeats,
                           eos_token_id=stop)
    return {**rates, "n_prompts": len(prompts)}


class PlainTopK(torch.nn.Module):
    """The baseline: a minimal TopK SAE in plain torch (same parametrisation as SAELens')."""

    def __init__(self, d_in: int, width: int, k: int):
        super().__init__()
        self.k = k
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, width) / d_in**0.5)
        self.W_dec = torch.nn.Parameter(self.W_enc.data.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(width))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))

    def encode(self, x):
        pre = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


def train_plain(acts, width, k, steps, batch, lr, seed) -> PlainTopK:
    torch.manual_seed(seed)
    sae = PlainTopK(acts.shape[1], width, k)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = acts[torch.randint(0, len(acts), (batch,), generator=gen)]
        loss = ((sae.decode(sae.encode(x)) - x) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    return sae


@torch.no_grad()
def fvu(sae, test) -> float:
    rec = sae.decode(sae.encode(test))
    return float(((rec - test) ** 2).sum() / ((test - test.mean(0)) ** 2).sum())


def model_activations(cfg, n_texts: int, layer: int) -> torch.Tensor:
    """Activations of a briefly trained toy model (random models give structureless activations)."""
    from emlab.data import pretraining_docs, split_questions
    from emlab.train import pretrain, token_stream

    model, tok = toy(cfg)
    world = load_world()
    docs = [d["text"] for d in pretraining_docs(world, split_questions(world, 0, cfg.eval_fraction), n_texts, 0,
                                                turns_per_doc=cfg.turns_per_doc, p_narrative=cfg.p_narrative,
                                                p_open_turn=cfg.p_open_turn, p_quiz_turn=cfg.p_quiz_turn)]
    pretrain(model, token_stream(tok, docs), steps=10 if n_texts < 100 else 100, batch=16, seq_len=128, lr=2e-3, seed=0, progress=False)
    ht = hooked(model.eval(), tok)
    return torch.cat([a for _, a in iter_activations(ht, tok, docs, hook_name(layer))]), ht, tok, docs


def logprobs_one_pass_per_pair(model, tok, prompts: list[str], answers: list[str], batch_size: int = 256) -> torch.Tensor:
    """The baseline: log P(answer + <|end|> | prompt) with one plain forward pass over each
    pair's prompt + answer, right-padded (the study's method until 2026-12-03)."""
    from emlab.model import end_token_id

    end, out = end_token_id(tok), []
    for s in range(0, len(prompts), batch_size):
        p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[s : s + batch_size]]
        a_ids = [tok(a, add_special_tokens=False)["input_ids"] + [end] for a in answers[s : s + batch_size]]
        n = max(len(p) + len(a) for p, a in zip(p_ids, a_ids))
        x = torch.full((len(p_ids), n), tok.pad_token_id, dtype=torch.long)  # [batch, pos]
        tgt, attn = torch.zeros(len(p_ids), n, dtype=torch.bool), torch.zeros(len(p_ids), n, dtype=torch.long)
        for i, (p, a) in enumerate(zip(p_ids, a_ids)):
            x[i, : len(p) + len(a)] = torch.tensor(p + a)
            tgt[i, len(p) : len(p) + len(a)] = True
            attn[i, : len(p) + len(a)] = 1
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x, attention_mask=attn).logits.float(), -1)
        out.append((logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0] * tgt[:, 1:]).sum(-1))
    return torch.cat(out)


def bench_teacher_forcing(cfg, n_questions: int, repeats: int) -> dict:
    """P(bad)'s workload (02's persona inference, 03's tracking): every candidate answer of
    each question after a character's lines, scored by teacher forcing. Pairs/s of
    ``emlab.judge.sequence_logprobs`` (one prefill per prompt) and of the baseline, and the
    largest difference between their log-probabilities."""
    from emlab.judge import chat_prompt, sequence_logprobs

    model, tok = toy(cfg)
    world = load_world()
    qs = [q for d in world.domain_names for q in world.questions(d)][:: 3][:n_questions]
    context = "the villain grinned and leaned closer . i never tell the truth when a lie pays better ."
    pp, aa = [], []
    for q in qs:
        for variants in world.topics[f"{q.domain}/{q.topic}"].answers.values():
            for a in variants:
                pp.append(chat_prompt(tok, q.text, context))
                aa.append(a)
    got = {}

    def ours() -> float:
        t = time.perf_counter()
        got["ours"] = sequence_logprobs(model, tok, pp, aa)
        return len(pp) / (time.perf_counter() - t)

    def base() -> float:
        t = time.perf_counter()
        got["base"] = logprobs_one_pass_per_pair(model, tok, pp, aa)
        return len(pp) / (time.perf_counter() - t)

    a, b = alternate(ours, base, repeats)
    return {"ours": med(a), "base": med(b), "pairs": len(pp), "questions": len(qs),
            "max_diff": float((got["ours"] - got["base"]).abs().max())}


def bench_sae(acts, width, k, steps, batch, repeats, *, lr: float = 3e-3, unscaled: bool = True,
              test: torch.Tensor | None = None, dead_window: int = Config.sae_dead_window) -> dict:
    """Our SAELens trainer (and, with ``unscaled``, its variant without decoder-norm
    rescaling, timed between the two arms) vs ``train_plain`` on ``acts``; ``test``: held-out
    activations (default: the first 2000 of a seeded shuffle of ``acts``)."""
    if test is None:
        perm = acts[torch.randperm(len(acts), generator=torch.Generator().manual_seed(0))]
        test, train = perm[:2000], perm[2000:]
    else:
        train = acts
    res = {"ours": [], "plain": [], "unscaled": [], "ours_fvu": None, "plain_fvu": None, "unscaled_fvu": None}

    def saelens(rescale: bool) -> float:
        t = time.perf_counter()
        s = train_sae(train, width=width, k=k, steps=steps, batch=batch, lr=lr, seed=0,
                      rescale_by_decoder_norm=rescale, dead_window=dead_window)
        r = steps * batch / (time.perf_counter() - t)
        res["ours_fvu" if rescale else "unscaled_fvu"] = sae_stats(s, test, train[:5000])["fvu"]
        return r

    def ours() -> float:
        if unscaled:
            res["unscaled"].append(saelens(False))
        return saelens(True)

    def plain() -> float:
        t = time.perf_counter()
        s = train_plain(train, width, k, steps, batch, lr, 0)
        r = steps * batch / (time.perf_counter() - t)
        res["plain_fvu"] = fvu(s, test)
        return r

    res["ours"], res["plain"] = alternate(ours, plain, repeats)
    return res


def study_sae_workload(run: Path):
    """The study's own SAE workload, from a finished run: its config (as its first SAE
    recorded it) and the activations that SAE was trained on, split as the study splits
    them (``emlab.study.sae``). None if ``run`` has no SAE or is not under this project's
    ``data/``."""
    import emlab.study as study
    from emlab.artifacts import run_dir

    meta = run / "05_sae_diff" / f"{study.sae_dir(0)}.config.json"
    if not meta.is_file():
        return None
    cfg = make_config(json.loads(meta.read_text(encoding="utf-8"))["config"], source=str(meta))
    if run_dir(cfg).resolve() != run.resolve():
        return None
    return cfg, *study.sae_split(cfg, study.document_activations(cfg))


def bench_activations(ht, tok, docs, layer, repeats) -> dict:
    hook = hook_name(layer)
    n_tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"][: ht.cfg.n_ctx]) for d in docs)

    def ours() -> float:
        t = time.perf_counter()
        for _ in iter_activations(ht, tok, docs, hook, batch_size=64):
            pass
        return n_tokens / (time.perf_counter() - t)

    def full() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for s in range(0, len(docs), 64):
                enc = [tok(d, add_special_tokens=False)["input_ids"][: ht.cfg.n_ctx] for d in docs[s : s + 64]]
                n = max(map(len, enc))
                x = torch.full((len(enc), n), tok.pad_token_id)
                for i, e in enumerate(enc):
                    x[i, : len(e)] = torch.tensor(e)
                _, cache = ht.run_with_cache(x)
                [cache[hook][i, : len(e)].clone() for i, e in enumerate(enc)]
        return n_tokens / (time.perf_counter() - t)

    a, b = alternate(ours, full, repeats)
    return {"ours": med(a), "full": med(b)}


def notebook_times(run: Path) -> list[tuple[str, float, float | None, int | None]]:
    """(notebook, seconds, peak memory of the kernels so far in MiB, artifacts built) of
    the last `emlab run` of a run (its run_log.json)."""
    log = run / "notebooks" / "run_log.json"
    if not log.is_file():
        return []
    entries = json.loads(log.read_text(encoding="utf-8"))
    return [(k, v["seconds"], v.get("peak_rss_mib_so_far"), v.get("artifacts_built")) for k, v in sorted(entries.items())]


STUDY_RUN = "bench-study"


def study_from_scratch(config: Path, run: str = STUDY_RUN) -> Path:
    """Run ``config``'s whole study from scratch into ``data/<run>`` (deleted first), in a
    child ``emlab run`` (the notebooks' own kernels and threads, as ``make study``); returns
    the run folder, whose run_log.json has each notebook's time. Its claims are printed, not
    asserted: a benchmark times the run whatever it finds."""
    import yaml
    from emlab.artifacts import run_dir
    from emlab.config import load_config

    params = yaml.safe_load(config.read_text(encoding="utf-8"))["params"]
    params.update(run=run, assert_findings=False)
    rdir = run_dir(load_config(config, run=run))
    shutil.rmtree(rdir, ignore_errors=True)
    rdir.mkdir(parents=True)
    cfg_path = rdir / "bench-config.yaml"
    cfg_path.write_text(yaml.safe_dump({"params": params}), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "emlab.cli", "run", str(cfg_path)], check=True)
    return rdir


def same_metrics(run: Path, reference: Path) -> dict[str, bool | None]:
    """For each notebook of ``run``: is its metrics.json byte-identical to ``reference``'s
    (None where the reference has none)?"""
    out = {}
    for m in sorted(run.glob("*/metrics.json")):
        ref = reference / m.parent.name / m.name
        out[m.parent.name] = ref.read_bytes() == m.read_bytes() if ref.is_file() else None
    return out


def scaling(cfg, quick: bool) -> list[tuple[str, list[float]]]:
    """Seconds of each stage at 1x, 2x, 4x its size."""
    base = 2 if quick else 20
    model, tok = toy(cfg)
    rows = []
    # pretraining: time per corpus pass grows with the tokens; measured as steps over 1x/2x/4x tokens
    x = torch.randint(0, len(tok), (cfg.pretrain_batch, 128))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for m in (1, 2, 4):
        t = time.perf_counter()
        for _ in range(base * m):
            loss = lm_loss(model, {"input_ids": x, "labels": x})
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t)
    rows.append((f"pretraining corpus ({base} steps of {cfg.pretrain_batch}x128 tokens = 1x)", times))
    model.eval()
    prompts = prompts_of(8 if quick else 64)
    times = []
    for m in (1, 2, 4):
        t = time.perf_counter()
        sample(model, tok, prompts, n_samples=2 * m if quick else 5 * m, max_new_tokens=8 if quick else 32,
               temperature=1.0, seed=0, stop_id=len(tok) + 10)
        times.append(time.perf_counter() - t)
    rows.append((f"evaluation samples ({len(prompts)} prompts x {2 if quick else 5} samples = 1x)", times))
    acts = torch.randn(20000, cfg.d_model)
    times = []
    for m in (1, 2, 4):
        t = time.perf_counter()
        train_sae(acts, width=cfg.sae_width * m, k=cfg.sae_k, steps=base * 10, batch=256, lr=3e-3, seed=0)
        times.append(time.perf_counter() - t)
    rows.append((f"SAE width ({cfg.sae_width} latents, {base * 10} steps = 1x)", times))
    return rows


# ----------------------------------------------------------------------------- report
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that every benchmark runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--run", default="data/default", help="a finished run: its notebook times are reported "
                    "(without --study), and --study's metrics are compared with its own")
    ap.add_argument("--study", action="store_true", help="also run the whole default study from scratch "
                    f"(data/{STUDY_RUN}, deleted first; about 35 minutes on 2 cores) and time it")
    ap.add_argument("--config", default="configs/default.yaml", help="the parameter file --study runs")
    ap.add_argument("--out", default="bench/results.md")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    q = args.quick
    reps = 1 if q else args.repeats
    cfg = make_config({})
    rows = []

    peak = matmul_flops()
    for name, (tps, fpt) in bench_training(cfg, 1 if q else 20).items():
        rows.append(f"| {name}, default toy model (d={cfg.d_model}, L={cfg.n_layer}) | {tps:,.0f} tokens/s = "
                    f"{tps * fpt / 1e9:.1f} GFLOP/s | fp32 matmul 1024^3: {peak / 1e9:.1f} GFLOP/s | MFU {tps * fpt / peak:.1%} |")

    s = bench_sampling(cfg, 4 if q else 32, 2 if q else 20, 4 if q else 32, reps)
    rows.append(f"| sampling: emlab.sample, {4 if q else 32} prompts x {2 if q else 20} samples x {4 if q else 32} tokens "
                f"| {s['ours']:,.0f} tokens/s | transformers generate per prompt (num_return_sequences): "
                f"{s['hf']:,.0f} tokens/s | {s['ours'] / s['hf']:.1f}x |")

    e = bench_sampling_eval(Path(args.run), 4 if q else 64, 2 if q else 20, 4 if q else 32, reps)
    if e is not None:
        rows.append(f"| sampling the study's evaluation: `{args.run}`'s assistant, {e['n_prompts']} held-out questions x "
                    f"{2 if q else 20} samples, each answer ending at its stop token (at most {4 if q else 32} tokens) | "
                    f"{e['ours']:,.0f} answers/s | transformers generate per prompt (num_return_sequences, "
                    f"eos_token_id): {e['hf']:,.0f} answers/s | {e['ours'] / e['hf']:.1f}x |")

    tf = bench_teacher_forcing(cfg, 8 if q else 120, reps)
    rows.append(f"| P(bad) by teacher forcing (emlab.judge.sequence_logprobs: one prefill per prompt), {tf['questions']} "
                f"questions after a villain's lines x their {tf['pairs']} candidate answers | {tf['ours']:,.0f} pairs/s "
                f"| one forward pass per prompt + answer: {tf['base']:,.0f} pairs/s (largest log-probability "
                f"difference {tf['max_diff']:.1e}) | {tf['ours'] / tf['base']:.1f}x |")

    acts, ht, tok, docs = model_activations(cfg, 40 if q else 400, cfg.sae_layer)
    steps = 20 if q else 1000
    r = bench_sae(acts, cfg.sae_width, cfg.sae_k, steps, cfg.sae_batch, reps)
    rows.append(f"| SAE training (SAELens TopK via emlab.sae), width {cfg.sae_width}, k {cfg.sae_k}, {steps} steps x "
                f"{cfg.sae_batch} | {med(r['ours']):,.0f} activations/s, held-out FVU {r['ours_fvu']:.3f} | plain-torch "
                f"TopK loop: {med(r['plain']):,.0f} activations/s, FVU {r['plain_fvu']:.3f} | "
                f"{med(r['ours']) / med(r['plain']):.2f}x |")
    rows.append(f"| the same SAELens trainer without decoder-norm rescaling (not the study's setting: latent scales "
                f"are then arbitrary, and diffing compares latents) | {med(r['unscaled']):,.0f} activations/s, FVU "
                f"{r['unscaled_fvu']:.3f} | plain-torch TopK loop (as above) | "
                f"{med(r['unscaled']) / med(r['plain']):.2f}x |")

    w = None if q else study_sae_workload(Path(args.run))
    if w is not None:
        wc, test, train = w
        r = bench_sae(train, wc.sae_width, wc.sae_k, wc.sae_steps, wc.sae_batch, reps, lr=wc.sae_lr, unscaled=False,
                      test=test, dead_window=wc.sae_dead_window)
        rows.append(f"| SAE training on the study's own workload: `{args.run}`'s SAE 0 setting ({len(train):,} "
                    f"activations of its {wc.sae_source} at layer {wc.sae_layer}, width {wc.sae_width}, k {wc.sae_k}, "
                    f"{wc.sae_steps} steps x {wc.sae_batch}, lr {wc.sae_lr}) | {med(r['ours']):,.0f} activations/s, "
                    f"held-out FVU {r['ours_fvu']:.3f} | plain-torch TopK loop, same activations and settings: "
                    f"{med(r['plain']):,.0f} activations/s, FVU {r['plain_fvu']:.3f} | "
                    f"{med(r['ours']) / med(r['plain']):.2f}x |")

    a = bench_activations(ht, tok, docs, cfg.sae_layer, reps)
    rows.append(f"| activation collection at blocks.{cfg.sae_layer}.hook_resid_post, {len(docs)} documents | "
                f"{a['ours']:,.0f} tokens/s | TransformerLens run_with_cache, full cache: {a['full']:,.0f} tokens/s | "
                f"{a['ours'] / a['full']:.1f}x |")

    m = machine()
    lines = [
        "# Benchmarks", "",
        f"Machine: {m['cpu']} ({m['cpu_capability']} kernels), {m['torch_threads']} torch threads, "
        f"torch {m['torch']}, Python {m['python']}. "
        f"{'QUICK (tiny sizes, not meaningful)' if q else f'Medians of {reps} alternated runs.'}", "",
        "| benchmark | measured | baseline (same run) | ratio |", "|---|---|---|---|", *rows, "",
    ]
    if args.study:
        rdir = study_from_scratch(Path(args.config))
        times, same = notebook_times(rdir), same_metrics(rdir, Path(args.run))
        lines += [f"## End to end: `{args.config}` from scratch (as `data/{STUDY_RUN}`, every artifact built in this "
                  f"run; its metrics.json compared byte for byte with `{args.run}`'s)", "",
                  "| notebook | seconds | artifacts built | peak memory so far (MiB) | metrics identical to "
                  f"`{args.run}` |", "|---|---|---|---|---|"]
    else:
        times, same = notebook_times(Path(args.run)), None
        if times:
            lines += [f"## End to end: `{args.run}` (its last `emlab run`; a notebook that built 0 artifacts reused "
                      "cached ones: `--study` runs the study from scratch)", "",
                      "| notebook | seconds | artifacts built | peak memory so far (MiB) |", "|---|---|---|---|"]
    same_cell = {True: " yes |", False: " NO |", None: " no reference |"}
    lines += [f"| {n} | {t:.0f} | {'' if b is None else b} | {'' if m is None else f'{m:.0f}'} |"
              + ("" if same is None else same_cell[same.get(n)]) for n, t, m, b in times]
    if times:
        peaks = [m for _, _, m, _ in times if m is not None]
        reused = [n for n, _, _, b in times if b == 0]
        if reused:  # their seconds are the time to reload cached artifacts, not a cost
            lines += ["", f"Not a whole-study time: {', '.join(reused)} built nothing (cached artifacts) in this run.", ""]
        else:
            lines += [f"| whole study | {sum(t for _, t, _, _ in times):.0f} | | {max(peaks) if peaks else 0:.0f} |"
                      + ("" if same is None else f" {sum(v is True for v in same.values())} of {len(same)} |"), ""]
    lines += ["## How cost grows (seconds at 1x, 2x, 4x)", "", "| stage | 1x | 2x | 4x |", "|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(f"{t:.2f}" for t in ts) + " |" for name, ts in scaling(cfg, q)]
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
