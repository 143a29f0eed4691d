"""Experiment tracking: what the loop logs beyond loss (MFU, peak memory) and where it goes.

`metrics.jsonl` and `config.yaml` are written by the loop in every run folder. TensorBoard and Weights &
Biases are optional callbacks (`--log tensorboard,wandb`) that receive the same records. Model FLOPs
utilisation divides achieved FLOP/s by a peak: `--train.peak_tflops`, else the GPU's datasheet peak for the
training dtype, else a short matmul benchmark on the device, measured once and cached.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from pocketlm.errors import PocketLMError

LOGGERS = ("tensorboard", "wandb")

# dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets; fp32 runs use TF32
GPU_PEAK_TFLOPS = {  # name fragment: (bf16/fp16, tf32)
    "H200": (989.0, 494.5), "H100 SXM": (989.0, 494.5), "H100 NVL": (835.0, 417.5), "H100 PCIe": (756.0, 378.0),
    "H100": (989.0, 494.5), "GH200": (989.0, 494.5), "A100": (312.0, 156.0), "A800": (312.0, 156.0),
    "L40S": (362.0, 183.0), "L40": (181.0, 90.5), "L4": (121.0, 60.0), "A10G": (70.0, 35.0), "A10": (125.0, 62.5),
    "RTX 4090": (165.2, 82.6), "RTX 3090": (71.0, 35.6), "V100": (125.0, 15.7), "T4": (65.0, 8.1),
}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pocketlm"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                          seconds: float = 0.3) -> float:
    """Best achieved TFLOP/s of an n x n matmul on the device over a short loop (2 n^3 FLOPs per product)."""
    gen = torch.Generator(device=device).manual_seed(0)  # a private generator: training's RNG stays untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


_measured: dict[str, float] = {}  # "cache file|key" -> the TFLOP/s figure this process settled on


def peak_flops(device: torch.device, dtype: torch.dtype, configured_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for MFU."""
    if configured_tflops > 0:
        return configured_tflops * 1e12, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for frag, (half, tf32) in GPU_PEAK_TFLOPS.items():
            if frag in name:
                return (tf32 if dtype == torch.float32 else half) * 1e12, f"{name} datasheet"
        key = f"cuda|{name}|{dtype}"
    else:
        key = f"{device.type}|{_cpu_name()}|{torch.get_num_threads()} threads|{dtype}|torch {torch.__version__}"
    file = cache_dir() / "peak_flops.json"
    if f"{file}|{key}" in _measured:  # once per process: the dtype choice and the MFU both ask
        return _measured[f"{file}|{key}"] * 1e12, f"measured matmul peak ({file})"
    try:
        cached = json.loads(file.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    # Every run measures again briefly and the cache keeps the best figure this machine has shown: a figure
    # taken while other processes held the cores (too low, so MFU above 100%) is replaced by the next run.
    seen = cached.get(key) if isinstance(cached.get(key), (int, float)) else 0.0
    now = measure_matmul_tflops(device, dtype)  # autocast runs the matmuls in its dtype: bf16 peak for bf16
    if now > seen:
        cached[key] = now
        try:
            from pocketlm.atomic import atomic_write_text

            file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(file, json.dumps(cached, indent=2) + "\n")
        except OSError:
            pass  # a read-only home: measure again next time
    _measured[f"{file}|{key}"] = float(cached[key])
    return float(cached[key]) * 1e12, f"measured matmul peak ({file})"


_mps_peak = 0


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: max allocated on CUDA, allocated on MPS, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":  # MPS keeps no maximum: the largest figure seen at a log step
        global _mps_peak
        _mps_peak = max(_mps_peak, torch.mps.current_allocated_memory())
        return _mps_peak / 2**20
    try:
        import resource  # Unix only
    except ImportError:
        return 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


# ---- logger callbacks -----------------------------------------------------------------------------------

def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger:
    """Scalars into RUN/tensorboard/ (event files `tensorboard --logdir RUN` reads)."""

    def __init__(self, out: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PocketLMError("--log tensorboard needs the tensorboard package: pip install 'pocketlm[track]'") \
                from None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def _write(self, step: int, record: dict[str, Any]) -> None:
        for k, v in _scalars(record).items():
            self.writer.add_scalar(k, v, step)

    on_log = on_eval = on_test = _write

    def on_end(self, step: int, record: dict[str, Any]) -> None:
        self.writer.close()


class WandbLogger:
    """Weights & Biases run in RUN/wandb/; WANDB_MODE=offline keeps it local (`wandb sync` uploads later).

    The run id is kept in RUN/wandb_id, so `--resume` continues the same W&B run.
    """

    def __init__(self, out: Path, project: str, config: dict[str, Any], resume: bool) -> None:
        try:
            import wandb
        except ImportError:
            raise PocketLMError("--log wandb needs the wandb package: pip install 'pocketlm[track]'") from None
        id_file = out / "wandb_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:8]
        from pocketlm.atomic import atomic_write_text

        atomic_write_text(id_file, run_id + "\n")
        try:
            self.run = wandb.init(project=project, dir=str(out), id=run_id, resume="allow", config=config,
                                  name=out.name, settings=wandb.Settings(console="off", silent=True))
        except Exception as e:  # not logged in and not offline, no network
            raise PocketLMError(f"W&B could not start ({str(e).splitlines()[0][:160]}): run `wandb login`, "
                                "or set WANDB_MODE=offline and `wandb sync` later") from None

    def _write(self, step: int, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=step)

    on_log = on_eval = on_test = _write

    def on_end(self, step: int, record: dict[str, Any]) -> None:
        self.run.finish()


def parse_loggers(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()] if spec else []
    for n in names:
        if n not in LOGGERS:
            raise PocketLMError(f"unknown --log {n!r}: use tensorboard, wandb or both (tensorboard,wandb); "
                                "metrics.jsonl is always written")
    return names


def loggers(spec: str, out: Path, project: str, config: dict[str, Any], resume: bool) -> list[Any]:
    """The callbacks `--log` asks for (rank 0 only)."""
    made: list[Any] = []
    for name in parse_loggers(spec):
        made.append(TensorBoardLogger(out) if name == "tensorboard" else WandbLogger(out, project, config, resume))
    return made
