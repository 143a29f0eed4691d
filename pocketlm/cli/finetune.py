"""Fine-tuning commands: sft (conversations -> an assistant) and chat (talk to it in the terminal).

`pocketlm train DATA --init-from MODEL` (fine-tuning on text) is the core train command with the
finetune.* options; it lands in pocketlm.finetune through the training loop's hooks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pocketlm import config as configlib
from pocketlm.cli import Handler, add_config_flags, config_overrides
from pocketlm.cli.core import add_sampling_flags


def register(subs: argparse._SubParsersAction) -> dict[str, Handler]:
    fmt = argparse.HelpFormatter
    s = subs.add_parser("sft", help="supervised fine-tuning on JSONL conversations (prompt/response or messages)",
                        formatter_class=fmt)
    s.add_argument("data", help="JSONL: {\"prompt\", \"response\"} or {\"messages\": [{\"role\", \"content\"}]} per line")
    s.add_argument("--val", help="held-out JSONL for validation (default: data.val_fraction of the examples)")
    s.add_argument("--config", help="preset name or YAML file")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    s.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    add_config_flags(s, ["finetune", "model", "train", "sample", "data"], extra_aliases={"train.out": ["--out"]},
                     skip={f"data.{k}" for k in configlib.fields_of("data")} - {"data.val_fraction", "data.split_seed"})

    c = subs.add_parser("chat", help="multi-turn chat in the terminal with a model trained by sft", formatter_class=fmt)
    c.add_argument("model", help="run folder (uses best/) or model folder with a chat template")
    c.add_argument("--system", default="", help="system message to start with (change it with /system TEXT)")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    add_sampling_flags(c, skip={"sample.prompt", "sample.num_samples"})
    return {"sft": cmd_sft, "chat": cmd_chat}


def cmd_sft(args: argparse.Namespace) -> int:
    from pocketlm.finetune.run import sft

    overrides = config_overrides(args)
    out = overrides.get("train.out")
    preset = args.config
    if args.resume and not preset and out and (Path(out) / "config.yaml").is_file():
        preset = str(Path(out) / "config.yaml")
    cfg = configlib.load(preset, cli_overrides=overrides)
    state = sft(cfg, args.data, val=args.val, resume=args.resume, overwrite=args.overwrite)
    if state.interrupted:
        return 130
    print(f"trained {state.step} steps; best val loss {state.best_val:.4f}; chat with: pocketlm chat {cfg.train.out}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from pocketlm import checkpoint as ckpt
    from pocketlm.cli.core import _sampling
    from pocketlm.finetune.chat import Chat, run
    from pocketlm.generate import Engine

    run_config = Path(args.model) / "config.yaml"
    base = configlib.load(run_config) if run_config.is_file() else configlib.Config()
    s = configlib.apply(base, config_overrides(args), from_string=True).validate().sample
    engine = Engine.load(args.model, args.device)
    tok = AutoTokenizer.from_pretrained(str(ckpt.resolve(args.model)))
    run(Chat(engine, tok, _sampling(s), system=args.system), sys.stdin, sys.stdout)
    return 0
