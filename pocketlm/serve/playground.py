"""The terminal playground: type a prompt, watch a sample stream, rate it or compare it with a second one.

Every rating and comparison goes into the same feedback database as the web page's (source 'terminal').
It reads plain lines from stdin, so it works in a pipe as well as at a prompt.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from pocketlm.generate import Engine, SamplingParams
from pocketlm.serve.feedback import FeedbackStore

HELP = """commands:
  a prompt line     generate a sample (type \\n for a newline)
  :set KEY VALUE    change max_new_tokens, temperature, top_k, top_p, repetition_penalty or seed
  :show             print the sampling settings
  :help             this text
  :quit or Ctrl-D   leave
after a sample: g = good, b = bad, c = compare with a second sample, enter = skip"""
SETTABLE = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float,
            "repetition_penalty": float, "seed": int}


class Playground:
    def __init__(self, model: str | Path, params: SamplingParams, db: str | Path | None, device: str,
                 name: str) -> None:
        self.engine = Engine.load(model, device)
        self.params = params
        self.store = FeedbackStore(db)
        self.name = name
        self.samples = 0  # seeds advance per sample so two samples of one prompt differ

    def _ask(self, text: str) -> str | None:
        print(text, end="", flush=True)
        line = sys.stdin.readline()
        return None if not line else line.rstrip("\n")

    def _sample(self, prompt: str) -> str:
        seed = None if self.params.seed is None else self.params.seed + self.samples
        self.samples += 1
        p = dataclasses.replace(self.params, seed=seed)
        pieces = []
        print(prompt, end="", flush=True)
        for piece in self.engine.stream(prompt, p):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        return "".join(pieces)

    def _meta(self) -> dict:
        return {"params": {k: v for k, v in dataclasses.asdict(self.params).items() if k != "stop_at_eot"}}

    def run(self) -> None:
        print(f"pocketlm playground: {self.name}; feedback -> {self.store.path}\n{HELP}", file=sys.stderr)
        try:
            while True:
                line = self._ask("\nprompt> ")
                if line is None or line.strip() in (":quit", ":q"):
                    break
                if line.startswith(":"):
                    self._command(line)
                    continue
                prompt = line.replace("\\n", "\n").replace("\\t", "\t")
                first = self._sample(prompt)
                answer = self._ask("[g]ood, [b]ad, [c]ompare with a second sample, enter = skip > ")
                if answer is None:
                    break
                answer = answer.strip().lower()
                if answer in ("g", "b"):
                    i = self.store.add("rating", prompt, source="terminal", model=self.name, completion=first,
                                       label=answer == "g", meta=self._meta())
                    print(f"saved rating #{i}")
                elif answer == "c":
                    self._compare(prompt, first)
        finally:
            self.store.close()
        print(file=sys.stderr)

    def _compare(self, prompt: str, first: str) -> None:
        print("--- B ---")
        second = self._sample(prompt)
        if second == first:
            print("the two samples are identical (greedy or same seed?): nothing to compare")
            return
        answer = (self._ask("which is better: [a] the first, [b] the second, enter = skip > ") or "").strip().lower()
        if answer in ("a", "b"):
            chosen, rejected = (first, second) if answer == "a" else (second, first)
            i = self.store.add("compare", prompt, source="terminal", model=self.name, chosen=chosen,
                               rejected=rejected, meta=self._meta())
            print(f"saved comparison #{i}")

    def _command(self, line: str) -> None:
        parts = line.split()
        if parts[0] == ":show":
            print({k: getattr(self.params, k) for k in SETTABLE})
        elif parts[0] == ":set" and len(parts) == 3 and parts[1] in SETTABLE:
            try:
                value = SETTABLE[parts[1]](parts[2])
                self.params = dataclasses.replace(self.params, **{parts[1]: value}).validate()
            except Exception as e:  # ValueError or PocketLMError: say it, keep the old setting
                print(f"cannot set {parts[1]}: {e}")
        else:
            print(HELP)
