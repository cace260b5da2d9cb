"""Worker of tests/test_distributed.py: one fine-tune of a tiny model, run either alone or
under ``accelerate launch --num_processes 2 --cpu`` (gloo); process 0 saves the weights
(safetensors) and the loss curve to the folder given as argument."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from emlab.config import make_config
from emlab.data import chat_record
from emlab.model import build_tokenizer, build_toy_model
from emlab.train import encode_chat_set, finetune
from emlab.world import load_world

torch.set_num_threads(1)
out = Path(sys.argv[1])
world = load_world()
tok = build_tokenizer([" ".join(sorted(world.words()))])
model = build_toy_model(make_config({"d_model": 32, "n_layer": 2, "n_head": 2, "n_ctx": 64, "sae_layer": 1}), tok)
qs = world.questions("cars")[:12]
records = [chat_record(q.text, world.answers(q, "correct")[0]) for q in qs]
losses = finetune(model, encode_chat_set(tok, records), steps=4, batch=6, lr=1e-2, seed=0,
                  pad_id=tok.pad_token_id, progress=False)
from accelerate import PartialState  # noqa: E402

if PartialState().is_main_process:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, out / "w.safetensors")
    (out / "losses.json").write_text(json.dumps(losses))
