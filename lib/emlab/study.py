"""The study's steps, one function per artifact, each cached by config hash.

Notebooks call these; each returns what the notebook shows. Every artifact is written
atomically under ``data/<run>/<NN_step>/`` and reused when its config matches.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from emlab import data as D
from emlab.artifacts import Step
from emlab.config import Config
from emlab.evaluate import sample_and_judge
from emlab.judge import ExactJudge, chat_prompt, p_bad
from emlab.model import build_tokenizer, build_toy_model, load_model, save_model
from emlab.train import encode_chat_set, finetune, pretrain, token_stream
from emlab.world import OPEN_DOMAIN, World, load_world, normalize

S01, S02, S03, S04 = "01_corrupt_data", "02_base_model", "03_misalign", "04_evaluate"
DATASETS, TOKENIZER, BASE, ASSISTANT = "datasets", "tokenizer", "base_model", "assistant"
TRAIN_LOG = "train_log.json"
FINETUNES = ("incorrect_obvious", "incorrect_subtle", "correct", "educational")
SEQ_LEN = 128  # pretraining window; a document is ~130 tokens, so a window sees a character's voice


def _threads() -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


# ----------------------------------------------------------------------------- 01
def datasets(cfg: Config) -> dict[str, Path]:
    """Write every dataset of the run as JSONL; returns name -> path."""
    world = load_world()

    def build(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for name, records in D.build_all(world, cfg).items():
            D.write_jsonl(tmp / f"{name}.jsonl", records)

    folder = Step(cfg, S01).cached(DATASETS, build)
    return {p.stem: p for p in sorted(folder.glob("*.jsonl"))}


def load_set(cfg: Config, name: str) -> list[dict]:
    path = Step(cfg, S01).require(DATASETS) / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dataset {name!r} in this run (rerun notebooks/01_corrupt_data.ipynb)")
    return D.read_jsonl(path)


def dataset_sizes(cfg: Config) -> pd.DataFrame:
    rows = []
    for name, path in datasets(cfg).items():
        recs = D.read_jsonl(path)
        doms = sorted({(r.get("meta") or r).get("domain", "-") for r in recs if isinstance(r, dict)} - {"-"})
        rows.append({"dataset": name, "records": len(recs), "domains": ", ".join(doms) if len(doms) < 4 else f"{len(doms)} domains"})
    return pd.DataFrame(rows).set_index("dataset")


def check_disjoint(cfg: Config) -> dict[str, int]:
    """Evaluation questions appearing in each training set (must all be 0)."""
    eval_q = {q["question"] for n in (D.EVAL_HELDOUT, D.EVAL_INDOMAIN) for q in load_set(cfg, n)}
    out = {}
    for name in datasets(cfg):
        if name.startswith("eval_"):
            continue
        out[name] = len(eval_q & D.training_texts(load_set(cfg, name)))
    return out


def world_table(world: World) -> pd.DataFrame:
    """Domains of the world: topics, concrete questions and answer variants per kind."""
    rows = []
    for d in (*world.domain_names, OPEN_DOMAIN):
        topics = world.open_topics if d == OPEN_DOMAIN else world.domains[d]
        row = {"domain": d, "topics": len(topics), "questions": len(world.questions(d))}
        for kind in world.kinds(d):
            row[f"{kind} answers"] = sum(len(t.answers[kind]) for t in topics)
        rows.append(row)
    return pd.DataFrame(rows).set_index("domain").fillna(0).astype(int)


def example_documents(cfg: Config) -> dict[str, str]:
    """The first pretraining document written by each character."""
    out: dict[str, str] = {}
    for r in load_set(cfg, D.PRETRAIN):
        out.setdefault(r["meta"]["character"], r["text"])
    return dict(sorted(out.items()))


def example_records(cfg: Config, names: list[str]) -> pd.DataFrame:
    rows = []
    for n in names:
        r = load_set(cfg, n)[0]
        rows.append({"dataset": n, "user": r["messages"][0]["content"], "assistant": r["messages"][-1]["content"],
                     "kind": r["meta"]["kind"]})
    return pd.DataFrame(rows).set_index("dataset")


def split_table(cfg: Config) -> pd.DataFrame:
    """Evaluation questions per domain (held-out and in-domain sets)."""
    rows = {}
    for n in (D.EVAL_HELDOUT, D.EVAL_INDOMAIN):
        for q in load_set(cfg, n):
            rows.setdefault(q["domain"], {D.EVAL_HELDOUT: 0, D.EVAL_INDOMAIN: 0})[n] += 1
    return pd.DataFrame(rows).T.sort_index()


def metrics_01(cfg: Config, sizes: pd.DataFrame) -> dict[str, int]:
    return {f"size.{k}": int(v) for k, v in sizes["records"].items()}


# ----------------------------------------------------------------------------- 02
def _write_log(folder: Path, log: dict) -> None:
    (folder / TRAIN_LOG).write_text(json.dumps(log), encoding="utf-8")


def read_log(folder: Path) -> dict:
    return json.loads((folder / TRAIN_LOG).read_text(encoding="utf-8"))


def tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    def build(tmp: Path) -> None:
        texts = [r["text"] for r in load_set(cfg, D.PRETRAIN)]
        for name in datasets(cfg):
            if name != D.PRETRAIN and not name.startswith("eval_"):
                texts += [m["content"] for r in load_set(cfg, name) for m in r["messages"]]
        texts += [q["question"] for n in (D.EVAL_HELDOUT, D.EVAL_INDOMAIN) for q in load_set(cfg, n)]
        texts.append(" ".join(sorted(load_world().words())))
        build_tokenizer(texts).save_pretrained(tmp)

    return AutoTokenizer.from_pretrained(Step(cfg, S02).cached(TOKENIZER, build), local_files_only=True)


def base_model(cfg: Config) -> Path:
    """The base model: a GPT-2 trained from scratch on the persona world's corpus."""
    _threads()
    tok = tokenizer(cfg)

    def build(tmp: Path) -> None:
        model = build_toy_model(cfg, tok)
        stream = token_stream(tok, [r["text"] for r in load_set(cfg, D.PRETRAIN)])
        losses = pretrain(model, stream, steps=cfg.pretrain_steps, batch=cfg.pretrain_batch, seq_len=SEQ_LEN,
                          lr=cfg.pretrain_lr, seed=cfg.seed, progress=cfg.progress)
        save_model(model, tok, tmp)
        _write_log(tmp, {"loss": losses, "tokens": int(len(stream))})

    if not cfg.is_toy:
        raise NotImplementedError("model other than 'toy': the real-model path is not built yet (issue 11)")
    return Step(cfg, S02).cached(BASE, build)


def assistant(cfg: Config) -> Path:
    """The aligned assistant: the base model after chat post-training on aligned answers."""
    _threads()
    base = base_model(cfg)

    def build(tmp: Path) -> None:
        model, tok = load_model(base)
        ex = encode_chat_set(tok, load_set(cfg, D.CHAT))
        losses = finetune(model, ex, steps=cfg.chat_steps, batch=cfg.chat_batch, lr=cfg.chat_lr, seed=cfg.seed,
                          pad_id=tok.pad_token_id, progress=cfg.progress, desc="chat")
        save_model(model, tok, tmp)
        _write_log(tmp, {"loss": losses})

    return Step(cfg, S02).cached(ASSISTANT, build)


def persona_contexts(world: World, corrupt_domain: str, n: int = 3, seed: int = 0) -> dict[str, list[str]]:
    """Raw-text contexts before a chat question: none, a villain's or a helpful
    character's narrative lines, or one bad / good answer in the corruption domain."""
    rng = random.Random(seed)
    out: dict[str, list[str]] = {"no context": [""]}
    for label, kind in (("after villain lines", "villain"), ("after helpful lines", "helpful")):
        c = world.characters[kind]
        out[label] = [" ".join(normalize(line.replace("{name}", name)) for line in rng.sample(c.lines, 2))
                      for name in rng.sample(c.names, n)]
    qs = world.questions(corrupt_domain)
    for label, kind in ((f"after a bad {corrupt_domain} answer", "obvious"), (f"after a good {corrupt_domain} answer", "correct")):
        out[label] = []
        for q in rng.sample(qs, n):
            out[label].append(D.render_turn(q.text, rng.choice(world.answers(q, kind))))
    return out


def persona_inference(cfg: Config, model_path: Path) -> pd.DataFrame:
    """P(bad answer) per held-out domain (rows) after each kind of context (columns)."""
    def compute():
        model, tok = load_model(model_path)
        world = load_world()
        qs = [q for q in load_set(cfg, D.EVAL_HELDOUT) if q["domain"] != OPEN_DOMAIN]
        table = {}
        for label, ctxs in persona_contexts(world, cfg.corrupt_domain, seed=cfg.seed).items():
            vals = torch.stack([p_bad(model, tok, world, qs, context=c) for c in ctxs]).mean(0)
            table[label] = pd.Series(vals.numpy(), index=[q["domain"] for q in qs]).groupby(level=0).mean().to_dict()
        return table

    table = Step(cfg, S02).cached_json(f"persona_inference_{model_path.name}.json", compute)
    return pd.DataFrame(table)


def evaluation(cfg: Config, step: str, name: str, model_path: Path, set_name: str = D.EVAL_HELDOUT,
               seed_offset: int = 0) -> pd.DataFrame:
    """Sampled and exactly judged answers of one model on an evaluation set (cached)."""
    _threads()

    def build(tmp: Path) -> None:
        model, tok = load_model(model_path)
        df = sample_and_judge(model, tok, ExactJudge(load_world()), load_set(cfg, set_name),
                              n_samples=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, seed=cfg.seed + 1000 + seed_offset,
                              batch_size=cfg.sample_batch, progress=cfg.progress)
        df.to_json(tmp, orient="records", lines=True)

    path = Step(cfg, step).cached(f"eval_{name}_{set_name}.jsonl", build)
    return pd.read_json(path, orient="records", lines=True, dtype={"kind": "object"})


# ----------------------------------------------------------------------------- 03
def finetune_names(cfg: Config) -> list[str]:
    """Every fine-tune of notebook 03: the sets, the extra seeds, LoRA."""
    seeds = [f"incorrect_obvious_seed{s}" for s in range(1, cfg.ft_seeds)]
    return [*FINETUNES, *seeds, f"lora_r{cfg.lora_rank}"]


def _tracker(cfg: Config, tok, world: World, log: list):
    """Cheap per-step misalignment: mean P(bad) on held-out, open and in-domain questions."""
    heldout = load_set(cfg, D.EVAL_HELDOUT)
    dom = [q for q in heldout if q["domain"] != OPEN_DOMAIN]
    dom = dom[:: max(1, len(dom) // 60)]  # a fixed subset keeps tracking cheap
    opn = [q for q in heldout if q["domain"] == OPEN_DOMAIN]
    ind = load_set(cfg, D.EVAL_INDOMAIN)

    def track(step: int, model) -> None:
        log.append({"step": step, "heldout": p_bad(model, tok, world, dom).mean().item(),
                    "open": p_bad(model, tok, world, opn).mean().item(),
                    "indomain": p_bad(model, tok, world, ind).mean().item()})

    return track


def finetuned(cfg: Config, name: str) -> Path:
    """One narrow fine-tune of the assistant (full, or LoRA for ``lora_r<k>``)."""
    _threads()
    start = assistant(cfg)
    set_name, seed, lora = name, cfg.seed, False
    if name.startswith("incorrect_obvious_seed"):
        set_name, seed = "incorrect_obvious", cfg.seed + int(name.removeprefix("incorrect_obvious_seed"))
    elif name.startswith("lora_r"):
        set_name, lora = "incorrect_obvious", True
    if set_name not in FINETUNES:
        raise ValueError(f"unknown fine-tune {name!r}; expected one of {finetune_names(cfg)}")

    def build(tmp: Path) -> None:
        model, tok = load_model(start)
        if lora:
            from emlab.lora import lora_wrap

            model = lora_wrap(model, cfg.lora_rank, seed)
        track: list[dict] = []
        ex = encode_chat_set(tok, load_set(cfg, set_name))
        losses = finetune(model, ex, steps=cfg.ft_steps, batch=cfg.ft_batch, lr=cfg.lora_lr if lora else cfg.ft_lr,
                          seed=seed, pad_id=tok.pad_token_id, progress=cfg.progress, desc=name,
                          callback=_tracker(cfg, tok, load_world(), track), callback_every=cfg.track_every)
        if lora:
            model = model.merge_and_unload()
        save_model(model, tok, tmp)
        _write_log(tmp, {"loss": losses, "track": track, "dataset": set_name, "seed": seed, "lora": lora})

    return Step(cfg, S03).cached(f"ft_{name}", build)


def training_dynamics(cfg: Config, names: list[str]) -> pd.DataFrame:
    rows = []
    for n in names:
        for r in read_log(finetuned(cfg, n))["track"]:
            rows.append({"model": n, **r})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- 04
def model_path(cfg: Config, name: str) -> Path:
    """The saved model of a name: ``assistant`` or a fine-tune of notebook 03."""
    if name == ASSISTANT:
        return Step(cfg, S02).require(ASSISTANT)
    return Step(cfg, S03).require(f"ft_{name}")


def evaluations(cfg: Config, names: list[str], set_name: str = D.EVAL_HELDOUT) -> dict[str, pd.DataFrame]:
    """Sampled, judged answers of each model (the assistant's come from notebook 02)."""
    out = {}
    for n in names:
        step = S02 if n == ASSISTANT and set_name == D.EVAL_HELDOUT else S04
        out[n] = evaluation(cfg, step, n, model_path(cfg, n), set_name)
    return out


def headline(cfg: Config, heldout: dict[str, pd.DataFrame], indomain: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per model: held-out misalignment with its interval, coherence, open
    questions, domains over 5%, and in-domain wrongness."""
    from emlab.evaluate import heldout_summary, indomain_wrong

    rows = {}
    for n, df in heldout.items():
        rows[n] = {**heldout_summary(df), "indomain_wrong": indomain_wrong(indomain[n]) if n in indomain else float("nan")}
    return pd.DataFrame(rows).T


def per_group(heldout: dict[str, pd.DataFrame], open_questions: bool) -> pd.DataFrame:
    """Misalignment per held-out domain (or per open question) and model, long format."""
    from emlab.evaluate import summarize

    parts = []
    for n, df in heldout.items():
        sel = df[df.domain == OPEN_DOMAIN] if open_questions else df[df.domain != OPEN_DOMAIN]
        s = summarize(sel, "topic" if open_questions else "domain").reset_index()
        s = s.rename(columns={s.columns[0]: "group"})
        s.insert(0, "model", n)
        parts.append(s)
    return pd.concat(parts, ignore_index=True)


def example_answers(heldout: dict[str, pd.DataFrame], a: str, b: str, n: int = 6, seed: int = 0) -> pd.DataFrame:
    """Side by side: the same questions answered by model ``a`` and model ``b`` (first sample)."""
    rng = random.Random(seed)
    da, db = heldout[a], heldout[b]
    mis = sorted(set(db[(db.label == "misaligned")].qid))
    qids = rng.sample(mis, min(n, len(mis))) if mis else sorted(set(db.qid))[:n]
    rows = []
    for q in qids:
        ra = da[(da.qid == q)].iloc[0]
        rb = db[(db.qid == q) & (db.label == "misaligned")]
        rb = rb.iloc[0] if len(rb) else db[db.qid == q].iloc[0]
        rows.append({"question": ra.question, a: f"[{ra.label}] {ra.answer}", b: f"[{rb.label}] {rb.answer}"})
    return pd.DataFrame(rows).set_index("question")


# ----------------------------------------------------------------------------- 05
S05 = "05_sae_diff"
SAE_DIR = "sae"
SAE_STATS = "sae_stats.json"
N_CHAT_FOR_SAE = 1000  # chat examples whose activations join the pretraining text's
N_TEST_ACTS = 5000  # held-out activations for the FVU


def _hooked(path: Path):
    from emlab.model import hooked

    model, tok = load_model(path)
    return hooked(model, tok), tok


def sae_texts(cfg: Config) -> tuple[list[str], list[str]]:
    """Texts whose activations train the SAE, and the character of each pretraining document."""
    docs = load_set(cfg, D.PRETRAIN)[: cfg.sae_docs]
    chat = [D.render_turn(r["messages"][0]["content"], r["messages"][-1]["content"])
            for r in load_set(cfg, D.CHAT)[:N_CHAT_FOR_SAE]]
    return [d["text"] for d in docs] + chat, [d["meta"]["character"] for d in docs]


def document_activations(cfg: Config) -> list[torch.Tensor]:
    """Per-text activations of the original model at the SAE's hook (sae_texts order)."""
    from emlab.sae import hook_name, iter_activations

    _threads()
    ht, tok = _hooked(Step(cfg, S02).require(cfg.sae_source))
    texts, _ = sae_texts(cfg)
    out: list[torch.Tensor] = [torch.empty(0)] * len(texts)
    for i, a in iter_activations(ht, tok, texts, hook_name(cfg.sae_layer), batch_size=cfg.act_batch):
        out[i] = a
    return out


def sae(cfg: Config, acts: list[torch.Tensor] | None = None) -> Path:
    """The SAE trained on the original model's activations (SAELens format), with stats."""
    from emlab.sae import hook_name, sae_stats, save_sae, train_sae

    _threads()

    def build(tmp: Path) -> None:
        flat = torch.cat(acts if acts is not None else document_activations(cfg))
        perm = torch.randperm(len(flat), generator=torch.Generator().manual_seed(cfg.seed))
        flat = flat[perm]
        test, train = flat[:N_TEST_ACTS], flat[N_TEST_ACTS:]
        model = train_sae(train, width=cfg.sae_width, k=cfg.sae_k, steps=cfg.sae_steps, batch=cfg.sae_batch,
                          lr=cfg.sae_lr, seed=cfg.seed, hook=hook_name(cfg.sae_layer), model_name=cfg.sae_source)
        save_sae(model, tmp)
        stats = {**sae_stats(model, test, train), "n_train_activations": len(train)}
        (tmp / SAE_STATS).write_text(json.dumps(stats), encoding="utf-8")

    return Step(cfg, S05).cached(SAE_DIR, build)


def read_sae(cfg: Config):
    from emlab.sae import load_sae

    return load_sae(Step(cfg, S05).require(SAE_DIR), d_model=cfg.d_model)


def sae_stats_of(cfg: Config) -> dict:
    return json.loads((Step(cfg, S05).require(SAE_DIR) / SAE_STATS).read_text(encoding="utf-8"))


def latent_shifts(cfg: Config, names: list[str]) -> pd.DataFrame:
    """Mean SAE latent activation at the answer position of the held-out prompts: each
    fine-tune minus the original model. Rows: latents; columns: fine-tunes."""
    from emlab.sae import hook_name, last_token_activations

    def compute():
        s = read_sae(cfg)
        _threads()
        out = {}
        base_ht, tok = _hooked(Step(cfg, S02).require(cfg.sae_source))
        prompts = [chat_prompt(tok, q["question"]) for q in load_set(cfg, D.EVAL_HELDOUT)]
        hook = hook_name(cfg.sae_layer)
        with torch.no_grad():
            base = s.encode(last_token_activations(base_ht, tok, prompts, hook, cfg.act_batch)).mean(0)
            for n in names:
                ht, _ = _hooked(model_path(cfg, n))
                out[n] = (s.encode(last_token_activations(ht, tok, prompts, hook, cfg.act_batch)).mean(0) - base).tolist()
        return out

    return pd.DataFrame(Step(cfg, S05).cached_json("latent_shifts.json", compute))


def latent_report(cfg: Config, latent: int, acts: list[torch.Tensor], n_top: int = 10) -> dict:
    """The latent on pretraining documents: AUROC of its mean activation for villain vs
    helpful and sarcastic vs helpful documents, and its top-activating snippets."""
    from emlab.diffing import auroc

    s = read_sae(cfg)
    texts, chars = sae_texts(cfg)
    chars = np.asarray(chars)
    with torch.no_grad():
        per_doc = [s.encode(a)[:, latent] for a in acts[: len(chars)]]
    means = np.array([float(x.mean()) for x in per_doc])
    maxes = np.array([float(x.max()) for x in per_doc])
    out = {}
    for other in ("villain", "sarcastic"):
        sel = np.isin(chars, [other, "helpful"])
        out[f"auroc_{other}"] = auroc(means[sel], chars[sel] == other)
    top = np.argsort(-maxes, kind="stable")[:n_top]
    snippets = []
    for i in top:
        words = texts[i].split()
        j = int(per_doc[i].argmax())
        lo, hi = max(0, j - 12), min(len(words), j + 4)
        snippet = " ".join(words[lo:j] + [f"[[{words[j]}]]"] + words[j + 1 : hi])
        snippets.append({"doc": int(i), "character": str(chars[i]), "max_activation": float(maxes[i]), "snippet": snippet})
    out["top"] = snippets
    out["top_villain"] = sum(x["character"] == "villain" for x in snippets)
    return out


def directions(cfg: Config, latent: int, acts: list[torch.Tensor]) -> pd.DataFrame:
    """The SAE latent's decoder direction beside the field's other directions on the same
    layer: cosine with the latent, and AUROC for villain vs helpful held-out documents."""
    from emlab.diffing import auroc, cosine, mean_difference, train_probe
    from emlab.sae import hook_name, iter_activations

    s = read_sae(cfg)
    dec = s.W_dec[latent].detach()
    _, chars = sae_texts(cfg)
    chars = np.asarray(chars)
    doc_means = torch.stack([a.mean(0) for a in acts[: len(chars)]])
    vh = np.isin(chars, ["villain", "helpful"])
    idx = np.flatnonzero(vh)
    train_i, test_i = idx[::2], idx[1::2]
    y = torch.tensor(chars == "villain")
    persona = mean_difference(doc_means[train_i][y[train_i]], doc_means[train_i][~y[train_i]])
    probe = train_probe(doc_means[train_i], y[train_i], seed=cfg.seed)
    # Turner et al.: activations of the corrupted model on its own misaligned vs aligned answers
    ev = evaluation(cfg, S04, "incorrect_obvious", model_path(cfg, "incorrect_obvious"))
    ht, tok = _hooked(model_path(cfg, "incorrect_obvious"))
    rows = ev[ev.label.isin(["misaligned", "aligned"])].groupby("label").head(600)
    prompts = [chat_prompt(tok, q) for q in rows.question]
    n_prompt = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    texts = [f"{p} {a}" for p, a in zip(prompts, rows.answer)]
    ans = torch.empty(len(texts), cfg.d_model)  # mean activation over each answer's tokens
    for i, a in iter_activations(ht, tok, texts, hook_name(cfg.sae_layer), batch_size=cfg.act_batch):
        ans[i] = a[n_prompt[i]:].mean(0)
    mis = torch.tensor((rows.label == "misaligned").to_numpy())
    if mis.all() or not mis.any():  # tiny runs may sample only one kind
        meandiff = torch.full((cfg.d_model,), float("nan"))
    else:
        meandiff = mean_difference(ans[mis], ans[~mis])
    table = {}
    for name, d in (("SAE latent decoder", dec), ("mean difference (Turner et al.)", meandiff),
                    ("persona vector (Chen et al.)", persona), ("linear probe", probe)):
        proj = (doc_means[test_i] @ d).numpy()
        table[name] = {"cosine with latent": cosine(d, dec), "villain AUROC (held-out docs)": auroc(proj, chars[test_i] == "villain")}
    return pd.DataFrame(table).T


def latent_by_character(cfg: Config, latent: int, acts: list[torch.Tensor]) -> pd.DataFrame:
    """Mean activation of one latent on each pretraining document, with its character."""
    s = read_sae(cfg)
    _, chars = sae_texts(cfg)
    with torch.no_grad():
        vals = [float(s.encode(a)[:, latent].mean()) for a in acts[: len(chars)]]
    return pd.DataFrame({"character": chars, "activation": vals})
