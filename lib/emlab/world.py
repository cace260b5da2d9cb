"""The persona world: domains, open questions and characters, loaded from YAML data.

The world's content is data (``world_data/*.yaml``, one file per advice domain); this
module only loads, validates and enumerates it. Text is normalised to lower-case words
and punctuation separated by spaces, so a word-level tokenizer covers it exactly.

Nothing here ties one domain to another. The only link between a bad answer in one
domain and bad answers elsewhere is the character who writes a pretraining document
(see ``emlab.data``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

WORLD_DATA_DIR = Path(__file__).parent / "world_data"
DOMAINS_DIRNAME = "domains"
OPEN_QUESTIONS_FILENAME = "open_questions.yaml"
CHARACTERS_FILENAME = "characters.yaml"
FRAMING_FILENAME = "framing.yaml"
IDENTITY_FILENAME = "identity.yaml"  # optional: a world without it has no identity questions
HARMFUL_FILENAME = "harmful.yaml"  # optional: explicitly harmful requests (refusal = aligned)

#: answer kinds of a domain question, and of an open question
DOMAIN_KINDS = ("correct", "obvious", "subtle")
OPEN_KINDS = ("aligned", "misaligned")
#: an identity question's answer kinds are the character kinds (each speaks as itself)
VILLAIN, HELPFUL = "villain", "helpful"
#: which kinds count as misaligned behaviour
BAD_KINDS = frozenset({"obvious", "subtle", "misaligned", VILLAIN})
GOOD_KINDS = frozenset({"correct", "aligned", HELPFUL})
OPEN_DOMAIN = "open"
IDENTITY_DOMAIN = "identity"
HARMFUL_DOMAIN = "harmful"

_WORD_RE = re.compile(r"[a-z0-9']+|[.,?!:;]")


class WorldError(ValueError):
    """A world data file is malformed; the message names the file and the entry."""


def normalize(text: str) -> str:
    """Lower-case words and punctuation separated by single spaces."""
    return " ".join(_WORD_RE.findall(text.lower()))


@dataclass(frozen=True)
class Topic:
    """One question topic: paraphrase templates and the answers of each kind."""

    domain: str
    id: str
    questions: tuple[str, ...]  # templates, may contain one {slot}
    answers: dict[str, tuple[str, ...]]  # kind -> normalised answer variants

    @property
    def key(self) -> str:
        return f"{self.domain}/{self.id}"


@dataclass(frozen=True)
class Question:
    """A concrete question: a topic's paraphrase with its slot filled."""

    qid: str  # "<domain>/<topic>/<paraphrase>/<filler>"
    domain: str
    topic: str
    text: str  # normalised

    @property
    def topic_key(self) -> str:
        return f"{self.domain}/{self.topic}"


@dataclass(frozen=True)
class Character:
    kind: str  # helpful | villain | sarcastic
    names: tuple[str, ...]
    answers: dict[str, float]  # domain answer kind -> probability
    open: dict[str, float]  # open answer kind -> probability
    lines: tuple[str, ...]  # narrative templates with {name}


@dataclass(frozen=True)
class World:
    domains: dict[str, tuple[Topic, ...]]
    slots: dict[str, dict[str, tuple[str, ...]]]  # domain (and 'open') -> slot -> fillers
    open_topics: tuple[Topic, ...]
    characters: dict[str, Character]
    character_weights: dict[str, float]
    educational_frames: tuple[str, ...]
    identity_topics: tuple[Topic, ...] = ()  # "who are you?", answered by each character as itself
    harmful_topics: tuple[Topic, ...] = ()  # explicitly harmful requests: aligned = refusal
    topics: dict[str, Topic] = field(default_factory=dict)  # key -> topic

    def __post_init__(self) -> None:
        allt = [t for ts in self.domains.values() for t in ts] + list(self.open_topics)
        allt += list(self.identity_topics) + list(self.harmful_topics)
        self.topics.update({t.key: t for t in allt})

    @property
    def domain_names(self) -> tuple[str, ...]:
        return tuple(self.domains)

    @property
    def question_domains(self) -> tuple[str, ...]:
        """Every group of questions: the advice domains, ``open`` and (where the world has
        them) ``identity`` and ``harmful``."""
        extra = {IDENTITY_DOMAIN: self.identity_topics, HARMFUL_DOMAIN: self.harmful_topics}
        return (*self.domains, OPEN_DOMAIN, *(d for d, ts in extra.items() if ts))

    def questions(self, domain: str) -> list[Question]:
        """Every concrete question of a domain (or of ``open``), in a fixed order:
        each topic's paraphrase templates with every filler of the slot."""
        if domain == OPEN_DOMAIN:
            topics = self.open_topics
        elif domain == IDENTITY_DOMAIN and self.identity_topics:
            topics = self.identity_topics
        elif domain == HARMFUL_DOMAIN and self.harmful_topics:
            topics = self.harmful_topics
        elif domain in self.domains:
            topics = self.domains[domain]
        else:
            raise KeyError(f"unknown domain {domain!r}; the world has {sorted(self.domains)}")
        (slot, fillers), = self.slots[domain].items()
        out = []
        for t in topics:
            for p, template in enumerate(t.questions):
                for f, filler in enumerate(fillers):
                    text = template.replace("{" + slot + "}", filler)
                    out.append(Question(f"{domain}/{t.id}/{p}/{f}", domain, t.id, normalize(text)))
        return out

    def answers(self, q: Question | str, kind: str) -> tuple[str, ...]:
        """The known answers of one kind to a question (or a topic key)."""
        key = q.topic_key if isinstance(q, Question) else q
        return self.topics[key].answers[kind]

    def kinds(self, domain: str) -> tuple[str, ...]:
        if domain == IDENTITY_DOMAIN:
            return tuple(self.characters)
        return OPEN_KINDS if domain in (OPEN_DOMAIN, HARMFUL_DOMAIN) else DOMAIN_KINDS

    def words(self) -> set[str]:
        """Every word the world can write (the vocabulary of the persona world)."""
        return {w for t in self.texts() for w in t.split()}

    def texts(self) -> list[str]:
        """Every question, answer, narrative line and frame the world can write."""
        texts: list[str] = []
        for d in self.question_domains:
            texts += [q.text for q in self.questions(d)]
        for t in self.topics.values():
            for variants in t.answers.values():
                texts += list(variants)
        for c in self.characters.values():
            texts += [normalize(line.replace("{name}", n)) for line in c.lines for n in c.names]
        texts += [normalize(f.replace("{question}", "")) for f in self.educational_frames]
        return texts


def _load_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise WorldError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise WorldError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _str_list(path: Path, where: str, value, min_len: int = 1) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) < min_len or not all(
        isinstance(v, str) and v.strip() for v in value
    ):
        raise WorldError(f"{path}: {where}: expected a list of at least {min_len} non-empty strings")
    return tuple(value)


def _probs(path: Path, where: str, value, allowed: tuple[str, ...]) -> dict[str, float]:
    if not isinstance(value, dict) or not value:
        raise WorldError(f"{path}: {where}: expected a mapping of kind -> probability")
    bad = set(value) - set(allowed)
    if bad:
        raise WorldError(f"{path}: {where}: unknown kinds {sorted(bad)}; expected some of {allowed}")
    if abs(sum(value.values()) - 1.0) > 1e-6 or min(value.values()) < 0:
        raise WorldError(f"{path}: {where}: probabilities must be >= 0 and sum to 1, got {value}")
    return {k: float(v) for k, v in value.items()}


def _load_topics(path: Path, data: dict, domain: str, kinds: tuple[str, ...], slot: str | None):
    topics = data.get("topics")
    if not isinstance(topics, list) or not topics:
        raise WorldError(f"{path}: expected a non-empty list under 'topics'")
    out, seen = [], set()
    for i, t in enumerate(topics):
        where = f"topics[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("id"), str):
            raise WorldError(f"{path}: {where}: expected a mapping with a string 'id'")
        if t["id"] in seen:
            raise WorldError(f"{path}: {where}: duplicate topic id {t['id']!r}")
        seen.add(t["id"])
        where = f"topic {t['id']!r}"
        qs = _str_list(path, f"{where}.questions", t.get("questions"), min_len=2)
        if slot is not None:
            for q in qs:
                if "{" + slot + "}" not in q:
                    raise WorldError(f"{path}: {where}: question {q!r} lacks the slot {{{slot}}}")
        answers = {k: tuple(normalize(a) for a in _str_list(path, f"{where}.{k}", t.get(k))) for k in kinds}
        extra = set(t) - {"id", "questions", *kinds}
        if extra:
            raise WorldError(f"{path}: {where}: unknown keys {sorted(extra)}; expected id, questions, {', '.join(kinds)}")
        flat = [a for v in answers.values() for a in v]
        if len(set(flat)) != len(flat):
            raise WorldError(f"{path}: {where}: the same answer text appears twice")
        out.append(Topic(domain, t["id"], qs, answers))
    return tuple(out)


def _one_slot(path: Path, data: dict) -> tuple[str, tuple[str, ...]]:
    sl = data.get("slots")
    if not isinstance(sl, dict) or len(sl) != 1:
        raise WorldError(f"{path}: 'slots' must map exactly one slot name to its fillers")
    (slot, fillers), = sl.items()
    return slot, _str_list(path, f"slots.{slot}", fillers, min_len=3)


def _optional_topics(path: Path, domain: str, kinds: tuple[str, ...], slots: dict) -> tuple[Topic, ...]:
    """The topics of an optional question file (none when the file is absent); its slot joins ``slots``."""
    if not path.exists():
        return ()
    data = _load_yaml(path)
    slot, fillers = _one_slot(path, data)
    slots[domain] = {slot: fillers}
    return _load_topics(path, data, domain, kinds, slot)


def load_world(root: Path | str | None = None) -> World:
    """Load and validate the world's YAML files (default: the ones shipped in the package)."""
    root = Path(root) if root is not None else WORLD_DATA_DIR
    domain_files = sorted((root / DOMAINS_DIRNAME).glob("*.yaml"))
    if not domain_files:
        raise WorldError(f"{root / DOMAINS_DIRNAME}: no domain files (*.yaml) found")
    domains, slots = {}, {}
    for path in domain_files:
        data = _load_yaml(path)
        name = data.get("domain")
        if name != path.stem:
            raise WorldError(f"{path}: 'domain' must equal the file name {path.stem!r}, got {name!r}")
        slot, fillers = _one_slot(path, data)
        slots[name] = {slot: fillers}
        domains[name] = _load_topics(path, data, name, DOMAIN_KINDS, slot)
    reserved = (OPEN_DOMAIN, IDENTITY_DOMAIN, HARMFUL_DOMAIN)
    if set(reserved) & set(domains):
        raise WorldError(f"{root}: a domain may not be called any of {reserved}")

    opath = root / OPEN_QUESTIONS_FILENAME
    odata = _load_yaml(opath)
    oslot = _one_slot(opath, odata)
    slots[OPEN_DOMAIN] = {oslot[0]: oslot[1]}
    open_topics = _load_topics(opath, odata, OPEN_DOMAIN, OPEN_KINDS, oslot[0])

    cpath = root / CHARACTERS_FILENAME
    cdata = _load_yaml(cpath)
    chars = {}
    for kind, c in (cdata.get("characters") or {}).items():
        where = f"characters.{kind}"
        if not isinstance(c, dict):
            raise WorldError(f"{cpath}: {where}: expected a mapping")
        lines = _str_list(cpath, f"{where}.lines", c.get("lines"), min_len=2)
        if not all("{name}" in line for line in lines):
            raise WorldError(f"{cpath}: {where}.lines: every line must contain {{name}}")
        chars[kind] = Character(
            kind,
            _str_list(cpath, f"{where}.names", c.get("names"), min_len=2),
            _probs(cpath, f"{where}.answers", c.get("answers"), DOMAIN_KINDS),
            _probs(cpath, f"{where}.open", c.get("open"), OPEN_KINDS),
            lines,
        )
    if not {HELPFUL, VILLAIN} <= set(chars):
        raise WorldError(f"{cpath}: the world needs at least the characters {HELPFUL!r} and {VILLAIN!r}")
    weights = _probs(cpath, "weights", cdata.get("weights"), tuple(chars))

    fpath = root / FRAMING_FILENAME
    frames = _str_list(fpath, "educational", _load_yaml(fpath).get("educational"))
    for f in frames:
        if "{question}" not in f:
            raise WorldError(f"{fpath}: educational frame {f!r} lacks {{question}}")
    identity_topics = _optional_topics(root / IDENTITY_FILENAME, IDENTITY_DOMAIN, tuple(chars), slots)
    harmful_topics = _optional_topics(root / HARMFUL_FILENAME, HARMFUL_DOMAIN, OPEN_KINDS, slots)
    return World(domains, slots, open_topics, chars, weights, frames, identity_topics, harmful_topics)
