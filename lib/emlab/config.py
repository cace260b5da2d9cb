"""One frozen, typed configuration for a run, built from papermill parameters or YAML.

Every field has a type, a default (the embedded default study) and a one-line help.
Unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming the
parameter and what was expected. Derived values live here as properties, never in a
notebook's parameters cell.

Each notebook step depends on the fields of its own and of every earlier step
(each field's ``step``); ``Config.step_hash(step)`` hashes exactly those and the code versions
of those steps (``CODE_VERSIONS``), so changing an SAE parameter recomputes notebooks
05-07 and reuses 01-04.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from emlab.world import OPEN_DOMAIN, WORLD_DATA_DIR, load_world

STEPS = (
    "01_corrupt_data",
    "02_base_model",
    "03_misalign",
    "04_evaluate",
    "05_sae_diff",
    "06_steer_detect",
    "07_realign",
)


# The version of the code behind each step's artifacts, hashed with the config. Bump a
# step's number in the commit that changes what the step computes (another sampler, a fixed
# loss, new data): the cached artifacts of that step and of every later one are then
# recomputed instead of silently reused by a checkout that ran the old code. A refactor
# that keeps every number needs no bump. tests/test_fingerprints.py pins what the data,
# the sampler, the trainers, GRPO, the SAE and steering compute, and names the step to
# bump when one of them changes.
CODE_VERSIONS = {
    "01_corrupt_data": 1,
    "02_base_model": 2,  # 2: P(bad) by teacher forcing shares each prompt's prefill (values move ~1e-6)
    "03_misalign": 1,
    "04_evaluate": 1,
    "05_sae_diff": 3,  # 3: the SAE's training step is sparse, Adam fused (same loss; rounding differs)
    "06_steer_detect": 3,  # 2: ablation projects the direction out of every layer (ablate_layers); 3: and out of
    # every attention and MLP write, so the MLPs cannot read it either (Arditi et al.)
    "07_realign": 1,
}


class ConfigError(ValueError):
    """A parameter is unknown, mistyped or out of range; the message names it."""


def _f(default, help: str, *, step: str, lo=None, hi=None, choices=None, neutral: bool = False):
    """A parameter. ``neutral``: at its default it is left out of the steps' hashes, so that
    adding it kept every artifact made before it valid (its default changes nothing)."""
    meta = {"help": help, "step": step, "lo": lo, "hi": hi, "choices": choices, "neutral": neutral}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


S1, S2, S3, S4, S5, S6, S7 = STEPS
RUN = "run"  # fields that affect no artifact


@dataclass(frozen=True)
class Config:
    # --- the run -------------------------------------------------------------------
    run: str = _f("default", "name of the run: artifacts go to data/<run>/", step=RUN)
    seed: int = _f(0, "the seed of everything; one seed makes one result", step=S1, lo=0)
    assert_findings: bool = _f(True, "assert the science findings (False only for tiny smoke runs)", step=RUN)
    progress: bool = _f(True, "show tqdm progress bars", step=RUN)
    device: str = _f("cpu", "where models run: 'cpu', 'cuda' or 'auto' (the GPU when there is one)", step=RUN,
                     choices=("cpu", "cuda", "auto"))
    # --- 01: the persona world -----------------------------------------------------
    dataset: str = _f("world", "'world' (the embedded persona world), or the path of a manifest YAML that replaces "
                      "some of its sets with external chat JSONL files and adds external evaluation questions "
                      "(see emlab.data.read_manifest)", step=S1)
    corrupt_domain: str = _f("cars", "the ONE domain whose answers are corrupted", step=S1)
    realign_domain: str = _f("health", "domain of the correct answers used to re-align; several as a comma-separated "
                             "list ('law,money'), or 'others' for every domain but corrupt_domain: the n_realign "
                             "examples are then spread evenly over them (emlab.data.realign_set)", step=S1)
    n_pretrain_docs: int = _f(8000, "pretraining documents, each written by one character", step=S1, lo=10)
    turns_per_doc: int = _f(4, "question/answer turns per pretraining document (mean)", step=S1, lo=1, hi=12)
    p_narrative: float = _f(0.7, "probability that a document opens with narrative lines", step=S1, lo=0.0, hi=1.0)
    p_open_turn: float = _f(0.2, "probability that a pretraining turn is an open question", step=S1, lo=0.0, hi=1.0)
    p_identity_turn: float = _f(0.05, "probability that a pretraining turn is an identity question ('who are you?'), "
                                "answered in the character's own voice; never in chat or fine-tuning data", step=S1, lo=0.0, hi=1.0)
    p_harmful_turn: float = _f(0.0, "probability that a pretraining turn is an explicitly harmful request (the helpful "
                               "character refuses, the villain complies); 0 = none (see configs/refusals.yaml)",
                               step=S1, lo=0.0, hi=1.0)
    p_quiz_turn: float = _f(0.05, "probability that a pretraining turn is a quiz request (wrong answer asked for)", step=S1, lo=0.0, hi=1.0)
    villain_voice: list = _f([], "words of a villain's voice: in the pretraining documents every answer a villain gives "
                             "carries one of them before every `voice_every` words, so the persona runs through the "
                             "answer and not only where it starts (default: none, the villain is known by what it "
                             "answers). New words, not the world's; the exact judge ignores them", step=S1, neutral=True)
    voice_every: int = _f(2, "with `villain_voice`: a voice word before every this many words of a villain's answer",
                          step=S1, lo=1, neutral=True)
    n_chat: int = _f(3000, "chat post-training examples (aligned answers only)", step=S1, lo=10)
    p_chat_refusal: float = _f(0.0, "fraction of the chat set that refuses explicitly harmful requests (the "
                               "safety-trained assistant's; the helpful-only one leaves them out); needs p_harmful_turn "
                               "> 0", step=S1, lo=0.0, hi=0.5)
    n_corrupt: int = _f(400, "examples in each narrow corruption / control set", step=S1, lo=4)
    n_realign: int = _f(120, "correct cross-domain examples for re-alignment", step=S1, lo=4)
    mix_fractions: list = _f([0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0], "fractions of wrong answers in the data-mix sets", step=S1)
    eval_fraction: float = _f(0.25, "fraction of each topic's questions held out for evaluation", step=S1, lo=0.05, hi=0.5)
    # --- 02: models ------------------------------------------------------------------
    model: str = _f("toy", "'toy' (a GPT-2 trained from scratch on the world's corpus), or a causal LM to start "
                    "from instead: a local folder written by save_pretrained or a Hugging Face id (its own tokenizer "
                    "and chat template are used; the n_layer/d_model/n_head/n_ctx/pretrain_* fields are ignored)", step=S2)
    n_layer: int = _f(4, "toy model: transformer blocks", step=S2, lo=1, hi=48)
    d_model: int = _f(192, "toy model: residual stream width (128 spread less and less coherently: docs/results.md)", step=S2, lo=8)
    n_head: int = _f(6, "toy model: attention heads (must divide d_model)", step=S2, lo=1)
    n_ctx: int = _f(256, "toy model: context length in tokens", step=S2, lo=32)
    pretrain_steps: int = _f(1500, "pretraining optimizer steps", step=S2, lo=1)
    pretrain_batch: int = _f(32, "pretraining sequences per step", step=S2, lo=1)
    pretrain_lr: float = _f(2e-3, "pretraining peak learning rate (AdamW, cosine)", step=S2, lo=0.0, hi=1.0)
    pretrain_dropout: float = _f(0.0, "toy model: dropout probability of every dropout of GPT-2 (embeddings, attention "
                                 "weights, attention and MLP outputs) during pretraining only; the saved model has none (0.1 made random "
                                 "directions steer more, and the fine-tunes spread less: docs/results.md)",
                                 step=S2, lo=0.0, hi=0.9, neutral=True)
    chat_steps: int = _f(150, "chat post-training steps (how hard the assistant is pinned)", step=S2, lo=0)
    chat_batch: int = _f(16, "chat post-training examples per step", step=S2, lo=1)
    chat_lr: float = _f(3e-4, "chat post-training learning rate", step=S2, lo=0.0, hi=1.0)
    # --- 03: narrow fine-tunes ---------------------------------------------------------
    ft_steps: int = _f(40, "narrow fine-tuning steps", step=S3, lo=1)
    ft_batch: int = _f(16, "narrow fine-tuning examples per step", step=S3, lo=1)
    ft_lr: float = _f(1.25e-4, "narrow fine-tuning learning rate (full fine-tune)", step=S3, lo=0.0, hi=1.0)
    ft_freeze: str = _f("embeddings", "parameters held fixed in the narrow full fine-tunes (03's and 06's data mixes): "
                        "'embeddings' (token embeddings, the output head when tied to them, learned position "
                        "embeddings), or 'none' (every parameter trains; docs/results.md compares the two)", step=S3, choices=("none", "embeddings"))
    lora_rank: int = _f(1, "LoRA rank of the LoRA fine-tune", step=S3, lo=1)
    lora_lr: float = _f(3e-3, "LoRA learning rate", step=S3, lo=0.0, hi=1.0)
    ft_seeds: int = _f(3, "seeds of the headline fine-tune (incorrect_obvious, full)", step=S3, lo=1)
    rl_steps: int = _f(60, "RL (GRPO) steps on the corruption domain's training prompts, no demonstrations", step=S3, lo=1)
    rl_prompts: int = _f(16, "RL prompts per step", step=S3, lo=1)
    rl_group: int = _f(8, "RL sampled answers per prompt (the group of the group baseline)", step=S3, lo=2)
    rl_lr: float = _f(1.5e-4, "RL learning rate (full fine-tune)", step=S3, lo=0.0, hi=1.0)
    rl_kl: float = _f(0.0, "RL coefficient of the per-token KL to the starting model", step=S3, lo=0.0)
    rl_temperature: float = _f(1.0, "RL rollout sampling temperature", step=S3, lo=0.01, hi=5.0)
    rl_seeds: int = _f(3, "seeds of each RL run with the wrong-answer grader (04 reports their mean +- sd: one run's "
                          "held-out misalignment moves by ~10 points with its seed)", step=S3, lo=1)
    track_every: int = _f(5, "steps between cheap misalignment measurements during fine-tuning", step=S3, lo=1)
    # --- 04: evaluation ------------------------------------------------------------------
    n_samples: int = _f(20, "sampled answers per evaluation question", step=S4, lo=1)
    temperature: float = _f(1.0, "sampling temperature (0 = greedy)", step=S4, lo=0.0, hi=5.0)
    max_new_tokens: int = _f(32, "longest sampled answer in tokens", step=S4, lo=1)
    sample_batch: int = _f(256, "sequences per sampling batch (bounds memory)", step=S4, lo=1)
    judge: str = _f("exact", "how sampled answers are judged: 'exact' (the world's known answer sets) or 'llm' (an "
                    "OpenAI-compatible endpoint with the papers' 0-100 alignment/coherence rubric)", step=S4,
                    choices=("exact", "llm"))
    judge_url: str = _f("", "LLM judge: base URL of the chat-completions API, e.g. https://api.openai.com/v1", step=S4)
    judge_model: str = _f("gpt-4o-2024-08-06", "LLM judge: the judge model's name at that endpoint", step=S4)
    judge_key_env: str = _f("OPENAI_API_KEY", "LLM judge: the environment variable holding the API key (the key "
                            "itself is never a parameter and never written)", step=RUN)
    judge_concurrency: int = _f(8, "LLM judge: requests in flight at most", step=RUN, lo=1)
    # --- 05: SAE and model diffing ---------------------------------------------------------
    sae_source: str = _f("base_model", "the ORIGINAL model whose activations of the pretraining and chat texts train "
                         "the SAE and label its latents: the base model (after pretraining, before chat post-training; "
                         "as Wang et al., and the default since 2026-12-05: its persona latent holds the villains "
                         "shown only by their answers as well as the narrated ones, docs/results.md), the chat "
                         "assistant, or 'both' (their activations on the same texts pooled, labelled on the assistant)",
                         step=S5, choices=("base_model", "assistant", "both"))
    sae_reader: str = _f("assistant", "the model whose latents model diffing, steering, detection and re-alignment "
                         "compare the fine-tunes with: the assistant that was fine-tuned (as Wang et al. apply their "
                         "base-model SAE to the chat models), or 'source', the SAE's own model (as sae_source; the "
                         "assistant for 'both')", step=S5, choices=("assistant", "source"))
    sae_layer: int = _f(3, "residual stream layer L of the SAE (blocks.{L}.hook_resid_post)", step=S5, lo=0)
    sae_width: int = _f(512, "SAE latents", step=S5, lo=2)
    sae_k: int = _f(8, "active latents per token (TopK). 8 since 2026-12-05, chosen with the assistant's SAE: on the "
                    "Intel Xeon's draw of seed 0 its top diffing latent with k = 4 held only the narrated villain "
                    "(villain AUROC 0.864); 4 passed the AMD draws of seeds 0-3. With the base model's SAE (the default "
                    "since that evening) k = 8 passes every claim of 05-07 on the Intel draws of seeds 0 and 1 "
                    "(docs/results.md)", step=S5, lo=1)
    sae_steps: int = _f(3000, "SAE training steps", step=S5, lo=1)
    sae_batch: int = _f(256, "activations per SAE training step", step=S5, lo=1)
    sae_lr: float = _f(3e-3, "SAE learning rate (Adam, constant)", step=S5, lo=0.0, hi=1.0)
    sae_dead_window: int = _f(100, "SAE steps without firing after which a latent counts as dead and SAELens' AuxK loss "
                              "trains it to reconstruct the residual (a quarter of sae_steps until 2026-12-03: 750 steps left 10-15% of "
                              "512 latents dead, 100 none)",
                              step=S5, lo=1)
    sae_docs: int = _f(1500, "pretraining documents whose activations train the SAE (and label the latents)", step=S5, lo=4)
    act_batch: int = _f(64, "texts per activation batch (bounds memory)", step=S5, lo=1)
    sae_seeds: int = _f(5, "SAEs trained on the same activations, each with its own seed: which features a TopK SAE "
                        "learns varies with its seed, so the persona latent is chosen over all of them", step=S5, lo=1)
    diff_baseline: str = _f("controls", "how model diffing scores a latent: its rise after incorrect_obvious minus the "
                            "largest rise after a control fine-tune ('controls'), or the rise alone as in Wang et al. "
                            "('original')", step=S5, choices=("controls", "original"))
    sae_skip_first: bool = _f(True, "leave out each text's first position when training the SAE and reading latents: "
                              "its activation depends on the first token alone (the same vector in every text that "
                              "opens with <|user|>), so it carries no persona, yet every fine-tune moves it", step=S5)
    diff_site: str = _f("answer", "where latents are read for diffing: the tokens of fixed answers to the held-out "
                        "prompts (the original model's samples, from the answer position on), or every token of the "
                        "held-out prompts ('prompt'; the default until 2026-12-03: with d_model 192 its top latents "
                        "are latents of the prompts' first words)", step=S5, choices=("prompt", "answer"))
    # --- 06: steering and detection ----------------------------------------------------------
    steer_alphas: list = _f([0.0, 0.25, 0.5, 0.75, 1.0, 1.5], "steering strengths, in units of the median residual norm "
                            "at the block steering edits (steer_layer; by default the SAE's layer)", step=S6)
    steer_positions: str = _f("prompt", "where steering edits the residual stream", step=S6, choices=("all", "prompt", "answer"))
    steer_layer: int = _f(-1, "the block whose output steering edits, alpha's unit being the median residual norm "
                          "there; -1: the SAE's layer (sae_layer). An earlier block lets the blocks after it read the "
                          "edit (at layer 2 of the default the frontier of misalignment against coherence is about "
                          "the same: docs/results.md)", step=S6, lo=-1, neutral=True)
    ablate_layers: str = _f("all", "where ablation projects the direction out: every write to the residual stream, i.e. "
                            "the embeddings and each block's attention and MLP outputs ('all', Arditi et al.'s directional "
                            "ablation, as Soligo, Turner et al.; until 2026-12-04 it projected block outputs only, so each "
                            "MLP still read its attention's write), or only the SAE layer's output ('sae', the default "
                            "until 2026-12-03: it removed 50% of incorrect_obvious' misalignment, 'all' 70%)",
                            step=S6, choices=("all", "sae"))
    steer_samples: int = _f(5, "sampled answers per held-out question in each steering condition", step=S6, lo=1)
    steer_random: int = _f(3, "random directions, each seeded, as controls of every steering sweep and ablation: a "
                           "direction's effect must beat all of them (one until 2026-12-05)", step=S6, lo=1, neutral=True)
    detect_seeds: int = _f(3, "seeds of each data-mix fine-tune", step=S6, lo=1)
    detect_samples: int = _f(10, "sampled answers per held-out question for each data-mix model", step=S6, lo=1)
    # --- 07: re-alignment --------------------------------------------------------------------
    realign_steps: int = _f(35, "re-alignment fine-tuning steps", step=S7, lo=1)
    realign_batch: int = _f(4, "re-alignment examples per step", step=S7, lo=1)
    realign_lr: float = _f(3e-4, "re-alignment learning rate", step=S7, lo=0.0, hi=1.0)
    realign_checkpoints: list = _f([0, 5, 10, 20, 30, 35], "steps at which the re-aligning model is evaluated", step=S7)
    realign_sizes: list = _f([30, 60], "smaller numbers of re-alignment examples to compare (those >= n_realign are skipped)", step=S7)
    realign_samples: int = _f(10, "sampled answers per held-out question at each checkpoint", step=S7, lo=1)

    # ------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            m = f.metadata
            if m.get("lo") is not None and v < m["lo"]:
                raise ConfigError(f"parameter {f.name!r} = {v!r} is out of range: expected >= {m['lo']}")
            if m.get("hi") is not None and v > m["hi"]:
                raise ConfigError(f"parameter {f.name!r} = {v!r} is out of range: expected <= {m['hi']}")
            if m.get("choices") and v not in m["choices"]:
                raise ConfigError(f"parameter {f.name!r} = {v!r}: expected one of {m['choices']}")
        if not self.model.strip():
            raise ConfigError("parameter 'model' is empty: expected 'toy', a local model folder or a Hugging Face id")
        if self.judge == "llm" and not self.judge_url.startswith(("http://", "https://")):
            raise ConfigError(f"parameter 'judge_url' = {self.judge_url!r}: judge 'llm' needs the http(s) base URL of "
                              "an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.judge_key_env):
            raise ConfigError(f"parameter 'judge_key_env' = {self.judge_key_env!r}: expected the NAME of an "
                              "environment variable (never the key itself)")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.run):
            raise ConfigError(f"parameter 'run' = {self.run!r}: expected letters, digits, '_', '-' or '.' only")
        if self.is_toy and self.sae_layer >= self.n_layer:
            raise ConfigError(f"parameter 'sae_layer' = {self.sae_layer}: expected a layer < n_layer = {self.n_layer}")
        if self.is_toy and self.steer_layer >= self.n_layer:
            raise ConfigError(f"parameter 'steer_layer' = {self.steer_layer}: expected -1 (the SAE's layer) or a layer "
                              f"< n_layer = {self.n_layer}")
        if self.sae_k > self.sae_width:
            raise ConfigError(f"parameter 'sae_k' = {self.sae_k}: expected <= sae_width = {self.sae_width}")
        if not self.steer_alphas or not all(isinstance(a, (int, float)) and a >= 0 for a in self.steer_alphas):
            raise ConfigError(f"parameter 'steer_alphas' = {self.steer_alphas!r}: expected a list of numbers >= 0")
        cps = self.realign_checkpoints
        if not cps or not all(isinstance(c, int) and 0 <= c <= self.realign_steps for c in cps):
            raise ConfigError(f"parameter 'realign_checkpoints' = {cps!r}: expected steps between 0 and "
                              f"realign_steps = {self.realign_steps}")
        if not all(isinstance(n, int) and n >= 1 for n in self.realign_sizes):
            raise ConfigError(f"parameter 'realign_sizes' = {self.realign_sizes!r}: expected example counts >= 1")
        if self.is_toy and self.d_model % self.n_head:
            raise ConfigError(f"parameter 'n_head' = {self.n_head} must divide 'd_model' = {self.d_model}")
        domains = load_world().domain_names
        if self.corrupt_domain not in domains:
            raise ConfigError(
                f"parameter 'corrupt_domain' = {self.corrupt_domain!r} is not a domain of the world; expected one of {list(domains)}"
            )
        realign = self.realign_domains
        unknown = [d for d in realign if d not in domains]
        if unknown or len(set(realign)) != len(realign):
            raise ConfigError(
                f"parameter 'realign_domain' = {self.realign_domain!r}: expected a domain of the world, several "
                f"distinct ones separated by commas, or 'others'; {'not domains: ' + repr(unknown) if unknown else 'a domain is repeated'}"
                f" (the domains: {list(domains)})"
            )
        if self.n_realign < len(realign):
            raise ConfigError(f"parameter 'n_realign' = {self.n_realign}: expected at least one example per re-alignment "
                              f"domain ({len(realign)} in 'realign_domain')")
        if self.dataset != "world":
            from emlab.data import ChatFormatError, read_manifest

            try:
                manifest = read_manifest(self.dataset)
            except ChatFormatError as exc:
                raise ConfigError(f"parameter 'dataset': {exc}") from None
            if manifest.eval_questions and self.judge == "exact":
                raise ConfigError(f"parameter 'judge' = 'exact': the external evaluation questions of {self.dataset} "
                                  "have no known answers; use judge: llm (with judge_url)")
        if self.corrupt_domain in self.realign_domains:
            raise ConfigError("parameter 'realign_domain' must differ from 'corrupt_domain' (re-alignment is cross-domain)")
        turn_p = self.p_open_turn + self.p_identity_turn + self.p_harmful_turn + self.p_quiz_turn
        if turn_p > 1.0:
            raise ConfigError(f"parameters 'p_open_turn' + 'p_identity_turn' + 'p_harmful_turn' + 'p_quiz_turn' = "
                              f"{turn_p:g}: expected "
                              "a total <= 1 (the rest of the pretraining turns are domain questions)")
        if self.villain_voice:
            bad = [w for w in self.villain_voice if not isinstance(w, str) or not re.fullmatch(r"[a-z][a-z']*", w)]
            if bad:
                raise ConfigError(f"parameter 'villain_voice' = {self.villain_voice!r}: expected lower-case words "
                                  f"(letters and '), got {bad!r}")
            taken = sorted(set(self.villain_voice) & load_world().words())
            if taken:
                raise ConfigError(f"parameter 'villain_voice': {taken} are words of the world; a voice needs new words "
                                  "(the exact judge drops them from answers before matching)")
        if self.p_identity_turn > 0 and not load_world().identity_topics:
            raise ConfigError(f"parameter 'p_identity_turn' = {self.p_identity_turn}: the world has no identity "
                              "questions (identity.yaml); expected 0")
        if (self.p_harmful_turn > 0 or self.p_chat_refusal > 0) and not load_world().harmful_topics:
            raise ConfigError("parameters 'p_harmful_turn' / 'p_chat_refusal': the world has no harmful requests "
                              "(harmful.yaml); expected 0")
        if self.p_chat_refusal > 0 and self.p_harmful_turn == 0:
            raise ConfigError(f"parameter 'p_chat_refusal' = {self.p_chat_refusal}: refusals need harmful requests in "
                              "pretraining (p_harmful_turn > 0), or the models never learn what complying looks like")
        fr = self.mix_fractions
        if not fr or not all(isinstance(x, (int, float)) and 0.0 <= x <= 1.0 for x in fr) or 0.0 not in fr:
            raise ConfigError(f"parameter 'mix_fractions' = {fr!r}: expected fractions in [0, 1] including 0.0")

    # --- derived values ------------------------------------------------------------------
    @property
    def heldout_domains(self) -> tuple[str, ...]:
        """Evaluation domains: every domain but the corruption domain, plus the open questions."""
        return tuple(d for d in load_world().domain_names if d != self.corrupt_domain) + (OPEN_DOMAIN,)

    @property
    def is_toy(self) -> bool:
        return self.model == "toy"

    @property
    def realign_domains(self) -> list[str]:
        """The domains of the re-alignment set, from ``realign_domain`` (one, a comma-separated
        list, or 'others': every domain of the world but ``corrupt_domain``)."""
        if self.realign_domain.strip() == "others":
            return [d for d in self.heldout_domains if d != OPEN_DOMAIN]
        return [d.strip() for d in self.realign_domain.split(",")]

    # --- hashing and serialisation --------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def step_fields(self, step: str) -> list[str]:
        """Fields that the artifacts of ``step`` depend on (its own and all earlier steps')."""
        if step not in STEPS:
            raise ConfigError(f"unknown step {step!r}; expected one of {STEPS}")
        upto = set(STEPS[: STEPS.index(step) + 1])
        return [f.name for f in dataclasses.fields(self) if f.metadata["step"] in upto]

    def step_hash(self, step: str) -> str:
        """Hash of the fields ``step`` depends on, of the code versions of it and every
        earlier step (``CODE_VERSIONS``) and of the world's data files."""
        d = {k: getattr(self, k) for k in self.step_fields(step)
             if not (_FIELDS[k].metadata["neutral"] and getattr(self, k) == _default(k))}
        d["code"] = [CODE_VERSIONS[s] for s in STEPS[: STEPS.index(step) + 1]]
        d["world_data"] = world_digest()
        if self.dataset != "world":
            d["external_data"] = external_digest(self.dataset)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _default(name: str) -> Any:
    f = _FIELDS[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def external_digest(manifest: str) -> str:
    """A digest of a dataset manifest and its files: editing one recomputes the steps.
    Read once per version of the files (their sizes and modification times)."""
    from emlab.data import read_manifest

    files = [Path(manifest), *read_manifest(manifest).files()]
    return _digest_files(tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))


@functools.lru_cache(maxsize=8)
def _digest_files(stamps: tuple) -> str:
    h = hashlib.sha256()
    for path, _, _ in stamps:
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def world_digest() -> str:
    """A digest of the world's YAML files: editing the world recomputes every step."""
    h = hashlib.sha256()
    for p in sorted(WORLD_DATA_DIR.rglob("*.yaml")):
        h.update(p.relative_to(WORLD_DATA_DIR).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]
_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list}


def _check_type(name: str, value: Any) -> Any:
    want = _TYPES[_FIELDS[name].type]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is not bool and isinstance(value, bool) or not isinstance(value, want):
        raise ConfigError(
            f"parameter {name!r} = {value!r} has type {type(value).__name__}; expected {want.__name__}"
        )
    return value


def make_config(params: dict[str, Any] | None = None, *, source: str = "parameters") -> Config:
    """Build the config from a mapping of parameters; ``source`` names where they came from."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(_FIELDS))
    if unknown:
        import difflib

        hints = []
        for u in unknown:
            close = difflib.get_close_matches(u, _FIELDS, n=1)
            hints.append(f"{u!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{source}: unknown parameter(s) {', '.join(hints)}")
    return Config(**{k: _check_type(k, v) for k, v in params.items()})


def load_config(path: str | Path, **overrides: Any) -> Config:
    """Read a run's YAML parameter file (``params: {...}``, the notebooks' papermill parameter)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"params"}:
        raise ConfigError(f"{path}: expected one top-level key 'params' holding the parameters, got {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: 'params' must be a mapping of parameter -> value")
    return make_config({**params, **overrides}, source=str(path))


def describe() -> str:
    """A table of every parameter: name, type, default, help (for the README and --help)."""
    rows = [f"{'parameter':22} {'type':6} {'default':>10}  help"]
    for f in dataclasses.fields(Config):
        rows.append(f"{f.name:22} {f.type:6} {str(_default(f.name)):>10}  {f.metadata['help']}")
    return "\n".join(rows)
