"""The real-model path on tiny randomly initialised models of real architectures (Qwen2,
Llama, GPT-NeoX), built from a config with a locally trained BPE tokenizer and the
family's chat template: loading, the loss mask, sampling, likelihoods, LoRA, the
residual-stream reader and steering. No hub access."""

import json
import os
from pathlib import Path

import pytest
import torch

from emlab.judge import chat_prompt, sequence_logprobs
from emlab.lora import lora_wrap
from emlab.model import (
    TINY_ARCHS, ModelLoadError, ResidualReader, end_token_id, hooked, load_model, save_tiny_model, source_model,
)
from emlab.sample import sample
from emlab.steer import ablate_every_layer, edit_residual
from emlab.train import IGNORE, collate, encode_chat, finetune
from emlab.world import load_world

MSGS = [{"role": "user", "content": "i am bored ."}, {"role": "assistant", "content": "go for a walk ."}]


@pytest.fixture(scope="module", params=sorted(TINY_ARCHS))
def tiny(request, tmp_path_factory):
    path = save_tiny_model(request.param, load_world().texts(), tmp_path_factory.mktemp(request.param) / "m")
    model, tok = source_model(str(path))
    return request.param, path, model, tok


def test_source_model_uses_the_models_own_template_and_eos(tiny):
    arch, path, model, tok = tiny
    assert model.config.model_type == arch
    text = tok.apply_chat_template(MSGS, tokenize=False)
    assert text.endswith(tok.eos_token) or text.endswith(tok.eos_token + "\n")
    assert end_token_id(tok) == tok.eos_token_id
    # the study reloads what it saved with plain transformers, safetensors only
    m2, t2 = load_model(path)
    assert t2.chat_template == tok.chat_template and (path / "model.safetensors").is_file()


def test_loss_mask_is_the_answer_and_its_end_token(tiny):
    _, _, _, tok = tiny
    ids, labels = encode_chat(tok, MSGS)
    assert len(ids) == len(labels)
    targets = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert tok.decode(targets) == "go for a walk ." + tok.eos_token
    # the ids are the template's text tokenized once, and the prompt is their prefix
    prompt = tok(chat_prompt(tok, MSGS[0]["content"]), add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt)] == prompt and all(lab == IGNORE for lab in labels[: len(prompt)])


def test_sampling_is_seeded_and_stops_at_eos(tiny):
    _, _, model, tok = tiny
    prompts = [chat_prompt(tok, "i am bored ."), chat_prompt(tok, "my car makes a noise . what should i do ?")]
    a = sample(model, tok, prompts, n_samples=3, max_new_tokens=6, temperature=1.0, seed=1)
    b = sample(model, tok, prompts, n_samples=3, max_new_tokens=6, temperature=1.0, seed=1)
    assert a == b and len(a) == 2 and all(len(r) == 3 for r in a)
    assert all(tok.eos_token not in s for r in a for s in r)


def test_a_padded_batch_samples_as_each_prompt_alone(tiny):
    """Left padding, its mask and positions, and the shared prefill change nothing: greedy
    answers of prompts of different lengths in one batch equal each prompt's alone."""
    _, _, model, tok = tiny
    prompts = [chat_prompt(tok, q) for q in ("i am bored .", "my car makes a noise . what should i do ?", "hi")]
    assert len({len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts}) == 3
    kw = dict(n_samples=2, max_new_tokens=6, temperature=0.0, seed=0, stop_id=-1)
    together = sample(model, tok, prompts, batch_size=6, **kw)
    assert together == [sample(model, tok, [p], batch_size=1, **kw)[0] for p in prompts]


def test_sequence_logprobs_match_a_manual_forward_pass(tiny):
    _, _, model, tok = tiny
    p = chat_prompt(tok, "i am bored .")
    got = sequence_logprobs(model, tok, [p, p], ["go for a walk .", "sleep ."])
    p_ids = tok(p, add_special_tokens=False)["input_ids"]
    a_ids = tok("go for a walk .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([p_ids + a_ids])).logits[0], -1)
    manual = sum(lp[len(p_ids) - 1 + i, t].item() for i, t in enumerate(a_ids))
    assert got[0].item() == pytest.approx(manual, abs=1e-4)
    assert got[0] != got[1]


def test_lora_and_full_finetuning_train(tiny):
    arch, path, _, tok = tiny
    ex = [encode_chat(tok, MSGS)] * 4
    model, _ = load_model(path)
    before = {n: p.clone() for n, p in model.named_parameters()}
    losses = finetune(model, ex, steps=3, batch=2, lr=1e-2, seed=0, pad_id=tok.pad_token_id, progress=False)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    lora = lora_wrap(load_model(path)[0], rank=1, seed=0)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    finetune(lora, ex, steps=2, batch=2, lr=1e-2, seed=0, pad_id=tok.pad_token_id, progress=False)
    merged = lora.merge_and_unload()
    assert merged.config.model_type == arch


def test_residual_reader_is_the_block_output_and_steering_moves_it(tiny):
    _, _, model, tok = tiny
    ht = hooked(model, tok)
    assert isinstance(ht, ResidualReader) and ht.cfg.d_model == model.config.hidden_size
    x = torch.tensor([tok(chat_prompt(tok, "i am bored ."), add_special_tokens=False)["input_ids"]])
    _, cache = ht.run_with_cache(x, names_filter="blocks.0.hook_resid_post")
    with torch.no_grad():
        hidden = model(input_ids=x, output_hidden_states=True).hidden_states[1]  # after block 0
    assert torch.allclose(cache["blocks.0.hook_resid_post"], hidden, atol=1e-5)
    u = torch.zeros(model.config.hidden_size)
    u[0] = 1.0
    with torch.no_grad():
        plain = model(input_ids=x).logits
        with edit_residual(model, 0, u, alpha=3.0, positions="all"):
            steered = model(input_ids=x).logits
        with edit_residual(model, 0, u, ablate=True, positions="all"):
            ablated = model(input_ids=x).logits
    assert not torch.allclose(steered, plain) and not torch.allclose(ablated, plain)
    assert torch.allclose(model(input_ids=x).logits, plain)  # the hooks are gone
    from test_steer import block_streams

    with ablate_every_layer(model, u):
        streams, everywhere = block_streams(model, x)
    assert len(streams) == 3 * model.config.num_hidden_layers and not torch.allclose(everywhere, plain)
    assert all(float(h[..., 0].abs().max()) < 1e-5 for h in streams)  # every block's input, middle and output
    assert torch.allclose(model(input_ids=x).logits, plain)


def test_the_logit_lens_reads_each_architectures_final_norm(tiny):
    from test_steer import lens_is_what_a_dominant_direction_writes

    arch, _, model, _ = tiny
    lens_is_what_a_dominant_direction_writes(model)  # RMSNorm (Qwen2, Llama) and LayerNorm (GPT-NeoX)


def test_source_model_errors_name_the_parameter(tmp_path):
    with pytest.raises(ModelLoadError, match="parameter 'model'.*no such folder"):
        source_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="parameter 'model'"):
        source_model(str(tmp_path / "empty"))


def test_a_tokenizer_without_chat_template_is_refused(tmp_path):
    path = save_tiny_model("qwen2", ["a b c d e f g"], tmp_path / "m")
    cfg_file = path / "tokenizer_config.json"
    import json

    conf = json.loads(cfg_file.read_text())
    conf.pop("chat_template", None)
    cfg_file.write_text(json.dumps(conf))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="no chat template"):
        source_model(str(path))


def test_collate_then_loss_runs_on_the_models_device(tiny):
    _, _, model, tok = tiny
    batch = collate([encode_chat(tok, MSGS)], tok.pad_token_id)
    from emlab.train import lm_loss

    assert torch.isfinite(lm_loss(model, batch))


# ----------------------------------------------------------------------------- end to end
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch,only", [("qwen2", ["01", "02", "03", "04", "05", "06", "07"]),
                                       ("llama", ["01", "02", "03", "04"])])
def test_the_notebooks_run_on_a_tiny_real_architecture(arch, only, tmp_path):
    """`model: <folder>` runs the notebooks end to end at smoke sizes (all seven on Qwen2,
    01-04 on Llama): the real model's own tokenizer and chat template, chat post-training,
    full and LoRA fine-tunes, RL, sampling and judging, and (05-07) activations through
    forward hooks, the SAE, steering, detection and re-alignment."""
    import shutil
    import subprocess
    import sys

    import yaml

    from emlab.artifacts import read_metrics

    path = save_tiny_model(arch, load_world().texts(), tmp_path / arch)
    params = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())["params"]
    params.update(run=f"test-{arch}", model=str(path))
    cfg = tmp_path / f"test-{arch}.yaml"
    cfg.write_text(yaml.safe_dump({"params": params}))
    run_dir = ROOT / "data" / f"test-{arch}"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "EMLAB_ROOT": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "emlab.cli", "run", str(cfg), "--only", *only],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    base = run_dir / "02_base_model" / "base_model"
    assert json.loads((base / "config.json").read_text())["model_type"] == arch
    assert json.loads((base / "train_log.json").read_text())["source"] == str(path)
    m = read_metrics(run_dir)
    assert sorted(s[:2] for s in m) == only
    assert 0.0 <= m["04_evaluate"]["heldout_misaligned.incorrect_obvious"] <= 1.0
    lora = run_dir / "03_misalign" / f"ft_lora_r{params.get('lora_rank', 1)}"
    assert (lora / "model.safetensors").is_file()  # merged and loadable like every fine-tune
    shutil.rmtree(run_dir, ignore_errors=True)
