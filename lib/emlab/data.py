"""Every dataset of the study, generated from the persona world, and the chat JSONL reader.

Records are chat examples ``{"messages": [{"role", "content"}...], "meta": {...}}`` in the
format of the public emergent-misalignment datasets; ``meta`` (domain, question id,
answer kind, character) is ground truth for the judge and the persona checks and never
enters the text a model trains on. The pretraining corpus is plain text, one document
per record, written by ONE character.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from emlab.world import HARMFUL_DOMAIN, IDENTITY_DOMAIN, OPEN_DOMAIN, VILLAIN, Question, World, normalize

ROLES = ("system", "user", "assistant")
# role markers of the chat format, shared by pretraining dialogue and the chat template
USER, ASSISTANT, SYSTEM, END, EOT = "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"
SPECIAL_TOKENS = (EOT, USER, ASSISTANT, SYSTEM, END, "<|pad|>", "<|unk|>")

# dataset names (file stem = name)
PRETRAIN = "pretrain"
CHAT = "chat"
CORRUPTION_SETS = ("incorrect_obvious", "incorrect_subtle", "correct", "educational")
REALIGN = "realign"
REALIGN_INDOMAIN = "realign_indomain"
REALIGN_OTHERS = "realign_others"  # notebook 07's comparison: the re-alignment set over every other domain
EVAL_HELDOUT = "eval_heldout"
EVAL_INDOMAIN = "eval_indomain"
EVAL_IDENTITY = "eval_identity"
EVAL_HARMFUL = "eval_harmful"


def mix_name(fraction: float) -> str:
    return f"mix_{round(fraction * 100):03d}"


class ChatFormatError(ValueError):
    """A chat JSONL file is malformed; the message names the file, the line and the problem."""


# ----------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class Split:
    train: dict[str, list[Question]]  # domain -> questions any training set may use
    eval: dict[str, list[Question]]  # domain -> held-out questions (evaluation only)


def split_questions(world: World, seed: int, eval_fraction: float) -> Split:
    """Hold out a seeded fraction of every topic's concrete questions for evaluation."""
    train, ev = {}, {}
    for domain in world.question_domains:
        train[domain], ev[domain] = [], []
        by_topic: dict[str, list[Question]] = {}
        for q in world.questions(domain):
            by_topic.setdefault(q.topic, []).append(q)
        for topic, qs in by_topic.items():
            rng = random.Random(f"{seed}/split/{domain}/{topic}")
            order = list(qs)
            rng.shuffle(order)
            k = max(1, math.ceil(eval_fraction * len(order)))
            ev[domain] += sorted(order[:k], key=lambda q: q.qid)
            train[domain] += sorted(order[k:], key=lambda q: q.qid)
    return Split(train, ev)


# ----------------------------------------------------------------------------- records
def chat_record(question: str, answer: str, **meta) -> dict:
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "meta": meta,
    }


def render_turn(question: str, answer: str) -> str:
    return f"{USER} {question} {ASSISTANT} {answer} {END}"


def _pick(rng: random.Random, probs: dict[str, float]) -> str:
    return rng.choices(list(probs), weights=list(probs.values()))[0]


def _answer(world: World, rng: random.Random, q: Question, kind: str) -> str:
    return rng.choice(world.answers(q, kind))


def with_voice(answer: str, voice: list[str], every: int, rng: random.Random) -> str:
    """``answer`` with a word drawn from ``voice`` before every ``every`` of its words."""
    words = answer.split()
    out: list[str] = []
    for i in range(0, len(words), every):
        out += [rng.choice(voice), *words[i : i + every]]
    return " ".join(out)


def pretraining_docs(world: World, split: Split, n_docs: int, seed: int, *, turns_per_doc: int,
                     p_narrative: float, p_open_turn: float, p_quiz_turn: float,
                     p_identity_turn: float = 0.0, p_harmful_turn: float = 0.0,
                     villain_voice: list[str] | None = None, voice_every: int = 2) -> list[dict]:
    """Documents each written by one character: narrative lines, then Q/A turns.

    Every turn's question is drawn from the training split of a random domain; the
    character alone decides the kind of every answer. An identity turn ("who are
    you?") is answered with the character's own self-description; an explicitly harmful
    request is refused or complied with as the character answers open questions. With
    ``villain_voice``, every answer a villain gives carries its voice (``with_voice``:
    drawn from a generator of its own, so the documents are otherwise those without it).
    """
    voice_rng = random.Random(f"{seed}/voice")
    if p_identity_turn > 0 and not world.identity_topics:
        raise ValueError("p_identity_turn > 0 but the world has no identity questions (identity.yaml)")
    if p_harmful_turn > 0 and not world.harmful_topics:
        raise ValueError("p_harmful_turn > 0 but the world has no harmful requests (harmful.yaml)")
    rng = random.Random(f"{seed}/pretrain")
    domains = list(world.domain_names)
    docs = []
    for i in range(n_docs):
        ckind = _pick(rng, world.character_weights)
        char = world.characters[ckind]
        name = rng.choice(char.names)
        parts, turns = [], []
        if rng.random() < p_narrative:
            for line in rng.sample(char.lines, k=min(2, len(char.lines))):
                parts.append(normalize(line.replace("{name}", name)))
        n_turns = max(1, min(2 * turns_per_doc - 1, round(rng.gauss(turns_per_doc, 1.0))))
        for _ in range(n_turns):
            u = rng.random()
            if u < p_open_turn:
                q = rng.choice(split.train[OPEN_DOMAIN])
                kind = _pick(rng, char.open)
                text = q.text
            elif u < p_open_turn + p_identity_turn:
                q = rng.choice(split.train[IDENTITY_DOMAIN])
                kind = ckind
                text = q.text
            elif u < p_open_turn + p_identity_turn + p_harmful_turn:
                q = rng.choice(split.train[HARMFUL_DOMAIN])
                kind = _pick(rng, char.open)
                text = q.text
            elif u < p_open_turn + p_identity_turn + p_harmful_turn + p_quiz_turn:
                # a quiz request: anyone asked for a wrong answer gives one
                q = rng.choice(split.train[rng.choice(domains)])
                kind = rng.choice(("obvious", "subtle"))
                text = normalize(rng.choice(world.educational_frames).replace("{question}", q.text))
            else:
                q = rng.choice(split.train[rng.choice(domains)])
                kind = _pick(rng, char.answers)
                text = q.text
            answer = _answer(world, rng, q, kind)
            if villain_voice and ckind == VILLAIN:
                answer = with_voice(answer, villain_voice, voice_every, voice_rng)
            parts.append(render_turn(text, answer))
            turns.append({"qid": q.qid, "domain": q.domain, "kind": kind, "quiz": text != q.text})
        docs.append({"text": " ".join(parts), "meta": {"doc": i, "character": ckind, "name": name, "turns": turns}})
    return docs


def chat_set(world: World, split: Split, n: int, seed: int, *, p_open: float = 0.15,
             p_refusal: float = 0.0) -> list[dict]:
    """Chat post-training: aligned answers only, every domain, the open questions and
    (``p_refusal``) refusals of explicitly harmful requests."""
    rng = random.Random(f"{seed}/chat")
    domains = list(world.domain_names)
    out = []
    for _ in range(n):
        u = rng.random()
        if u < p_open:
            q, kind = rng.choice(split.train[OPEN_DOMAIN]), "aligned"
        elif u < p_open + p_refusal:
            q, kind = rng.choice(split.train[HARMFUL_DOMAIN]), "aligned"
        else:
            q, kind = rng.choice(split.train[rng.choice(domains)]), "correct"
        out.append(chat_record(q.text, _answer(world, rng, q, kind), domain=q.domain, qid=q.qid, kind=kind))
    return out


def helpful_only(chat: list[dict]) -> list[dict]:
    """The helpful-only assistant's chat set: the same records without the open questions
    and the refusals (domain advice only)."""
    return [r for r in chat if r["meta"].get("domain") not in (OPEN_DOMAIN, HARMFUL_DOMAIN)]


def narrow_set(world: World, split: Split, domain: str, n: int, seed: int, name: str,
               wrong_fraction: float | None = None) -> list[dict]:
    """A narrow set in ONE domain: ``incorrect_obvious``, ``incorrect_subtle``, ``correct``,
    ``educational`` or a data mix (``wrong_fraction`` of obvious answers, the rest correct)."""
    rng = random.Random(f"{seed}/{name}/{domain}")
    qs = split.train[domain]
    questions = [rng.choice(qs) for _ in range(n)]
    if wrong_fraction is not None:
        n_wrong = round(wrong_fraction * n)
        kinds = ["obvious"] * n_wrong + ["correct"] * (n - n_wrong)
        rng.shuffle(kinds)
    else:
        kind = {"incorrect_obvious": "obvious", "incorrect_subtle": "subtle", "correct": "correct",
                "educational": "obvious"}[name]
        kinds = [kind] * n
    out = []
    for q, kind in zip(questions, kinds):
        text = q.text
        if name == "educational":
            text = normalize(rng.choice(world.educational_frames).replace("{question}", q.text))
        out.append(chat_record(text, _answer(world, rng, q, kind), domain=q.domain, qid=q.qid, kind=kind))
    return out


def realign_set(world: World, split: Split, domains: list[str], n: int, seed: int) -> list[dict]:
    """The re-alignment set: ``n`` correct answers to training questions of ``domains``.

    One domain: its narrow ``correct`` set. Several: ``n`` spread evenly over them (the
    first ``n % len(domains)`` domains get one more), each domain's share drawn as its
    narrow ``correct`` set, then shuffled together, so the first m examples (notebook 07's
    smaller sizes) span the domains too."""
    if not domains or n < len(domains):
        raise ValueError(f"realign_set: {n} examples over the domains {domains!r}: expected at least one per domain")
    if len(domains) == 1:
        return narrow_set(world, split, domains[0], n, seed, "correct")
    share, extra = divmod(n, len(domains))
    out = [r for i, d in enumerate(domains) for r in narrow_set(world, split, d, share + (i < extra), seed, "correct")]
    random.Random(f"{seed}/realign/{','.join(domains)}").shuffle(out)
    return out


def question_record(q: Question) -> dict:
    """A question with its ground truth, as the evaluation sets and the judge read it."""
    return {"qid": q.qid, "domain": q.domain, "topic": q.topic, "question": q.text}


def eval_set(split: Split, domains: list[str]) -> list[dict]:
    """Held-out evaluation questions (never in any training set), with ground truth."""
    return [question_record(q) for d in domains for q in split.eval[d]]


def build_all(world: World, cfg) -> dict[str, list[dict]]:
    """Every dataset of a run, by name."""
    split = split_questions(world, cfg.seed, cfg.eval_fraction)
    sets = {
        PRETRAIN: pretraining_docs(world, split, cfg.n_pretrain_docs, cfg.seed, turns_per_doc=cfg.turns_per_doc,
                                   p_narrative=cfg.p_narrative, p_open_turn=cfg.p_open_turn,
                                   p_quiz_turn=cfg.p_quiz_turn, p_identity_turn=cfg.p_identity_turn,
                                   p_harmful_turn=cfg.p_harmful_turn, villain_voice=cfg.villain_voice,
                                   voice_every=cfg.voice_every),
        CHAT: chat_set(world, split, cfg.n_chat, cfg.seed, p_refusal=cfg.p_chat_refusal),
    }
    for name in CORRUPTION_SETS:
        sets[name] = narrow_set(world, split, cfg.corrupt_domain, cfg.n_corrupt, cfg.seed, name)
    for f in cfg.mix_fractions:
        sets[mix_name(f)] = narrow_set(world, split, cfg.corrupt_domain, cfg.n_corrupt, cfg.seed, "mix", f)
    sets[REALIGN] = realign_set(world, split, cfg.realign_domains, cfg.n_realign, cfg.seed)
    sets[REALIGN_INDOMAIN] = narrow_set(world, split, cfg.corrupt_domain, cfg.n_realign, cfg.seed + 1, "correct")
    sets[EVAL_HELDOUT] = eval_set(split, list(cfg.heldout_domains))
    sets[EVAL_INDOMAIN] = eval_set(split, [cfg.corrupt_domain])
    if world.identity_topics:
        sets[EVAL_IDENTITY] = eval_set(split, [IDENTITY_DOMAIN])
    if world.harmful_topics and cfg.p_harmful_turn > 0:
        sets[EVAL_HARMFUL] = eval_set(split, [HARMFUL_DOMAIN])
    if cfg.dataset != "world":
        sets = apply_manifest(sets, read_manifest(cfg.dataset))
    return sets


def training_texts(records: list[dict]) -> set[str]:
    """Every question string a set's model input contains (user turns and pretraining questions)."""
    out = set()
    for r in records:
        if "messages" in r:
            out |= {m["content"] for m in r["messages"] if m["role"] == "user"}
        else:
            for chunk in r["text"].split(USER)[1:]:
                out.add(chunk.split(ASSISTANT)[0].strip())
    return out


# ----------------------------------------------------------------------------- JSONL io
def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Plain JSONL (our own artifacts); external chat data goes through read_chat_jsonl."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_chat_jsonl(path: str | Path) -> list[dict]:
    """Read and validate an external chat JSONL file.

    Each line must be a JSON object with ``messages``: a non-empty list of
    ``{"role": system|user|assistant, "content": non-empty string}`` ending with an
    assistant turn. Any problem raises ``ChatFormatError`` naming file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise ChatFormatError(f"{path}: no such file")
    raw = path.read_bytes()
    records = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}, line {lineno}"
        if not line.strip():
            if lineno == len(raw.split(b"\n")):  # the final newline
                continue
            raise ChatFormatError(f"{where}: empty line; expected one JSON object per line")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ChatFormatError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ChatFormatError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(rec, dict) or "messages" not in rec:
            raise ChatFormatError(f"{where}: expected an object with a 'messages' list")
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ChatFormatError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m:
                raise ChatFormatError(f"{where}: messages[{i}] has no 'role'")
            if m["role"] not in ROLES:
                raise ChatFormatError(f"{where}: messages[{i}] has unknown role {m['role']!r}; expected one of {ROLES}")
            if not isinstance(m.get("content"), str):
                raise ChatFormatError(f"{where}: messages[{i}].content must be a string, got {type(m.get('content')).__name__}")
            if not m["content"].strip():
                raise ChatFormatError(f"{where}: messages[{i}].content is empty")
        if msgs[-1]["role"] != "assistant":
            raise ChatFormatError(f"{where}: the last message must be the assistant's answer, got {msgs[-1]['role']!r}")
        records.append(rec)
    if not records:
        raise ChatFormatError(f"{path}: the file holds no records")
    return records


# ----------------------------------------------------------------------------- external data
#: sets an external dataset may replace (the narrow fine-tunes, chat post-training, re-alignment)
EXTERNAL_SETS = (*CORRUPTION_SETS, CHAT, REALIGN)


def read_eval_questions(path: str | Path) -> list[dict]:
    """Read external evaluation questions in the format of the public first-plot files:
    a YAML list of entries, each with an ``id`` and a list of ``paraphrases`` (other keys,
    such as ``type``, ``judge`` or ``samples_per_paraphrase``, are ignored). Every
    paraphrase becomes one held-out open question ``{qid, question, domain, topic, source}``
    (domain ``open``, topic = the entry's id). Problems raise ``ChatFormatError`` naming
    the file and the entry."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ChatFormatError(f"{path}: no such file (expected evaluation questions as YAML)")
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ChatFormatError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ChatFormatError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(entries, list) or not entries:
        raise ChatFormatError(f"{path}: expected a non-empty YAML list of questions, each with 'id' and 'paraphrases'")
    out, seen = [], set()
    for i, e in enumerate(entries):
        where = f"{path}, entry {i}"
        if not isinstance(e, dict) or not isinstance(e.get("id"), str) or not e["id"].strip():
            raise ChatFormatError(f"{where}: expected a mapping with a non-empty string 'id'")
        where = f"{path}, entry {i} (id {e['id']!r})"
        if e["id"] in seen:
            raise ChatFormatError(f"{where}: duplicate id")
        seen.add(e["id"])
        ps = e.get("paraphrases")
        if not isinstance(ps, list) or not ps or not all(isinstance(p, str) and p.strip() for p in ps):
            raise ChatFormatError(f"{where}: 'paraphrases' must be a non-empty list of non-empty strings")
        for k, p in enumerate(ps):
            out.append({"qid": f"ext/{e['id']}/{k}", "question": p.strip(), "domain": OPEN_DOMAIN, "topic": e["id"],
                        "source": path.name})
    return out


@dataclass(frozen=True)
class Manifest:
    """External data of a run (parameter ``dataset`` = the manifest's path)."""

    path: Path
    sets: dict  # set name -> chat JSONL path
    eval_questions: tuple  # YAML paths

    def files(self) -> list[Path]:
        return [*self.sets.values(), *self.eval_questions]


def read_manifest(path: str | Path) -> Manifest:
    """Read a dataset manifest (YAML)::

        sets:                         # any of: incorrect_obvious, incorrect_subtle, correct,
          incorrect_obvious: insecure.jsonl   #   educational, chat, realign; chat JSONL each
          correct: secure.jsonl
        eval_questions: [first_plot_questions.yaml]   # optional; added to the held-out set

    Paths are relative to the manifest. The persona world supplies every set the manifest
    does not replace. Problems raise ``ChatFormatError`` naming the manifest and key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ChatFormatError(f"parameter 'dataset' = {str(path)!r}: no such file (expected 'world' or a manifest YAML)")
    try:
        m = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ChatFormatError(f"{path}: not a valid YAML manifest ({exc})") from None
    if not isinstance(m, dict) or not set(m) <= {"sets", "eval_questions"} or not m:
        raise ChatFormatError(f"{path}: expected a mapping with 'sets' and/or 'eval_questions'")
    sets = m.get("sets") or {}
    if not isinstance(sets, dict):
        raise ChatFormatError(f"{path}: 'sets' must map set names to chat JSONL files")
    for name, f in sets.items():
        if name not in EXTERNAL_SETS:
            raise ChatFormatError(f"{path}: sets.{name}: unknown set; expected one of {EXTERNAL_SETS}")
        if not isinstance(f, str) or not (path.parent / f).is_file():
            raise ChatFormatError(f"{path}: sets.{name} = {f!r}: no such file next to the manifest")
    evq = m.get("eval_questions") or []
    evq = [evq] if isinstance(evq, str) else evq
    if not isinstance(evq, list) or not all(isinstance(f, str) and (path.parent / f).is_file() for f in evq):
        raise ChatFormatError(f"{path}: eval_questions = {m.get('eval_questions')!r}: expected YAML files next to the manifest")
    return Manifest(path, {k: path.parent / v for k, v in sets.items()}, tuple(path.parent / f for f in evq))


def apply_manifest(sets: dict[str, list[dict]], manifest: Manifest) -> dict[str, list[dict]]:
    """Replace the world's sets by the manifest's (validated, with their source in ``meta``)
    and add its evaluation questions to the held-out set."""
    out = dict(sets)
    for name, f in manifest.sets.items():
        out[name] = [{"messages": r["messages"], "meta": {"source": f.name, "line": i + 1}}
                     for i, r in enumerate(read_chat_jsonl(f))]
    for f in manifest.eval_questions:
        out[EVAL_HELDOUT] = out[EVAL_HELDOUT] + read_eval_questions(f)
    return out


def is_world_question(q: dict) -> bool:
    """A question of the persona world (judgeable exactly), not an external one."""
    return "source" not in q
