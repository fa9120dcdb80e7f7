"""One precision decision for every job, made from the hardware it runs on.

Serving (serving/engine.py), training (DPO, KTO, reward model, PPO via training.common.detect_hardware)
and evaluation (training/evaluate.py) all call `decide()`; their configs say `auto` and an explicit
dtype still wins. Only torch is imported, so serving and infra can use it without pulling in training.

Rules for `auto`:
  - CPU: bf16 only where the CPU has native bf16 matmuls (avx512_bf16 or AMX); otherwise fp32. On an
    AVX2-only AMD EPYC (torch capability "AVX2", 1 thread, 576 -> 1536 projection) bf16 was emulated:
    F.linear fp32 16-26 GFLOP/s vs bf16 4.2-4.5, torch.matmul fp32 25-44 vs bf16 0.9. On an
    avx512_bf16 + AMX Xeon, bf16 made generation ~2x and the DPO step ~2x faster than fp32.
  - CUDA: bf16 on compute capability >= 8 (Ampere+), fp16 on 7.x (fp16 tensor cores, no bf16), fp32
    below. Compute capability rather than torch.cuda.is_bf16_supported(), which also says yes where
    bf16 is only emulated.
  - MPS: fp32.
  - optional probe (probe=True or FLYWHEEL_PRECISION_PROBE=1; CPU only): time F.linear in fp32 and bf16
    at the layer shapes that matter and take bf16 only if it is measurably faster. Off by default: the
    flags are exact and free, and on a busy shared machine a timing can be unlucky; cached per process.

Every decision carries what it was made from (device, CPU model, torch's capability string, the native
bf16 flags, threads, the reason), so a benchmark or report can record where its figures came from.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("flywheel.precision")

ALIASES = {"auto": "auto", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
           "fp32": "fp32", "float32": "fp32", "float": "fp32"}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the native bf16 instructions
# F.linear shapes of SmolLM2-135M's MLP up-projection (576 -> 1536): a decode step at batch 8 and a
# training / prefill chunk of 512 tokens. (M, in_features, out_features).
PROBE_SHAPES = ((8, 576, 1536), (512, 576, 1536))
PROBE_MIN_SPEEDUP = 1.1  # bf16 must beat fp32 by this (geometric mean over the shapes) to be chosen


@dataclass(frozen=True)
class Cpu:
    """What the CPU can do: its model name, torch's dispatch capability and its instruction flags."""

    model: str
    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", "DEFAULT", ...
    flags: frozenset[str]

    @property
    def native_bf16(self) -> tuple[str, ...]:
        found = [f for f in NATIVE_BF16_FLAGS if f in self.flags]
        # A future torch may name the bf16 level in its capability string itself.
        if not found and ("BF16" in self.capability.upper() or "AMX" in self.capability.upper()):
            found = [self.capability]
        return tuple(found)


@dataclass(frozen=True)
class Gpu:
    """A CUDA device: its name and compute capability."""

    name: str
    major: int
    minor: int = 0


@dataclass(frozen=True)
class Precision:
    """The decision and what it was made from."""

    device: str  # "cpu" | "cuda" | "mps"
    dtype: str  # "bf16" | "fp16" | "fp32"
    requested: str  # what the config said ("auto" or an explicit dtype)
    reason: str
    cpu_model: str
    capability: str
    native_bf16: tuple[str, ...]
    gpu: str  # "" on CPU/MPS
    threads: int
    probe_gflops: dict[str, float] | None = None  # "<dtype> MxKxN" -> GFLOP/s, when the probe ran

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def record(self) -> dict[str, Any]:
        """The fields a benchmark JSON, a report or MLflow records (JSON-ready)."""
        out: dict[str, Any] = {"device": self.device, "dtype": self.dtype, "requested_dtype": self.requested,
                               "dtype_reason": self.reason, "cpu_model": self.cpu_model,
                               "cpu_capability": self.capability, "cpu_native_bf16": list(self.native_bf16),
                               "gpu": self.gpu, "threads": self.threads, "torch": torch.__version__}
        if self.probe_gflops is not None:
            out["probe_gflops"] = self.probe_gflops
        return out

    def summary(self) -> str:
        """The one start-up log line."""
        where = f"gpu={self.gpu!r}" if self.gpu else f"threads={self.threads}"
        native = ",".join(self.native_bf16) or "none"
        return (f"precision: device={self.device} cpu={self.cpu_model!r} capability={self.capability} "
                f"native_bf16={native} {where} -> dtype={self.dtype} ({self.reason})")


def normalise(dtype: str) -> str:
    """`auto` or a dtype's short name (bf16 | fp16 | fp32) for any of its spellings (bfloat16, float32, ...)."""
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in ALIASES:
        raise ValueError(f"precision/dtype {dtype!r} is not one of {sorted(ALIASES)}; use auto to let the "
                         f"hardware decide")
    return ALIASES[key]


# --- reading the machine ------------------------------------------------------------------------

def _cpuinfo_field(text: str, names: tuple[str, ...]) -> str:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in names:
            return value.strip()
    return ""


@functools.cache
def read_cpu() -> Cpu:
    """This machine's CPU: /proc/cpuinfo (Linux), else what torch's cpuinfo library reports."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    model = _cpuinfo_field(text, ("model name", "hardware", "cpu model")) or platform.processor() or \
        platform.machine()
    flags = set(_cpuinfo_field(text, ("flags", "features")).split())
    if not flags:  # no /proc (macOS, Windows): torch's own detection of the bf16 instructions
        cpu = getattr(torch, "cpu", None)
        for flag, probe in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_tile", "_is_amx_tile_supported")):
            if cpu is not None and getattr(cpu, probe, None) is not None and getattr(cpu, probe)():
                flags.add(flag)
    return Cpu(model=model, capability=torch.backends.cpu.get_cpu_capability(), flags=frozenset(flags))


def read_gpu(index: int = 0) -> Gpu | None:
    """The CUDA device `index`, or None when there is none."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return Gpu(torch.cuda.get_device_name(index), major, minor)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


# --- the probe ----------------------------------------------------------------------------------

def probe_linear(shapes: Iterable[tuple[int, int, int]] = PROBE_SHAPES, seconds: float = 0.04) -> dict[str, float]:
    """GFLOP/s of F.linear (what nn.Linear runs) in fp32 and bf16 at each (M, in, out) shape, with the
    current thread count: best of short bursts over `seconds` per dtype and shape."""
    out: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        x32, w32 = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        for name in ("fp32", "bf16"):
            x, w = x32.to(TORCH_DTYPES[name]), w32.to(TORCH_DTYPES[name])
            with torch.inference_mode():
                for _ in range(2):  # first calls create the oneDNN primitive
                    torch.nn.functional.linear(x, w)
                best, reps, end = 0.0, 4, time.perf_counter() + seconds
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        torch.nn.functional.linear(x, w)
                    best = max(best, reps * 2 * m * k * n / max(time.perf_counter() - t0, 1e-9) / 1e9)
            out[f"{name} {m}x{k}x{n}"] = round(best, 2)
    return out


@functools.cache
def _cached_probe(threads: int) -> tuple[tuple[str, float], ...]:
    return tuple(probe_linear().items())


def _probe_speedup(gflops: dict[str, float]) -> float:
    """Geometric mean over the shapes of bf16 GFLOP/s / fp32 GFLOP/s."""
    ratios = [gflops[key] / max(gflops[key.replace("bf16", "fp32", 1)], 1e-9)
              for key in gflops if key.startswith("bf16 ")]
    return math.exp(sum(math.log(max(r, 1e-9)) for r in ratios) / len(ratios))


# --- the decision -------------------------------------------------------------------------------

def decide(requested: str = "auto", device: str = "auto", *, capability: str | None = None,
           flags: Iterable[str] | None = None, cpu_model: str | None = None, gpu: Gpu | None | str = "machine",
           mps: bool | None = None, threads: int | None = None, probe: bool | None = None) -> Precision:
    """The dtype for a job on `device` (auto | cpu | cuda | cuda:N | mps); `requested` is auto or a dtype.

    Everything about the machine is a parameter whose default is read from this machine: `capability`
    (torch's CPU capability string), `flags` (CPU instruction flags), `cpu_model`, `gpu` (a Gpu, None for
    no GPU, "machine" to look), `mps`, `threads`, and `probe` (default: $FLYWHEEL_PRECISION_PROBE=1).
    An explicit dtype wins over the rules, except fp16 on CPU (not a native CPU type here: use bf16/fp32).
    """
    want = normalise(requested)
    here = read_cpu() if capability is None or flags is None or cpu_model is None else Cpu("", "", frozenset())
    cpu = Cpu(model=cpu_model if cpu_model is not None else here.model,
              capability=capability if capability is not None else here.capability,
              flags=frozenset(flags) if flags is not None else here.flags)
    threads = threads if threads is not None else torch.get_num_threads()
    if isinstance(gpu, str):
        index = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
        gpu = read_gpu(index) if device == "auto" or device.startswith("cuda") else None
    if device == "auto":
        device = "cuda" if gpu is not None else ("mps" if (mps if mps is not None else _mps_available()) else "cpu")
    kind = device.split(":", 1)[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    if kind == "cuda" and gpu is None:
        raise ValueError(f"device={device} but torch sees no CUDA GPU; use device=auto or cpu")
    base = dict(device=device, requested=want, cpu_model=cpu.model, capability=cpu.capability,
                native_bf16=cpu.native_bf16, gpu=gpu.name if kind == "cuda" and gpu else "", threads=threads)

    if want == "fp16" and kind == "cpu":
        raise ValueError("precision=fp16 needs a GPU; use precision=auto, bf16 or fp32 on CPU")
    if want != "auto" or kind != "cpu":
        return _explicit_or_accelerator(want, kind, cpu, gpu, base)
    return _cpu_rule(cpu, threads, probe, base)


def _explicit_or_accelerator(want: str, kind: str, cpu: Cpu, gpu: Gpu | None, base: dict) -> Precision:
    """An explicit dtype (with a warning for emulated bf16 on CPU), or the rule for a GPU / MPS."""
    if want != "auto":
        reason = "explicit in the config"
        if kind == "cpu" and want == "bf16" and not cpu.native_bf16:
            reason += (f"; WARNING: this CPU ({cpu.capability}) has no native bf16, bf16 matmuls are emulated "
                       f"(4-28x slower than fp32 on AVX2): use auto")
        return Precision(dtype=want, reason=reason, **base)
    if kind == "cuda":
        assert gpu is not None
        cc = f"compute capability {gpu.major}.{gpu.minor}"
        if gpu.major >= 8:
            return Precision(dtype="bf16", reason=f"{cc} >= 8.0 (Ampere+): native bf16", **base)
        if gpu.major >= 7:
            return Precision(dtype="fp16", reason=f"{cc}: fp16 tensor cores, no native bf16", **base)
        return Precision(dtype="fp32", reason=f"{cc}: no fp16/bf16 tensor cores", **base)
    return Precision(dtype="fp32", reason="Apple MPS: fp32", **base)


def _cpu_rule(cpu: Cpu, threads: int, probe: bool | None, base: dict) -> Precision:
    """bf16 where the CPU has it natively, else fp32; with the probe on, bf16 only if measured faster."""
    if cpu.native_bf16:
        dtype, reason = "bf16", f"native bf16 matmuls ({', '.join(cpu.native_bf16)})"
    else:
        dtype, reason = "fp32", f"no avx512_bf16/AMX ({cpu.capability}): bf16 would be emulated, slower than fp32"
    if probe if probe is not None else os.environ.get("FLYWHEEL_PRECISION_PROBE", "") == "1":
        t0 = time.perf_counter()
        gflops = dict(_cached_probe(threads))
        speedup = _probe_speedup(gflops)
        dtype = "bf16" if speedup >= PROBE_MIN_SPEEDUP else "fp32"
        reason += (f"; probe: F.linear bf16/fp32 = {speedup:.2f}x at {len(PROBE_SHAPES)} shapes "
                   f"({time.perf_counter() - t0:.2f} s) -> {dtype}")
        return Precision(dtype=dtype, reason=reason, probe_gflops=gflops, **base)
    return Precision(dtype=dtype, reason=reason, **base)


def announce(decision: Precision, logger: logging.Logger | None = None) -> Precision:
    """Log the decision's one start-up line (to stderr when the process has configured no logging)."""
    logger = logger or log
    line = decision.summary()
    level = logging.WARNING if "WARNING" in decision.reason else logging.INFO
    if logger.hasHandlers():
        logger.log(level, line)
    else:
        print(line, file=sys.stderr, flush=True)
    return decision
