"""The `pocketlm` command: one entry point, each subcommand a thin call into an importable function.

Subcommands live in the modules of this package, one per pipeline stage: each module defines
`register(subs) -> {name: handler}`, and `build_parser` finds them all, so a new stage adds a module here
and touches nothing else. Every config field is a flag `--section.field` (with `--help` text and default
from config.py); the most used have short aliases. Errors a user can cause print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import pkgutil
import sys
import typing
from collections.abc import Callable
from typing import Any

from pocketlm import config as configlib
from pocketlm.errors import PocketLMError

Handler = Callable[[argparse.Namespace], int]

ALIASES = {
    "train.lr": ["--lr"], "train.max_steps": ["--max-steps"], "train.batch_size": ["--batch-size"],
    "train.grad_accum": ["--grad-accum"], "train.device": ["--device"], "train.compile": ["--compile"],
    "train.eval_interval": ["--eval-interval"], "train.strategy": ["--strategy"], "model.block_size": ["--block-size"],
    "data.tokenizer": ["--tokenizer"], "data.vocab_size": ["--vocab-size"], "data.separator": ["--separator"],
    "sample.prompt": ["--prompt"], "sample.max_new_tokens": ["--max-new-tokens"],
    "sample.temperature": ["--temperature"], "sample.top_k": ["--top-k"], "sample.top_p": ["--top-p"],
    "sample.repetition_penalty": ["--repetition-penalty"], "sample.num_samples": ["--num-samples", "-n"],
    "sample.stop": ["--stop"], "train.log": ["--log"], "train.wandb_project": ["--wandb-project"],
    "finetune.init_from": ["--init-from"], "finetune.add_special_tokens": ["--add-special-tokens"],
    "finetune.replay": ["--replay"], "finetune.freeze_layers": ["--freeze-layers"], "finetune.lora": ["--lora"],
    "finetune.lora_rank": ["--lora-rank"], "finetune.lora_alpha": ["--lora-alpha"],
    "finetune.lora_dropout": ["--lora-dropout"], "finetune.lora_targets": ["--lora-targets"],
    "finetune.lora_keep_adapter": ["--lora-keep-adapter"],
    "train.time_budget": ["--time-budget"], "train.optimizer": ["--optimizer"],
}


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so every error is one line; no abbreviated flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        raise PocketLMError(f"{self.prog}: {message} (see --help)")


def add_config_flags(p: argparse.ArgumentParser, sections: list[str], skip: set[str] = frozenset(),
                     extra_aliases: dict[str, list[str]] | None = None) -> None:
    aliases = {**ALIASES, **(extra_aliases or {})}
    for section in sections:
        group = p.add_argument_group(f"{section} config ({configlib.SECTIONS[section].__doc__.strip()})")
        for name, f in configlib.fields_of(section).items():
            key = f"{section}.{name}"
            if key in skip:
                continue
            flags = [f"--{key}"] + [a for a in aliases.get(key, []) if a not in p._option_string_actions]
            default = None if f.default is dataclasses.MISSING else f.default
            kind = _metavar(section, name)
            extra = {"nargs": "?", "const": "true"} if kind == "BOOL" else {}  # a bare --lora means true
            is_list = configlib._base_type(configlib._hints(section)[name]) is list  # repeatable
            group.add_argument(*flags, dest=key, default=argparse.SUPPRESS, metavar=kind,
                               action="append" if is_list else "store",
                               help=f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%"),
                               **extra)


def _metavar(section: str, name: str) -> str:
    tp = configlib._base_type(configlib._hints(section)[name])
    return {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR", list: "STR"}[tp]


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if "." in k}


def _parse(parser: Parser, argv: list[str]) -> argparse.Namespace:
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        sub = parser._subparsers._group_actions[0].choices.get(getattr(args, "command", ""), parser) \
            if parser._subparsers else parser
        options = list(sub._option_string_actions)
        close = difflib.get_close_matches(flag.split("=")[0], options, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else "; see --help"
        raise PocketLMError(f"unknown option {flag}{hint}" if flag.startswith("-") else f"unexpected argument {flag}")
    return args


def build_parser() -> tuple[Parser, dict[str, Handler]]:
    parser = Parser(prog="pocketlm", description="Train a small GPT on your own text and use it anywhere.")
    parser.add_argument("--version", action="version", version=_version())
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    handlers: dict[str, Handler] = {}
    names = sorted(m.name for m in pkgutil.iter_modules(__path__))
    for name in ["core"] + [n for n in names if n != "core"]:  # core first: its commands lead the help
        handlers.update(importlib.import_module(f"{__name__}.{name}").register(subs))
    return parser, handlers


def _version() -> str:
    from pocketlm import __version__

    return f"pocketlm {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    try:
        argv = sys.argv[1:] if argv is None else argv
        args = _parse(parser, argv)
        args.argv = argv
        if not args.command:
            parser.print_help()
            return 2
        return handlers[args.command](args)
    except PocketLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a path that cannot be read or written: name it, no traceback
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
