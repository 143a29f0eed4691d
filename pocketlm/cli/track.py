"""Evaluation and tracking commands: eval (metrics on a split, sample quality, memorisation), compare."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pocketlm.cli import Handler, config_overrides
from pocketlm.cli.core import add_sampling_flags
from pocketlm.errors import PocketLMError


def register(subs: argparse._SubParsersAction) -> dict[str, Handler]:
    e = subs.add_parser("eval", help="metrics on a dataset split; sample quality and memorisation (--samples)")
    e.add_argument("model", help="run folder (uses best/), pocketlm checkpoint, or Hugging Face causal LM folder")
    e.add_argument("--data", help="prepared dataset to score (default: the run's own dataset)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to score (default: test)")
    e.add_argument("--top-k-acc", type=int, default=10, metavar="K", help="k of the top-k accuracy (default: 10)")
    e.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    e.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens of the split (default: 0 = all)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    e.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: 0 = torch's default)")
    e.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    e.add_argument("--out", metavar="FILE", help="also write the result to FILE (.json: JSON, else Markdown)")
    e.add_argument("--samples", type=int, default=0, metavar="K",
                   help="generate K samples and report their quality and memorisation (default: 0 = off)")
    e.add_argument("--prompt-file", metavar="FILE", help="prompts for --samples, one per line (\\n for newlines); "
                   "samples are spread over them (default: --prompt)")
    e.add_argument("--ngram", type=int, default=8, help="word n-gram length of the memorisation check (default: 8)")
    e.add_argument("--train-data", metavar="DATASET",
                   help="dataset whose train split the samples are checked against (default: the run's dataset)")
    e.add_argument("--report", metavar="FILE", help="write the samples' Markdown report here (default: stdout)")
    e.add_argument("--quiet", action="store_true", help="no progress output")
    add_sampling_flags(e, skip={"sample.num_samples"})  # generate's flags; --samples K is the count

    c = subs.add_parser("compare", help="runs side by side: final/best metrics, config and data differences, curves")
    c.add_argument("runs", nargs="+", help="run folders")
    c.add_argument("--metric", default="val/loss", help="metric to rank by, e.g. val/bpb (default: val/loss)")
    c.add_argument("--plot", default="compare.png", help="loss-curve PNG to write (default: compare.png)")
    c.add_argument("--out", metavar="FILE", help="also write the Markdown report to FILE")
    return {"eval": cmd_eval, "compare": cmd_compare}


def run_dataset(model: str) -> str | None:
    """The dataset a run or checkpoint was trained on, from its config (None for foreign models)."""
    import yaml

    p = Path(model)
    if (p / "config.yaml").is_file():  # a run folder
        try:
            return (yaml.safe_load((p / "config.yaml").read_text(encoding="utf-8")) or {})["data"]["path"] or None
        except (yaml.YAMLError, KeyError, TypeError):
            return None
    for f in (p / "trainer_state.json", p / "best" / "trainer_state.json", p / "last" / "trainer_state.json"):
        if f.is_file():  # a checkpoint written by the trainer carries the run's config
            try:
                return json.loads(f.read_text(encoding="utf-8"))["config"]["data"]["path"] or None
            except (ValueError, KeyError, TypeError):
                return None
    return None


def _write(path: str, text: str) -> None:
    from pocketlm.atomic import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def cmd_eval(args: argparse.Namespace) -> int:
    from pocketlm import evaluate as ev

    for name in ("batch_size", "top_k_acc"):
        if getattr(args, name) < 1:
            raise PocketLMError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_tokens < 0 or args.samples < 0 or args.threads < 0:
        raise PocketLMError("--max-tokens, --samples and --threads must be >= 0")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    own = run_dataset(args.model)
    data = args.data or (own if not args.samples else None)
    if not data and not args.samples:
        raise PocketLMError(f"no dataset to score: pass --data DATASET ({args.model} names none in its config)")
    lm = ev.load_lm(args.model, args.device)
    if data:
        result = ev.evaluate_split(lm, data, args.split, args.top_k_acc, args.batch_size, args.max_tokens,
                                   verbose=not args.quiet)
        text = json.dumps(result, indent=2) if args.json else ev.format_table(result) + \
            f"\n({result['tokens_per_s']:,} tokens/s on {lm.device})"
        print(text)
        if args.out:
            _write(args.out, json.dumps(result, indent=2) + "\n" if args.out.endswith(".json")
                   else ev.format_table(result) + "\n")
    if args.samples:
        _samples(args, lm, own)
    return 0


def _samples(args: argparse.Namespace, lm: Any, own: str | None) -> None:
    from pocketlm import config as configlib
    from pocketlm import evaluate as ev
    from pocketlm.cli.core import _sampling, _unescape
    from pocketlm.textindex import index_for_dataset

    run_config = Path(args.model) / "config.yaml"
    base = configlib.load(run_config) if run_config.is_file() else configlib.Config()
    s = configlib.apply(base, config_overrides(args), from_string=True).validate().sample
    if args.prompt_file:
        try:
            lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise PocketLMError(f"{args.prompt_file} is not UTF-8 text") from None
        prompts = [_unescape(x) for x in lines if x.strip()]
        if not prompts:
            raise PocketLMError(f"{args.prompt_file} holds no prompts (one per line)")
    else:
        prompts = [_unescape(s.prompt)]
    train_data = args.train_data or own
    index = None
    about = [f"model: `{lm.folder}`", f"sampling: temperature {s.temperature}, top-k {s.top_k}, top-p {s.top_p}, "
             f"max {s.max_new_tokens} new tokens, seed {s.seed}; {args.samples} samples over {len(prompts)} prompt(s)"]
    if train_data:
        index = index_for_dataset(train_data, verbose=not args.quiet)
        about.append(f"training text: `{train_data}` train split ({index.meta['bytes']:,} bytes, "
                     f"{index.meta['documents']:,} documents, suffix-array index)")
    else:
        about.append("memorisation not checked: no training data known (pass --train-data DATASET)")
    samples = ev.generate_samples(lm, prompts, args.samples, _sampling(s))
    summary = ev.score_samples(samples, index, args.ngram)
    report = ev.samples_markdown(f"Samples from {args.model}", samples, summary, about)
    if args.report:
        _write(args.report, report)
        print(f"wrote {args.report}: {len(samples)} samples", file=sys.stderr)
    else:
        print(report)


def cmd_compare(args: argparse.Namespace) -> int:
    from pocketlm.compare import compare

    report = compare(args.runs, args.metric, args.plot)
    print(report, end="")
    if args.out:
        _write(args.out, report)
    print(f"wrote {args.plot}", file=sys.stderr)
    return 0
