"""Device, dtype and distributed setup, decided once per run, with the reason logged.

Nothing here runs at import time. Under `torchrun` (RANK/WORLD_SIZE in the environment) `setup()` starts
the process group: NCCL on CUDA, gloo on CPU, each rank on its own GPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pocketlm.errors import PocketLMError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 = no autocast
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device_reason: str = ""
    dtype_reason: str = ""

    @property
    def reason(self) -> str:
        out = f"device {self.device} ({self.device_reason}); {self.dtype_reason}"
        return out + (f"; rank {self.rank}/{self.world_size}" if self.distributed else "")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def pick_device(requested: str = "auto", local_rank: int = 0) -> tuple[torch.device, str]:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank), f"CUDA available ({torch.cuda.get_device_name(local_rank)})"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps"), "Apple GPU (MPS) available"
        return torch.device("cpu"), "no GPU found"
    try:
        dev = torch.device(requested)
    except RuntimeError:
        raise PocketLMError(f"unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PocketLMError("--train.device cuda was asked for but no CUDA GPU is visible; use --train.device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PocketLMError("--train.device mps was asked for but MPS is not available; use --train.device cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev, "requested"


def pick_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, str]:
    if requested == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16, "bf16 autocast: the GPU supports it"
            return torch.float16, "fp16 autocast with loss scaling: the GPU has no bf16"
        return torch.float32, "float32"  # on CPU, `cpu_dtype` may pick bf16 once the model's width is known
    dtype = DTYPES[requested]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PocketLMError("bfloat16 was asked for but this GPU does not support it; use --train.dtype float16")
    if dtype == torch.float16 and device.type == "cpu":
        raise PocketLMError("float16 autocast is not supported on CPU; use --train.dtype float32 or bfloat16")
    return dtype, "requested"


# Measured on a 2-core AMD EPYC with avx512_bf16 (docs/benchmarks.md): whole training steps under bf16 autocast
# ran 0.6-0.9x fp32's speed at 32-64 wide (the casts cost more than the matmuls gain), 1.4x at 128, 1.7-1.9x
# at 256-384. A CPU without bf16 units emulates them, ~4x slower than fp32, so the decision is measured.
CPU_BF16_MIN_WIDTH = 128
CPU_BF16_MIN_GAIN = 1.5


def cpu_dtype(n_embd: int) -> tuple[torch.dtype, str]:
    """--train.dtype auto on CPU: bf16 autocast when the model is wide enough for its matmuls to dominate
    and this CPU's bf16 matmuls measure at least 1.5x its fp32 ones (native bf16 units); else float32."""
    if n_embd < CPU_BF16_MIN_WIDTH:
        return torch.float32, f"float32: at {n_embd} wide bf16 autocast's casts cost more than its matmuls gain"
    from pocketlm.track import peak_flops

    cpu = torch.device("cpu")
    gain = peak_flops(cpu, torch.bfloat16)[0] / peak_flops(cpu, torch.float32)[0]
    if gain >= CPU_BF16_MIN_GAIN:
        return torch.bfloat16, f"bf16 autocast: bf16 matmuls measure {gain:.1f}x fp32's on this CPU"
    return torch.float32, f"float32: bf16 matmuls measure {gain:.1f}x fp32's on this CPU (no bf16 units)"


def setup(device: str = "auto", dtype: str = "auto", threads: int = 0) -> Runtime:
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    dev, why_dev = pick_device(device, local_rank)
    dt, why_dt = pick_dtype(dtype, dev)
    if threads:
        torch.set_num_threads(threads)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart:
            # after an elastic restart the launcher's store still holds the dead round's peer addresses
            # under the default keys; a per-round prefix makes the new workers meet each other instead
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=False)
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"pocketlm-restart-{restart}", store),
                                    rank=rank, world_size=world)
        else:
            dist.init_process_group(backend=backend)
    return Runtime(dev, dt, rank, local_rank, world, why_dev, why_dt)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

