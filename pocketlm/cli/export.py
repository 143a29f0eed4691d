"""`pocketlm export`: a model folder as a publishable HF folder, an ONNX decoder, or a static web page."""

from __future__ import annotations

import argparse
import json

from pocketlm.cli import Handler


def register(subs: argparse._SubParsersAction) -> dict[str, Handler]:
    e = subs.add_parser("export", help="export a model: hf (model card), onnx (KV-cache decoder), web (static page)",
                        formatter_class=argparse.HelpFormatter)
    e.add_argument("model", help="run folder (uses best/) or checkpoint folder")
    e.add_argument("--format", required=True, choices=["hf", "onnx", "web"], help="what to write")
    e.add_argument("--quantize", choices=["int8", "fp16", "q4"],
                   help="onnx: add this variant beside the fp32 model; web: ship only this variant "
                        "(default: fp32)")
    e.add_argument("--out", required=True, help="folder to write (refused if it exists and is not empty)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    w = e.add_argument_group("web page options")
    w.add_argument("--model-id", help="the model's name inside the page and its folder (default: the run's name)")
    w.add_argument("--title", help="the page title (default: the model id)")
    w.add_argument("--prompt", dest="default_prompt", help="the prompt the page starts with (default: the run's)")
    w.add_argument("--no-webgpu", dest="webgpu", action="store_const", const=False,
                   help="leave the WebGPU runtime out (27 MB on disk; its 25.5 MiB WASM file is over Cloudflare "
                        "Pages' 25 MiB limit): the page always runs on WASM")
    w.add_argument("--npm-cache", help="where the pinned npm packages are installed once "
                                       "(default: ~/.cache/pocketlm/npm)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    return {"export": cmd_export}


def cmd_export(args: argparse.Namespace) -> int:
    from pocketlm import export as exp

    from pocketlm.errors import PocketLMError

    options = {k: getattr(args, k) for k in ("model_id", "title", "default_prompt", "npm_cache", "webgpu")
               if getattr(args, k) is not None}
    if "default_prompt" in options:  # the same \n and \t escapes as `pocketlm generate --prompt`
        options["default_prompt"] = options["default_prompt"].replace("\\n", "\n").replace("\\t", "\t")
    if options and args.format != "web":
        first = next(iter(options))
        flag = "--" + {"default_prompt": "prompt", "webgpu": "no-webgpu"}.get(first, first).replace("_", "-")
        raise PocketLMError(f"{flag} is a web page option: use it with --format web")
    report = exp.export(args.model, args.format, args.out, quantize=args.quantize, overwrite=args.overwrite,
                        **options)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"exported {args.model} -> {args.out} ({args.format})")
    if args.format == "hf":
        print(f"  {report['parameters'] / 1e6:.2f}M parameters; {exp.mb(report['model_bytes'])}; "
              f"files: {', '.join(report['files'])}")
    elif args.format == "onnx":
        from pocketlm.export import onnx

        print("\n".join(onnx.summary(report)))
    else:
        from pocketlm.export import web

        print("\n".join(web.summary(report)))
    return 0
