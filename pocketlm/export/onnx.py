"""ONNX export: the decoder with past key values, in the folder layout transformers.js and ONNX Runtime load.

The transformers model loaded from the checkpoint folder is wrapped so that its inputs and outputs are flat
tensors with the names transformers.js (and Optimum's exports) use:
  inputs   input_ids, attention_mask, position_ids, past_key_values.{i}.key|value   (B, heads, past, head_dim)
  outputs  logits, present.{i}.key|value                                            (B, heads, past + T, head_dim)
The batch axis is named exactly `batch_size`: transformers.js reads that name to size the empty first-step
cache (any other name makes it 0). Exported with torch.onnx's TorchScript tracer at opset 18, which keeps
the past length dynamic down to 0 (the first step); the torch.export-based exporter specialises 0-sized axes.

Variants (transformers.js names them by dtype): onnx/model.onnx (fp32), model_quantized.onnx (int8 dynamic
quantization, "q8"), model_fp16.onnx and model_q4.onnx (4-bit block-wise MatMulNBits).

Every export is checked here, in Python: `OrtDecoder` runs the KV-cache loop in onnxruntime and is compared
with the transformers model in PyTorch over the same tokens (max |logits diff|, greedy agreement).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocketlm import export as common
from pocketlm.errors import PocketLMError

OPSET = 18
VARIANT_FILES = {None: "model.onnx", "int8": "model_quantized.onnx", "fp16": "model_fp16.onnx", "q4": "model_q4.onnx"}
JS_DTYPES = {None: "fp32", "int8": "q8", "fp16": "fp16", "q4": "q4"}  # transformers.js `dtype` per variant
CHECK_TOKENS = 200
CHECK_PROMPT = "\n"
# fp32 computes the model's own function: ONNX Runtime and PyTorch differ only in the order of float32
# operations (~1e-6 of the logits' scale even through many layers). A difference above this share of the
# scale is a wrong graph (a mask, a position, dropout left on), so the export fails instead of shipping it.
# Quantized variants (int8, fp16, q4) are derived from that checked graph and differ by their rounding
# (int8 ~1e-2, q4 ~5e-2 on a tiny model): they are measured and reported, not failed.
FP32_TOLERANCE = 1e-4


def _require() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise PocketLMError("ONNX export needs onnx and onnxruntime: pip install 'pocketlm[export]'") from None


# ---- export ---------------------------------------------------------------------------------------------

def load_torch(folder: Path) -> torch.nn.Module:
    """The transformers model, in float32 with eager attention (traceable, and the reference for checks)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    except Exception as e:  # a config or weight file transformers cannot read
        raise PocketLMError(f"transformers cannot load {folder}: {str(e).splitlines()[0][:200]}") from None
    return model.eval()


def context_length(model: torch.nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "n_positions", None) or cfg.max_position_embeddings)


class _Decoder(torch.nn.Module):
    """Flat tensors in and out around a transformers causal LM and its DynamicCache."""

    def __init__(self, model: torch.nn.Module, n_layer: int) -> None:
        super().__init__()
        self.model, self.n_layer = model, n_layer

    def forward(self, input_ids, attention_mask, position_ids, *past):  # noqa: ANN001, ANN201 - traced
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.n_layer)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def kv_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head dim), read off one real forward pass rather than per-architecture fields."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros((1, 1), dtype=torch.long), use_cache=True)
    layers = out.past_key_values.layers
    _, heads, _, hs = layers[0].keys.shape
    return len(layers), heads, hs


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export_decoder(model: torch.nn.Module, path: Path) -> None:
    """Trace the decoder with a non-empty past (so the cache path is recorded) and dynamic axes."""
    n_layer, heads, hs = kv_shape(model)
    inputs, outputs = io_names(n_layer)
    B, P, T = 2, 3, 5  # distinct sizes, none equal to 1, so no axis is mistaken for a broadcast
    ids = torch.randint(0, model.config.vocab_size, (B, T))
    mask = torch.ones((B, P + T), dtype=torch.long)
    pos = torch.arange(P, P + T).expand(B, T)
    past = [torch.randn(B, heads, P, hs) for _ in range(2 * n_layer)]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in inputs[3:]})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in outputs[1:]})
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes we keep dynamic
        # torch.onnx.export traces in eval mode, then sets the module it was given (and so every module under
        # it) back to that module's mode: a wrapper left in train mode would hand the model back in train mode,
        # with dropout on in the PyTorch reference the export is checked against
        wrapper = _Decoder(model, n_layer).train(model.training)
        torch.onnx.export(wrapper, (ids, mask, pos, *past), str(path), input_names=inputs,
                          output_names=outputs, dynamic_axes=axes, opset_version=OPSET, dynamo=False)


def _tied_pair(graph) -> tuple[str, str] | None:  # noqa: ANN001 - onnx.GraphProto
    """(embedding, head) initializer names when the head is the embedding transposed (tied weights): the
    tracer stores the matrix twice, once for the Gather and once, folded, for the head's MatMul."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    gathers = [n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits]
    for emb in gathers:
        e = numpy_helper.to_array(inits[emb])
        if e.ndim != 2:
            continue
        for n in graph.node:
            if n.op_type == "MatMul" and n.input[1] in inits and tuple(inits[n.input[1]].dims) == e.shape[::-1]:
                if np.array_equal(numpy_helper.to_array(inits[n.input[1]]), e.T):
                    return emb, n.input[1]
    return None


def share_tied_fp(path: Path) -> None:
    """A float model: the head reads Transpose(embedding) instead of its own copy (onnxruntime folds the
    transpose once at load), so the file holds the matrix once."""
    import onnx

    model = onnx.load(str(path))
    pair = _tied_pair(model.graph)
    if pair is None:
        return
    emb, head = pair
    keep = [i for i in model.graph.initializer if i.name != head]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.node.insert(0, onnx.helper.make_node("Transpose", [emb], [head], perm=[1, 0], name="tied_head"))
    onnx.save(model, str(path))


def share_tied_int8(path: Path, emb: str, head: str) -> None:
    """An int8 model: the embedding lookup gathers columns of the head's int8 matrix (axis 1), transposes
    them back and dequantizes with the head's scale, so the quantized matrix is stored once."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    q, scale, zp = f"{head}_quantized", f"{head}_scale", f"{head}_zero_point"
    inits = {i.name for i in g.initializer}
    if not {q, scale, zp} <= inits:
        return  # the head was not quantized as one int8 matrix: nothing to share
    gathers = [n for n in g.node if n.op_type == "Gather" and n.input[0] == f"{emb}_quantized"]
    for gather in gathers:
        deq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] == gather.output[0]]
        if len(deq) != 1:
            continue
        old = [gather.input[0], deq[0].input[1], deq[0].input[2]]
        cols = gather.output[0] + "_cols"
        gather.input[0] = q
        gather.attribute.extend([onnx.helper.make_attribute("axis", 1)])
        gather.output[0] = cols  # (E, B, T) -> (B, T, E)
        at = list(g.node).index(gather) + 1
        g.node.insert(at, onnx.helper.make_node("Transpose", [cols], [deq[0].input[0]], perm=[1, 2, 0],
                                                name=gather.name + "_tied"))
        deq[0].input[1], deq[0].input[2] = scale, zp
        used = {x for n in g.node for x in n.input}
        keep = [i for i in g.initializer if i.name not in old or i.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
        onnx.save(model, str(path))
        return


def quantize(src: Path, kind: str, dst: Path) -> None:
    """int8: dynamic quantization (weights int8, activations quantized at run time); fp16; q4: MatMulNBits."""
    import onnx

    tied = _tied_pair(onnx.load(str(src)).graph)
    if kind == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # onnxruntime logs a "consider pre-processing" hint meant for CNNs
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        if tied:
            share_tied_int8(dst, *tied)
        return
    model = onnx.load(str(src))
    if kind == "fp16":
        try:
            from onnxruntime.transformers.float16 import convert_float_to_float16
        except ImportError:
            raise PocketLMError("this onnxruntime has no float16 converter (onnxruntime.transformers.float16); "
                                "upgrade onnxruntime or use --quantize int8") from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = convert_float_to_float16(model, keep_io_types=False)
        onnx.save(model, str(dst))
        share_tied_fp(dst)
        return
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError:
        raise PocketLMError("this onnxruntime has no 4-bit quantizer (MatMulNBitsQuantizer, onnxruntime >= 1.17); "
                            "upgrade onnxruntime or use --quantize int8") from None
    q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True)
    quiet = [logging.getLogger(n) for n in ("onnxruntime.quantization.matmul_nbits_quantizer",
                                             "onnxruntime.quantization")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)  # one INFO line per quantized matmul otherwise
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            q.process()
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    q.model.save_model_to_file(str(dst), use_external_data_format=False)


# ---- running it: the KV-cache loop in onnxruntime, and the PyTorch reference -----------------------------

class OrtDecoder:
    """An exported decoder in onnxruntime, fed one chunk of tokens at a time with the cache carried along."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.dtype = np.float16 if self.past_inputs[0].type == "tensor(float16)" else np.float32
        self.reset()

    def reset(self) -> None:
        self.past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=self.dtype) for i in self.past_inputs}
        self.pos = 0

    def __call__(self, ids: list[int]) -> np.ndarray:
        """Logits (V,) after the last of `ids`, which follow the tokens already cached."""
        T = len(ids)
        feed = {"input_ids": np.array([ids], dtype=np.int64),
                "attention_mask": np.ones((1, self.pos + T), dtype=np.int64),
                "position_ids": np.arange(self.pos, self.pos + T, dtype=np.int64)[None], **self.past}
        logits, *present = self.session.run(None, feed)
        self.past = {i.name: p for i, p in zip(self.past_inputs, present)}
        self.pos += T
        return logits[0, -1].astype(np.float32)


class TorchDecoder:
    """The same interface over the transformers model in PyTorch: the reference the export is checked against."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.cache, self.pos = None, 0

    @torch.inference_mode()
    def __call__(self, ids: list[int]) -> np.ndarray:
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache(config=self.model.config)
        T = len(ids)
        out = self.model(input_ids=torch.tensor([ids]), attention_mask=torch.ones((1, self.pos + T), dtype=torch.long),
                         position_ids=torch.arange(self.pos, self.pos + T)[None], past_key_values=self.cache,
                         use_cache=True)
        self.pos += T
        return out.logits[0, -1].float().numpy()


def decode(step: OrtDecoder | TorchDecoder, prompt: list[int], n: int, window: int,
           choose: Callable[[int, np.ndarray], int] | None = None,
           on_logits: Callable[[np.ndarray], None] | None = None) -> list[int]:
    """n tokens after `prompt` (greedy unless `choose(i, logits)` picks), windowed exactly like
    pocketlm.generate.Engine: the prompt's last `window` tokens are prefilled; when the cache is full the last
    3/4 of the window is prefilled again (learned positions cannot be shifted inside a cache)."""
    step.reset()
    context = list(prompt)
    logits = step(context[-window:])
    out: list[int] = []
    for i in range(n):
        if on_logits is not None:
            on_logits(logits)
        tok = int(np.argmax(logits)) if choose is None else choose(i, logits)
        out.append(tok)
        context.append(tok)
        if step.pos < window:
            logits = step([tok])
        else:
            step.reset()
            logits = step(context[-(window - window // 4):])
    return out


def reference(model: torch.nn.Module, prompt: list[int], n: int = CHECK_TOKENS) -> tuple[list[int], list[np.ndarray]]:
    """PyTorch's greedy continuation and the logits at every step."""
    logits: list[np.ndarray] = []
    was = model.training
    model.eval()  # dropout off: the reference is the model's deterministic function, as the export computes it
    try:
        ids = decode(TorchDecoder(model), prompt, n, context_length(model), on_logits=logits.append)
    finally:
        model.train(was)
    return ids, logits


def check(model: torch.nn.Module, onnx_path: Path, prompt: list[int], n: int = CHECK_TOKENS,
          ref: tuple[list[int], list[np.ndarray]] | None = None) -> dict[str, Any]:
    """Compare an exported variant with PyTorch over n greedy tokens through the KV-cache path.

    `max_abs_diff`: the largest |logit difference| at any step, the ONNX model fed PyTorch's greedy tokens
    (teacher-forced, so one early flip does not hide the rest); `argmax_agree`: steps where both pick the same
    next token; `greedy_identical`: the ONNX model's own greedy continuation equals PyTorch's."""
    window = context_length(model)
    ref_ids, ref_logits = ref or reference(model, prompt, n)
    ort_dec = OrtDecoder(onnx_path)
    diffs, agree = [], 0

    def forced(i: int, logits: np.ndarray) -> int:
        nonlocal agree
        diffs.append(float(np.abs(logits - ref_logits[i]).max()))
        agree += int(np.argmax(logits)) == ref_ids[i]
        return ref_ids[i]

    decode(ort_dec, prompt, n, window, choose=forced)
    own = decode(ort_dec, prompt, n, window)
    first_diff = next((i for i, (a, b) in enumerate(zip(own, ref_ids)) if a != b), None)
    return {"tokens": n, "max_abs_diff": max(diffs), "argmax_agree": agree, "greedy_identical": own == ref_ids,
            "greedy_same_prefix": n if first_diff is None else first_diff, "greedy_ids": own}


def verify_fp32(res: dict[str, Any], ref: tuple[list[int], list[np.ndarray]], folder: Path) -> None:
    """The fp32 export must compute what PyTorch does (FP32_TOLERANCE of the logits' scale), or fail."""
    scale = max(1.0, max(float(np.abs(x).max()) for x in ref[1]))
    allowed = FP32_TOLERANCE * scale
    if not res["max_abs_diff"] <= allowed:  # NaN fails too
        raise PocketLMError(f"the fp32 ONNX export of {folder} does not compute what the model does in PyTorch: "
                            f"max |logits - PyTorch| {res['max_abs_diff']:.2e} > {allowed:.1e} ({FP32_TOLERANCE:g} of "
                            f"the logits' scale {scale:.3g}), argmax agrees {res['argmax_agree']}/{res['tokens']}; "
                            "nothing was written: this architecture variant does not export correctly, please "
                            "report it")


# ---- the command ------------------------------------------------------------------------------------------

def _say(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"pocketlm export: {msg}", file=sys.stderr, flush=True)


def build(folder: Path, out: Path, quantize_kind: str | None, verbose: bool = True, keep_fp32: bool = True,
          check_tokens: int = CHECK_TOKENS) -> dict[str, Any]:
    """Write config, generation config, tokenizer and onnx/ into `out`; check every variant against PyTorch."""
    from pocketlm import tokenizer as toklib

    _require()
    common.copy_model_files(folder, out, weights=False)
    model = load_torch(folder)
    t0 = time.perf_counter()
    fp32 = out / "onnx" / VARIANT_FILES[None]
    _say(verbose, f"tracing the decoder with past key values (opset {OPSET})")
    try:
        export_decoder(model, fp32)
    except PocketLMError:
        raise
    except Exception as e:  # an architecture variant the tracer cannot follow
        raise PocketLMError(f"the ONNX exporter failed on {folder}: {str(e).splitlines()[0][:200]}") from None
    variants = [None] if quantize_kind is None else [None, quantize_kind]
    if quantize_kind:
        _say(verbose, f"quantizing to {quantize_kind}")
        quantize(fp32, quantize_kind, out / "onnx" / VARIANT_FILES[quantize_kind])
    share_tied_fp(fp32)  # after quantizing: the quantizers want the head's matrix as an initializer
    tok = toklib.load(folder)
    prompt = tok.encode(CHECK_PROMPT) or ([tok.eot_id] if tok.eot_id is not None else [0])
    report: dict[str, Any] = {"format": "onnx", "out": str(out), "seconds_export": 0.0, "variants": {}}
    ref = reference(model, prompt, check_tokens)
    for v in variants:
        path = out / "onnx" / VARIANT_FILES[v]
        _say(verbose, f"checking {path.name} against PyTorch over {check_tokens} greedy tokens (KV cache)")
        try:
            res = check(model, path, prompt, check_tokens, ref)
        except Exception as e:  # onnxruntime has no kernel for an op of this variant on this machine
            raise PocketLMError(f"onnxruntime cannot run the {v or 'fp32'} export: {str(e).splitlines()[0][:200]}"
                                f"; try another --quantize") from None
        res.pop("greedy_ids")
        if v is None:
            verify_fp32(res, ref, folder)
        report["variants"][JS_DTYPES[v]] = {"file": f"onnx/{path.name}", "bytes": path.stat().st_size, **res}
    if not keep_fp32 and quantize_kind:
        fp32.unlink()
        del report["variants"]["fp32"]
    report["seconds_export"] = round(time.perf_counter() - t0, 2)
    report["parameters"] = sum(p.numel() for p in model.parameters())
    report["model_bytes"] = common.folder_bytes(out / "onnx")
    return report


def export(folder: Path, out: Path, quantize: str | None = None, overwrite: bool = False, verbose: bool = True,
           check_tokens: int = CHECK_TOKENS) -> dict[str, Any]:
    return common.write_folder(out, overwrite, lambda tmp: {
        **build(folder, tmp, quantize, verbose, check_tokens=check_tokens), "out": str(out)})


def summary(report: dict[str, Any]) -> list[str]:
    """Human-readable lines for the CLI."""
    lines = []
    for dtype, v in report["variants"].items():
        same = "identical" if v["greedy_identical"] else f"identical for the first {v['greedy_same_prefix']}"
        lines.append(f"  {v['file']:<28} {common.mb(v['bytes']):>10}  {dtype:<4}  max |logits - PyTorch| "
                     f"{v['max_abs_diff']:.2e}; argmax agrees {v['argmax_agree']}/{v['tokens']}; "
                     f"greedy {v['tokens']} tokens {same}")
    return lines
