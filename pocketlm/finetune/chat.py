"""Multi-turn chat over a saved model with its chat template: streaming, /reset, /system, history trimmed.

The conversation is rendered by the tokenizer's own template (the one SFT trained on) with the generation
prompt; when it no longer fits the context next to the reply, the oldest turns are dropped (the system
message stays), and as a last resort the prompt keeps only its most recent tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import replace
from typing import IO, Any

from pocketlm.errors import PocketLMError
from pocketlm.finetune import sft as sftlib
from pocketlm.generate import Engine, SamplingParams

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system message), /quit"


class Chat:
    def __init__(self, engine: Engine, tok: Any, params: SamplingParams, system: str = "") -> None:
        if not getattr(tok, "chat_template", None):
            raise PocketLMError("this model's tokenizer has no chat template: train it with `pocketlm sft` first")
        self.engine, self.tok, self.system = engine, tok, system
        self.params = replace(params, stop=[*params.stop, *sftlib.end_of_turn(tok)])
        self.history: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def prompt_ids(self) -> list[int]:
        """The rendered conversation, oldest turns dropped until it fits beside max_new_tokens."""
        budget = max(self.engine.block_size - self.params.max_new_tokens, self.engine.block_size // 2)
        while True:
            text = sftlib.render(self.tok, self.messages(), add_generation_prompt=True)
            ids = self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) <= budget or len(self.history) <= 1:
                return ids[-budget:]
            drop = 2 if len(self.history) > 2 and self.history[1]["role"] == "assistant" else 1
            del self.history[:drop]

    def reply(self, text: str) -> Iterator[str]:
        self.history.append({"role": "user", "content": text})
        pieces = []
        for piece in self.engine.stream(self.prompt_ids(), self.params):
            pieces.append(piece)
            yield piece
        self.history.append({"role": "assistant", "content": "".join(pieces).strip()})


def run(chat: Chat, stdin: IO[str], stdout: IO[str]) -> None:
    """The terminal loop: a line in, the reply streamed out; commands start with /."""
    tty = stdin.isatty()
    if tty:
        print(HELP, file=sys.stderr)
    while True:
        if tty:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            chat.history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/system"):
            chat.system = line[len("/system"):].strip()
            print(f"(system message {'set' if chat.system else 'cleared'})", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"(unknown command {line.split()[0]}; {HELP})", file=sys.stderr)
            continue
        print("assistant> ", end="", file=stdout, flush=True)
        for piece in chat.reply(line):
            print(piece, end="", file=stdout, flush=True)
        print(file=stdout, flush=True)
