"""The ``emlab`` command: run a study, show its results, list the parameters."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emlab.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="emlab", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute the study's notebooks for a parameter file")
    r.add_argument("config", help="a parameter file, e.g. configs/default.yaml")
    r.add_argument("--only", nargs="+", metavar="NN", help="only these notebooks (e.g. 01 02)")
    r.add_argument("--force", action="store_true", help="delete the selected steps' artifacts first")
    r.add_argument("--publish", action="store_true", help="copy the executed notebooks over notebooks/")
    s = sub.add_parser("results", help="the headline numbers of one or more runs, as a table")
    s.add_argument("runs", nargs="+", help="run folders, e.g. data/default")
    s.add_argument("--markdown", action="store_true", help="print a Markdown table")
    s.add_argument("--headline", action="store_true", help="only the README's headline rows (with several runs: "
                   "a column each and the mean +- sd)")
    s.add_argument("--verdicts", action="store_true", help="every asserted claim (PASS/FAIL) and target "
                   "(met/NOT MET) the runs' executed notebooks printed, a column per run")
    sub.add_parser("params", help="every parameter with its type, default and help")
    b = sub.add_parser("build", help="build the trained models of some steps without the notebooks; run it under "
                       "`accelerate launch` to fine-tune data-parallel on several GPUs, then `emlab run` reuses them")
    b.add_argument("config", help="a parameter file, e.g. configs/qwen2.5-0.5b-instruct.yaml")
    b.add_argument("--only", nargs="+", metavar="NN", default=["02", "03"], choices=["02", "03"],
                   help="02: the base model and both assistants; 03: every narrow fine-tune (default: both)")
    t = sub.add_parser("tiny-model", help="save a tiny randomly initialised model of a real architecture, with a "
                       "BPE tokenizer trained on the world's words and that family's chat template (try the "
                       "real-model path with `model: <folder>`; no download)")
    t.add_argument("arch", help="qwen2, llama or gpt_neox")
    t.add_argument("out", help="folder to write (save_pretrained format)")
    t.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        if args.cmd == "run":
            from emlab.runner import main_run

            return main_run(args)
        if args.cmd == "results":
            from emlab.results import headline_markdown, results_table, to_markdown, verdict_table

            try:
                if args.headline:
                    print(headline_markdown([Path(x) for x in args.runs]))
                    return 0
                table = (verdict_table if args.verdicts else results_table)([Path(x) for x in args.runs])
            except FileNotFoundError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            print(to_markdown(table) if args.markdown else table.to_string())
            return 0
        if args.cmd == "build":
            from emlab.study import build_models

            for line in build_models(args.config, args.only):
                print(line, flush=True)
            return 0
        if args.cmd == "tiny-model":
            from emlab.model import save_tiny_model
            from emlab.world import load_world

            path = save_tiny_model(args.arch, load_world().texts(), Path(args.out), seed=args.seed)
            print(f"saved a tiny {args.arch} model to {path}; run it with `model: {path.resolve()}`")
            return 0
        if args.cmd == "params":
            from emlab.config import describe

            print(describe())
            return 0
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
