"""Serving commands: serve (HTTP API + web playground), playground (terminal), feedback export, tune."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pocketlm.cli import Handler, add_config_flags, config_overrides
from pocketlm.cli.core import add_sampling_flags
from pocketlm.errors import PocketLMError

DB_HELP = ("feedback database (default: $POCKETLM_FEEDBACK_DB, else $XDG_DATA_HOME/pocketlm/feedback.db, "
           "i.e. ~/.local/share/pocketlm/feedback.db)")


def register(subs: argparse._SubParsersAction) -> dict[str, Handler]:
    fmt = argparse.ArgumentDefaultsHelpFormatter

    s = subs.add_parser("serve", help="OpenAI-compatible HTTP API and web playground for a model", formatter_class=fmt)
    s.add_argument("model", help="run folder (uses best/) or checkpoint folder")
    s.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 serves other machines too")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port)")
    s.add_argument("--api-key", default=os.environ.get("POCKETLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every /v1 route (default: $POCKETLM_API_KEY)")
    s.add_argument("--name", help="model id in the API (default: the run folder's name)")
    s.add_argument("--max-concurrency", type=int, default=8, help="requests in flight before answering 429")
    s.add_argument("--max-batch", type=int, default=16,
                   help="sequences generated together by continuous batching (1 = one at a time)")
    s.add_argument("--max-tokens-cap", type=int, default=1024, help="the largest max_tokens a request may ask for")
    s.add_argument("--max-n", type=int, default=8, help="the largest n (samples per request)")
    s.add_argument("--max-request-bytes", type=int, default=64 * 1024, help="the largest request body")
    s.add_argument("--db", help=DB_HELP)
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")

    p = subs.add_parser("playground", help="terminal playground: generate, rate, compare two samples",
                        formatter_class=argparse.HelpFormatter)
    p.add_argument("model", help="run folder (uses best/) or checkpoint folder")
    p.add_argument("--db", help=DB_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    add_sampling_flags(p, skip={"sample.prompt", "sample.num_samples"}, seed_help="first sampling seed")

    f = subs.add_parser("feedback", help="export collected ratings and comparisons", formatter_class=fmt)
    fsubs = f.add_subparsers(dest="feedback_command", metavar="ACTION", parser_class=type(f))
    e = fsubs.add_parser("export", help="write feedback as JSONL (ratings; chosen/rejected pairs)", formatter_class=fmt)
    e.add_argument("--out", required=True, help="JSONL file to write")
    e.add_argument("--db", help=DB_HELP)
    e.add_argument("--model", help="only feedback collected on this model id")
    st = fsubs.add_parser("stats", help="count the events in the database", formatter_class=fmt)
    st.add_argument("--db", help=DB_HELP)
    return {"serve": cmd_serve, "playground": cmd_playground, "feedback": cmd_feedback, **register_tune(subs)}


def model_id(path: str | Path) -> str:
    """runs/gtx/best -> 'gtx'; any other checkpoint folder -> its name."""
    from pocketlm import checkpoint as ckpt

    folder = ckpt.resolve(path).resolve()
    return folder.parent.name if folder.name in ("best", "last") else folder.name


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    from pocketlm.serve.app import ServeOptions, build, make_server

    if not 0 <= args.port <= 65535:
        raise PocketLMError(f"--port must be in 0..65535, got {args.port}")
    opts = ServeOptions(model_name=args.name or model_id(args.model), api_key=args.api_key,
                        max_concurrency=args.max_concurrency, max_batch=args.max_batch,
                        max_tokens_cap=args.max_tokens_cap, max_n=args.max_n,
                        max_request_bytes=args.max_request_bytes, loopback_only=_is_loopback(args.host)).validate()
    app, engine, store = build(args.model, opts, args.db, args.device)
    server, sock = make_server(app, args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"pocketlm serve: {opts.model_name} ({engine.model.num_params() / 1e6:.2f}M parameters, context "
          f"{engine.block_size}, {engine.device}) on http://{shown}:{port}/  API: http://{shown}:{port}/v1"
          f"{'  (API key required)' if opts.api_key else ''}\nfeedback -> {store.path}", file=sys.stderr, flush=True)
    if not opts.loopback_only and not opts.api_key:
        print("warning: serving beyond this machine without --api-key: anyone who can reach the port can use it",
              file=sys.stderr)
    try:
        server.run(sockets=[sock])
    finally:
        store.close()
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    from pocketlm.serve.feedback import FeedbackStore, export

    if not args.feedback_command:
        raise PocketLMError("pocketlm feedback: give an action: export or stats (see --help)")
    if not args.db and not _default_db_exists():
        raise PocketLMError("no feedback collected yet: the default database does not exist; pass --db PATH")
    store = FeedbackStore(args.db)
    try:
        if args.feedback_command == "stats":
            c = store.count()
            print(f"{store.path}: {c['rating']} ratings, {c['compare']} comparisons")
            return 0
        counts = export(store, args.out, args.model)
    finally:
        store.close()
    print(f"wrote {counts['ratings']} ratings and {counts['pairs']} chosen/rejected pairs to {args.out}")
    return 0


def _default_db_exists() -> bool:
    from pocketlm.serve.feedback import default_path

    return default_path().is_file()


def cmd_playground(args: argparse.Namespace) -> int:
    from pocketlm import config as configlib
    from pocketlm.cli.core import _sampling
    from pocketlm.serve.playground import Playground

    run_config = Path(args.model) / "config.yaml"
    base = configlib.load(run_config) if run_config.is_file() else configlib.Config()
    s = configlib.apply(base, config_overrides(args), from_string=True).validate().sample
    Playground(args.model, _sampling(s), args.db, args.device, model_id(args.model)).run()
    return 0


def register_tune(subs: argparse._SubParsersAction) -> dict[str, Handler]:
    t = subs.add_parser("tune", help="preference-tune a model on feedback (DPO from pairs, KTO from ratings)",
                        formatter_class=argparse.HelpFormatter)
    t.add_argument("model", help="run folder (uses best/), checkpoint or transformers model folder to start from "
                                 "(and stay close to)")
    t.add_argument("--feedback", required=True, help="JSONL from `pocketlm feedback export`")
    t.add_argument("--method", choices=["dpo", "kto"], default="dpo",
                   help="dpo: chosen/rejected pairs; kto: thumbs up/down ratings (default: dpo)")
    t.add_argument("--beta", type=float, default=0.1,
                   help="strength of the pull towards the reference model: higher stays closer (default: 0.1)")
    t.add_argument("--data", help="prepared dataset to watch the LM loss on (default: the base run's dataset)")
    t.add_argument("--config", help="YAML file or preset for the train section")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    add_config_flags(t, ["train"], extra_aliases={"train.out": ["--out"]})
    return {"tune": cmd_tune}


def cmd_tune(args: argparse.Namespace) -> int:
    from pocketlm.preference import tune

    overrides = config_overrides(args)
    out = overrides.pop("train.out", None)
    if not out:
        raise PocketLMError("pocketlm tune: pass --out RUN_DIR for the tuned model")
    state = tune(args.model, args.feedback, out, args.method, args.beta, preset=args.config,
                 cli_overrides=overrides, lm_data=args.data, resume=args.resume, overwrite=args.overwrite)
    if state.interrupted:
        return 130
    last = {k: v for r in state.history for k, v in r.items() if k.startswith(("val/rewards", "lm/"))}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items())
    print(f"tuned {state.step} steps -> {out}/best and {out}/last" + (f"; {shown}" if shown else ""))
    return 0
