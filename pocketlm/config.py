"""Typed configuration: one dataclass per concern, YAML presets, dotted CLI overrides.

One spelling everywhere: the field `train.lr` is the YAML key `train: {lr: ...}`, the flag `--train.lr`
and the key in the run folder's `config.yaml`. Every field's help text lives next to it and becomes
`--help`. Validation errors are `ConfigError`s with a one-line message and, for typos, the closest name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pocketlm.errors import ConfigError, PocketLMError


def _f(default: Any, help: str) -> Any:  # noqa: A002 - `help` reads best at the call sites
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """The GPT's shape (GPT-2 layout)."""

    vocab_size: int = _f(0, "vocabulary size; 0 = take it from the dataset's tokenizer")
    n_layer: int = _f(4, "number of transformer blocks")
    n_head: int = _f(4, "attention heads per block (must divide n_embd)")
    n_embd: int = _f(128, "width of the residual stream")
    block_size: int = _f(256, "context length in tokens")
    dropout: float = _f(0.0, "dropout on embeddings, attention and residuals (0 for short runs)")
    bias: bool = _f(True, "biases in Linear and LayerNorm layers (GPT-2 has them)")
    pos_emb: str = _f("learned", "positions: 'learned' (GPT-2) or 'rotary' (Llama; with rmsnorm and swiglu)")
    norm: str = _f("layernorm", "'layernorm' (GPT-2) or 'rmsnorm' (Llama; with rotary and swiglu)")
    mlp: str = _f("gelu", "'gelu' (GPT-2, 4 x n_embd) or 'swiglu' (Llama, gated, ~8/3 x n_embd; with rotary "
                  "and rmsnorm)")


@dataclass
class DataConfig:
    """What `prepare` builds and `train` reads."""

    path: str = _f("", "prepared dataset folder (written by `pocketlm prepare`)")
    tokenizer: str = _f("bpe", "'char', 'bpe' (trained here), or one to reuse: a tokenizer or model folder, "
                               "a tokenizer.json, 'gpt2' or a Hugging Face id")
    vocab_size: int = _f(2048, "BPE vocabulary size, special tokens included")
    pre_tokenizer: str = _f("byte-level", "BPE word splitting: 'byte-level' (GPT-2), 'metaspace', "
                                          "'metaspace-punctuation' or 'whitespace-punctuation'")
    unknown: str = _f("unk", "char-level: characters outside the corpus become 'unk' (<|unk|>) or 'bytes'")
    separator: str = _f(
        "blank-line",
        "how input files split into documents: 'blank-line', 'line', 'file', or a literal string",
    )
    eot_token: str = _f("<|endoftext|>", "special token written after every document")
    start_token: str = _f("", "special token written before every document, e.g. <|greentext|> (none if empty)")
    workers: int = _f(0, "processes that encode in parallel (0 = one per CPU core)")
    val_fraction: float = _f(0.1, "share of documents held out for validation (ignored with --val)")
    test_fraction: float = _f(0.0, "share of documents held out for test (ignored with --test)")
    split_seed: int = _f(1337, "seed of the document-level train/val/test split")


@dataclass
class TrainConfig:
    """The optimisation and the run's bookkeeping."""

    out: str = _f("", "run folder: config.yaml, metrics.jsonl, checkpoints best/ and last/")
    batch_size: int = _f(12, "sequences per micro-batch, per process")
    grad_accum: int = _f(1, "micro-batches per step, split across processes (global batch = batch_size x this)")
    lr: float = _f(1e-3, "peak learning rate")
    min_lr: float = _f(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = _f(100, "linear warmup steps")
    max_steps: int = _f(2000, "optimizer steps in total")
    weight_decay: float = _f(0.1, "AdamW weight decay on matrices (not on biases, norms)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.99, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    eval_interval: int = _f(250, "evaluate and save a checkpoint every N steps")
    eval_steps: int = _f(20, "batches per evaluation")
    log_interval: int = _f(10, "print and log training metrics every N steps")
    seed: int = _f(1337, "seed for initialisation, batches and dropout")
    device: str = _f("auto", "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    dtype: str = _f("auto", "'auto', 'float32', 'bfloat16' or 'float16' (autocast; float16 on GPUs only). auto: "
                    "bf16 on GPUs that have it, and on CPUs with bf16 units for models >= 128 wide")
    compile: bool = _f(False, "torch.compile the model (measure first: it helps most on GPUs)")
    optimizer: str = _f("adamw", "'adamw', or 'muon' (Muon for the blocks' matrices, AdamW for the rest)")
    muon_lr: float = _f(0.02, "Muon's peak learning rate (follows the same schedule as lr)")
    muon_momentum: float = _f(0.95, "Muon's Nesterov momentum")
    time_budget: str = _f("", "train for this long instead of max_steps ('90s', '10m', '2h'; evaluations count); "
                          "the learning-rate schedule follows the share of the budget spent")
    threads: int = _f(0, "CPU threads for torch (0 = torch's default)")
    thread_shards: int = _f(0, "CPU: split each micro-batch into this many row shards, each run forward and backward "
                            "on its own thread with one torch thread (0 = auto: one per thread for pocketlm models "
                            "without dropout, see docs/benchmarks.md; 1 = off)")
    strategy: str = _f("ddp", "with several processes: 'ddp' (replicate the model) or 'fsdp' (shard it)")
    eval_top_k: int = _f(10, "k of the top-k accuracy reported at each evaluation (val/top10_acc)")
    log: str = _f("", "trackers besides metrics.jsonl: 'tensorboard', 'wandb' or 'tensorboard,wandb'")
    wandb_project: str = _f("pocketlm", "Weights & Biases project for --log wandb")
    peak_tflops: float = _f(0.0, "peak TFLOP/s for model FLOPs utilisation (mfu); 0 = the GPU's datasheet "
                                 "peak, or a matmul benchmark measured once and cached")


@dataclass
class SampleConfig:
    """Generation defaults (also written to generation_config.json)."""

    prompt: str = _f("\n", "text the samples start from")
    max_new_tokens: int = _f(200, "tokens to generate per sample")
    temperature: float = _f(0.8, "softmax temperature; 0 = greedy")
    top_k: int = _f(50, "keep only the k most likely tokens (0 = off)")
    top_p: float = _f(1.0, "nucleus sampling: keep the smallest set with this much probability (1 = off)")
    repetition_penalty: float = _f(1.0, "divide logits of tokens already present (1 = off)")
    num_samples: int = _f(1, "samples to generate (batched)")
    seed: int = _f(1337, "sampling seed")
    stop: list[str] = _f(None, "stop strings; generation ends at the first one (repeatable)")


@dataclass
class FinetuneConfig:
    """Starting from a pretrained model (fine-tuning, SFT)."""

    init_from: str = _f("", "start from: a Hugging Face model id or folder, a pocketlm run or checkpoint folder, "
                            "or nanogpt:PATH/ckpt.pt ('' = train from scratch)")
    add_special_tokens: list[str] = _f(None, "special tokens to add to the tokenizer (new embedding rows = mean "
                                             "embedding); repeatable")
    replay: str = _f("", "DATA:SHARE - draw this share of each batch from another prepared dataset with the "
                         "same tokenizer (e.g. data/gutenberg:0.1)")
    freeze_layers: str = _f("", "N = freeze the embeddings and the first N blocks; or comma-separated glob "
                                "patterns of parameter names")
    lora: bool = _f(False, "train LoRA adapters (peft) instead of all weights; merged into the saved model")
    lora_rank: int = _f(16, "LoRA rank r")
    lora_alpha: float = _f(32.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = _f(0.05, "dropout on the LoRA path")
    lora_targets: str = _f("", "comma-separated module names to adapt ('' = attention and MLP projections of "
                               "the architecture)")
    lora_keep_adapter: bool = _f(False, "also save the adapter alone (adapter/ in each checkpoint, peft format)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        m, t, d, smp, ft = self.model, self.train, self.data, self.sample, self.finetune
        for section in (m, t, d, smp, ft):  # NaN and infinity pass every comparison below: refuse them first
            for k, v in vars(section).items():
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"{type(section).__name__.removesuffix('Config').lower()}.{k} must be a "
                                      f"finite number, got {v}")
        for name, value in [
            ("model.n_layer", m.n_layer), ("model.n_head", m.n_head), ("model.n_embd", m.n_embd),
            ("model.block_size", m.block_size), ("train.batch_size", t.batch_size),
            ("train.grad_accum", t.grad_accum), ("train.max_steps", t.max_steps),
            ("train.eval_interval", t.eval_interval), ("train.eval_steps", t.eval_steps),
            ("train.log_interval", t.log_interval), ("sample.num_samples", smp.num_samples),
            ("train.eval_top_k", t.eval_top_k),
        ]:
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if m.n_embd % m.n_head:
            raise ConfigError(
                f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head}); "
                f"try --model.n_head {_divisor_near(m.n_embd, m.n_head)}"
            )
        layout = (m.pos_emb, m.norm, m.mlp)
        if layout not in LAYOUTS:
            raise ConfigError(f"model.pos_emb/norm/mlp = {'/'.join(layout)} has no Hugging Face layout to save to: "
                              "use learned/layernorm/gelu (GPT-2) or rotary/rmsnorm/swiglu (Llama)")
        if m.pos_emb == "rotary" and (m.n_embd // m.n_head) % 2:
            raise ConfigError(f"rotary positions rotate pairs of dimensions: the head size n_embd / n_head = "
                              f"{m.n_embd // m.n_head} must be even; change --model.n_embd or --model.n_head")
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
        if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
            raise ConfigError(f"need 0 <= train.min_lr <= train.lr and lr > 0, got lr={t.lr} min_lr={t.min_lr}")
        if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1):
            raise ConfigError(f"train.beta1 and train.beta2 must be in [0, 1), got {t.beta1}, {t.beta2}")
        if min(t.warmup_steps, t.threads, t.thread_shards, t.weight_decay, t.grad_clip, t.peak_tflops) < 0:
            raise ConfigError("train.warmup_steps, train.threads, train.thread_shards, train.weight_decay, "
                              "train.grad_clip and train.peak_tflops must be >= 0")
        if not (0 <= d.val_fraction < 1 and 0 <= d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1):
            raise ConfigError("data.val_fraction and data.test_fraction must be in [0, 1) and sum below 1")
        if not d.separator or not d.eot_token:
            raise ConfigError("data.separator and data.eot_token must not be empty")
        if d.start_token == d.eot_token or d.workers < 0:
            raise ConfigError("data.start_token must differ from data.eot_token, and data.workers must be >= 0")
        if any(not x for x in smp.stop or []):
            raise ConfigError("sample.stop strings must not be empty")
        if ft.lora_rank < 1 or not 0 <= ft.lora_dropout < 1 or ft.lora_alpha <= 0:
            raise ConfigError("finetune.lora_rank must be >= 1, lora_alpha > 0 and lora_dropout in [0, 1)")
        if ft.lora and t.strategy == "fsdp":  # FSDP's sharded LoRA state is not merged or resumed: it hung
            raise ConfigError("LoRA trains few parameters and runs unsharded: use --strategy ddp with --lora")
        if t.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"train.optimizer must be adamw or muon, got {t.optimizer!r}")
        if t.muon_lr <= 0 or not 0 <= t.muon_momentum < 1:
            raise ConfigError("train.muon_lr must be > 0 and train.muon_momentum in [0, 1)")
        seconds(t.time_budget)
        if t.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"train.dtype must be auto, float32, bfloat16 or float16, got {t.dtype!r}")
        return self


# (pos_emb, norm, mlp) -> the Hugging Face architecture checkpoints are saved as
LAYOUTS = {("learned", "layernorm", "gelu"): "GPT2LMHeadModel", ("rotary", "rmsnorm", "swiglu"): "LlamaForCausalLM"}


def seconds(duration: str) -> float:
    """'90s', '10m', '2h' or a plain number of seconds -> seconds; '' -> 0 (no budget)."""
    text = duration.strip().lower()
    if not text:
        return 0.0
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1])
    try:
        value = float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"train.time_budget must be a duration like 90s, 10m or 2h, got {duration!r}")
    return value


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "sample": SampleConfig,
                             "finetune": FinetuneConfig}


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


def fields_of(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def _base_type(tp: Any) -> Any:
    """`list[str] | None` -> list; `int` -> int."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return origin or tp


def _hints(section: str) -> dict[str, Any]:
    return typing.get_type_hints(SECTIONS[section])


def _suggest(name: str, choices: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid: {', '.join(sorted(choices))}"


def coerce(key: str, value: Any, from_string: bool = False) -> Any:
    """Check `value` against the type of `section.field` named by `key`; parse it if it came from argv."""
    section, _, name = key.partition(".")
    tp = _base_type(_hints(section)[name])
    if value is None:
        return None
    if from_string and isinstance(value, str):
        try:
            if tp is bool:
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError
                return low in ("true", "1", "yes", "on")
            if tp is list:
                return [value]
            return tp(value)
        except ValueError:
            raise ConfigError(f"--{key} expects {tp.__name__}, got {value!r}") from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
        return coerce(key, value, from_string=True)
    if tp is list and isinstance(value, str):
        return [value]
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key} expects {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def apply(cfg: Config, overrides: dict[str, Any], from_string: bool = False) -> Config:
    """Set dotted keys (`"train.lr": 3e-4`) on a config, with type checks and typo suggestions."""
    for key, value in overrides.items():
        section, dot, name = key.partition(".")
        if section not in SECTIONS or not dot:
            raise ConfigError(f"unknown config section in '{key}'" + _suggest(section, list(SECTIONS)))
        valid = list(fields_of(section))
        if name not in valid:
            raise ConfigError(f"unknown config key '{key}'" + _suggest(name, valid, prefix=f"{section}."))
        setattr(getattr(cfg, section), name, coerce(key, value, from_string))
    return cfg


def flatten(tree: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1}}` -> `{"train.lr": 1}`, rejecting keys that are not sections."""
    out: dict[str, Any] = {}
    for section, body in tree.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section '{section}'{where}" + _suggest(str(section), list(SECTIONS)))
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"config section '{section}'{where} must be a mapping of keys to values")
        out.update({f"{section}.{k}": v for k, v in body.items()})
    return out


PRESET_DIR = Path(__file__).parent / "configs"


def resolve_preset(name_or_path: str) -> Path:
    """A YAML path, or the name of a bundled preset (`small-cpu`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    bundled = PRESET_DIR / f"{Path(name_or_path).stem}.yaml"
    if bundled.is_file():
        return bundled
    names = sorted(f.stem for f in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config file not found: {name_or_path} (bundled presets: {', '.join(names)})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must be a mapping with sections model/data/train/sample")
    return flatten(tree, where=f" in {path}")


def load(preset: str | Path | None = None, overrides: dict[str, Any] | None = None,
         cli_overrides: dict[str, str] | None = None) -> Config:
    """Defaults <- YAML preset <- Python overrides <- CLI strings, then validation."""
    cfg = Config()
    if preset:
        apply(cfg, load_yaml(resolve_preset(str(preset))))
    apply(cfg, overrides or {})
    apply(cfg, cli_overrides or {}, from_string=True)
    return cfg.validate()


def from_dict(tree: dict[str, Any]) -> Config:
    return apply(Config(), flatten(tree))


def save_yaml(cfg: Config, path: Path) -> None:
    from pocketlm.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = ["Config", "ModelConfig", "DataConfig", "TrainConfig", "SampleConfig", "FinetuneConfig", "load", "apply", "from_dict",
           "save_yaml", "load_yaml", "PocketLMError", "ConfigError"]
