"""training.precision: one dtype decision from the hardware, used by serving, training and evaluation.

The machine is injected (capability string, CPU flags, GPU properties), so the rules are tested for
hardware these tests do not run on: an AVX2-only EPYC must get fp32, an avx512_bf16/AMX Xeon bf16.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from training import common, precision

REPO = Path(__file__).resolve().parent.parent

# /proc/cpuinfo flags of the two kinds of machine these jobs ran on (abridged).
EPYC_AVX2 = ["fpu", "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2",
             "sha_ni", "clflushopt"]
XEON_AMX = EPYC_AVX2 + ["avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile",
                        "amx_int8"]
OTHER_FLAGS = ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_fp16", "amx_tile",
               "amx_int8", "avx_vnni", "neon", "sve", "asimd"]
CAPABILITIES = ["DEFAULT", "NO AVX", "AVX2", "AVX512", "VSX", "ZVECTOR", "SVE256"]


def cpu_decision(requested: str = "auto", flags: list[str] = EPYC_AVX2, capability: str = "AVX2",  # noqa: B006
                 **kw: Any) -> precision.Precision:
    kw.setdefault("cpu_model", "test CPU")
    kw.setdefault("probe", False)
    return precision.decide(requested, "cpu", capability=capability, flags=flags, gpu=None, **kw)


def test_avx2_epyc_gets_fp32_and_amx_xeon_gets_bf16() -> None:
    epyc = cpu_decision(flags=EPYC_AVX2, capability="AVX2", cpu_model="AMD EPYC 7B13")
    assert (epyc.device, epyc.dtype, epyc.torch_dtype) == ("cpu", "fp32", torch.float32)
    assert "AVX2" in epyc.reason and epyc.native_bf16 == ()
    xeon = cpu_decision(flags=XEON_AMX, capability="AVX512")
    assert (xeon.dtype, xeon.torch_dtype, xeon.native_bf16) == ("bf16", torch.bfloat16, ("avx512_bf16", "amx_bf16"))
    assert cpu_decision(flags=EPYC_AVX2 + ["amx_bf16"], capability="AVX512").dtype == "bf16"  # AMX alone
    assert cpu_decision(flags=EPYC_AVX2 + ["avx512_bf16"], capability="AVX512").dtype == "bf16"


@given(flags=st.sets(st.sampled_from(OTHER_FLAGS + list(precision.NATIVE_BF16_FLAGS))),
       capability=st.sampled_from(CAPABILITIES), threads=st.integers(1, 64))
def test_cpu_auto_is_bf16_exactly_when_a_native_bf16_flag_is_present(flags: set[str], capability: str,
                                                                     threads: int) -> None:
    d = cpu_decision(flags=sorted(flags), capability=capability, threads=threads)
    native = flags & set(precision.NATIVE_BF16_FLAGS)
    assert d.dtype == ("bf16" if native else "fp32")
    assert set(d.native_bf16) == native
    rec = d.record()  # what benchmarks and reports record: the capability with the dtype
    assert (rec["cpu_capability"], rec["dtype"], rec["threads"], rec["device"]) == (capability, d.dtype, threads, "cpu")


@given(major=st.integers(3, 12), minor=st.integers(0, 9), device=st.sampled_from(["auto", "cuda", "cuda:0"]))
def test_gpu_rules_from_compute_capability(major: int, minor: int, device: str) -> None:
    gpu = precision.Gpu("Test GPU", major, minor)
    d = precision.decide("auto", device, gpu=gpu, flags=EPYC_AVX2, capability="AVX2", cpu_model="x")
    assert d.device.startswith("cuda") and d.gpu == "Test GPU"
    assert d.dtype == ("bf16" if major >= 8 else "fp16" if major == 7 else "fp32")
    # The GPU decides, whatever the host CPU can do.
    assert precision.decide("auto", device, gpu=gpu, flags=XEON_AMX, capability="AVX512", cpu_model="x").dtype == d.dtype


def test_named_gpus_and_missing_ones() -> None:
    a100, v100 = precision.Gpu("NVIDIA A100", 8, 0), precision.Gpu("Tesla V100", 7, 0)
    assert precision.decide(gpu=a100, flags=[], capability="AVX2", cpu_model="x").dtype == "bf16"
    assert precision.decide(gpu=v100, flags=[], capability="AVX2", cpu_model="x").dtype == "fp16"
    # No GPU: auto falls to the CPU (and its rules); an explicit cuda is an error that says what to do.
    assert precision.decide(gpu=None, mps=False, flags=EPYC_AVX2, capability="AVX2", cpu_model="x").device == "cpu"
    assert precision.decide(gpu=None, mps=True, flags=XEON_AMX, capability="AVX512", cpu_model="x").dtype == "fp32"
    with pytest.raises(ValueError, match="no CUDA GPU"):
        precision.decide("auto", "cuda", gpu=None)
    with pytest.raises(ValueError, match="device"):
        precision.decide("auto", "tpu", gpu=None)


@given(requested=st.sampled_from(sorted(set(precision.ALIASES) - {"auto"})),
       flags=st.sampled_from([EPYC_AVX2, XEON_AMX]), major=st.sampled_from([None, 6, 7, 8, 9]))
def test_an_explicit_dtype_wins_over_the_rules(requested: str, flags: list[str], major: int | None) -> None:
    gpu = precision.Gpu("g", major) if major is not None else None
    want = precision.normalise(requested)
    if gpu is None and want == "fp16":
        with pytest.raises(ValueError, match="needs a GPU"):
            precision.decide(requested, "auto", gpu=None, mps=False, flags=flags, capability="AVX2", cpu_model="x")
        return
    d = precision.decide(requested, "auto", gpu=gpu, mps=False, flags=flags, capability="AVX2", cpu_model="x")
    assert (d.dtype, d.requested) == (want, want)
    # bf16 forced onto a CPU without native bf16 runs, but says loudly that it is emulated.
    assert ("WARNING" in d.reason) == (gpu is None and want == "bf16" and flags is EPYC_AVX2)


def test_unknown_dtypes_are_refused() -> None:
    for bad in ("fp8", "int4", ""):
        with pytest.raises(ValueError, match="auto"):
            precision.decide(bad, "cpu", gpu=None)


def test_the_probe_can_overrule_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the probe on, bf16 is kept only if F.linear is measured >= 1.1x faster in bf16."""
    def fake(ratio: float):  # noqa: ANN202
        def probe_linear() -> dict[str, float]:
            return {"fp32 8x576x1536": 40.0, "bf16 8x576x1536": 40.0 * ratio,
                    "fp32 512x576x1536": 170.0, "bf16 512x576x1536": 170.0 * ratio}
        return probe_linear

    for ratio, flags, want in ((0.2, XEON_AMX, "fp32"), (4.0, XEON_AMX, "bf16"), (4.0, EPYC_AVX2, "bf16"),
                               (1.05, XEON_AMX, "fp32"), (0.25, EPYC_AVX2, "fp32")):
        precision._cached_probe.cache_clear()
        monkeypatch.setattr(precision, "probe_linear", fake(ratio))
        d = cpu_decision(flags=flags, probe=True)
        assert d.dtype == want, (ratio, flags)
        assert d.probe_gflops is not None and "probe" in d.reason and d.record()["probe_gflops"] == d.probe_gflops
    precision._cached_probe.cache_clear()
    monkeypatch.setenv("FLYWHEEL_PRECISION_PROBE", "1")  # the env switch turns it on for `auto` configs
    assert precision.decide("auto", "cpu", gpu=None, flags=XEON_AMX, capability="AVX512",
                            cpu_model="x").probe_gflops is not None
    precision._cached_probe.cache_clear()


def test_the_real_probe_measures_both_dtypes_at_each_shape() -> None:
    gflops = precision.probe_linear(shapes=((8, 64, 128),), seconds=0.01)
    assert set(gflops) == {"fp32 8x64x128", "bf16 8x64x128"} and all(v > 0 for v in gflops.values())


def test_this_machine_is_read_and_logged(caplog: pytest.LogCaptureFixture,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cpu = precision.read_cpu()
    assert cpu.capability == torch.backends.cpu.get_cpu_capability() and cpu.model
    with caplog.at_level(logging.INFO, logger="flywheel.precision"):
        d = precision.announce(precision.decide("auto", "cpu"))
    assert d.dtype == ("bf16" if cpu.native_bf16 else "fp32")
    # A process without logging configured (the training jobs) still gets the line, on stderr.
    bare = logging.getLogger("test.precision.bare")
    bare.propagate = False
    precision.announce(d, bare)
    for line in (caplog.text, capsys.readouterr().err):
        assert f"capability={cpu.capability}" in line and f"dtype={d.dtype}" in line and d.reason in line
        assert repr(cpu.model) in line and f"threads={torch.get_num_threads()}" in line


# --- the jobs use it ----------------------------------------------------------------------------

@pytest.fixture
def avx2_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make this process see an AVX2-only EPYC and no GPU."""
    monkeypatch.setattr(precision, "read_cpu", lambda: precision.Cpu("AMD EPYC 7B13", "AVX2", frozenset(EPYC_AVX2)))
    monkeypatch.setattr(precision, "read_gpu", lambda index=0: None)
    monkeypatch.setattr(precision, "_mps_available", lambda: False)


@pytest.fixture
def amx_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "read_cpu", lambda: precision.Cpu("Intel Xeon", "AVX512", frozenset(XEON_AMX)))
    monkeypatch.setattr(precision, "read_gpu", lambda index=0: None)
    monkeypatch.setattr(precision, "_mps_available", lambda: False)


def test_training_hardware_follows_the_decision(avx2_machine: None) -> None:
    hw = common.detect_hardware("auto")
    assert (hw.device, hw.precision) == ("cpu", "fp32")
    assert common.trainer_device_kwargs(hw) == {"use_cpu": True, "bf16": False, "fp16": False}
    assert hw.tags()["cpu_capability"] == "AVX2" and "EPYC" in hw.name
    assert common.detect_hardware("bf16").precision == "bf16"  # explicit wins
    assert not common.cpu_has_bf16()


def test_training_hardware_on_amx(amx_machine: None) -> None:
    hw = common.detect_hardware("auto")
    assert (hw.precision, common.trainer_device_kwargs(hw)["bf16"]) == ("bf16", True)


@pytest.mark.parametrize("machine, want", [("avx2_machine", torch.float32), ("amx_machine", torch.bfloat16)])
def test_serving_and_evaluation_load_the_model_in_the_decided_dtype(request: pytest.FixtureRequest, tiny_model: str,
                                                                    machine: str, want: torch.dtype) -> None:
    from serving.engine import Engine
    from training.evaluate import Config, Policies

    request.getfixturevalue(machine)
    assert Config().dtype == "auto"
    engine = Engine(tiny_model, dtype="auto", device="cpu", threads=1)
    try:
        assert engine.model.dtype == want
        assert engine.state()["precision"]["cpu_capability"] == ("AVX2" if want == torch.float32 else "AVX512")
    finally:
        engine.close()
    pol = Policies(tiny_model, {}, "auto")
    assert pol.model.dtype == want and pol.precision.dtype == precision.normalise(str(want))
    assert Policies(tiny_model, {}, "float32").model.dtype == torch.float32


# --- no config pins a CPU dtype -----------------------------------------------------------------

KEY = re.compile(r"(^|[._-])(precision|dtype)$")


def pinned_dtypes(node: Any, where: str = "") -> list[str]:
    """Every place in a loaded YAML document that sets a precision/dtype to anything but auto: mapping keys
    (`precision: bf16`, `model.dtype`) and command-line strings in lists (`model.dtype=bf16`, `--dtype bf16`)."""
    found: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if KEY.search(str(k)) and str(v).lower() != "auto":
                found.append(f"{where}{k}={v}")
            found += pinned_dtypes(v, f"{where}{k}.")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            text = str(item)
            key, eq, value = text.lstrip("-").partition("=")
            if eq and KEY.search(key) and value.lower() != "auto":
                found.append(f"{where}[{i}] {text}")
            if text.lstrip("-") in ("dtype", "precision") and i + 1 < len(node) and str(node[i + 1]).lower() != "auto":
                found.append(f"{where}[{i}] {text} {node[i + 1]}")
            found += pinned_dtypes(item, f"{where}[{i}].")
    return found


def test_the_scanner_finds_pins() -> None:
    doc = yaml.safe_load("precision: bf16\nmodel: {dtype: float32, base: x}\nok: {dtype: auto}\n"
                         "args: [python, -m, serving, model.dtype=bf16, --dtype, bfloat16, precision=auto]\n")
    assert pinned_dtypes(doc) == ["precision=bf16", "model.dtype=float32", "args.[3] model.dtype=bf16",
                                  "args.[4] --dtype bfloat16"]


def test_no_config_in_the_repo_pins_a_dtype() -> None:
    files = sorted(p for room in ("training", "serving", "ingest", "infra") for ext in ("yaml", "yml")
                   for p in (REPO / room).rglob(f"*.{ext}"))
    assert len(files) >= 10 and any(p.name == "dpo.smollm2.yaml" for p in files)
    pins = [f"{p.relative_to(REPO)}: {pin}" for p in files for doc in yaml.safe_load_all(p.read_text())
            for pin in pinned_dtypes(doc)]
    assert pins == [], "configs must say precision/dtype: auto (training.precision decides from the hardware)"


# --- benchmarks say where they ran --------------------------------------------------------------

def test_bench_json_records_the_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, avx2_machine: None) -> None:
    from tests.benchmarks import _machine

    monkeypatch.setattr(_machine, "BENCH_DIR", tmp_path)
    path = _machine.save("x.json", {"tokens_per_s": 1.0}, dtype=torch.bfloat16, threads=3)
    rec = yaml.safe_load(path.read_text())  # JSON is YAML
    assert rec["tokens_per_s"] == 1.0
    m = rec["machine"]
    assert (m["cpu_model"], m["cpu_capability"], m["threads"], m["dtype"]) == ("AMD EPYC 7B13", "AVX2", 3, "bf16")
    assert (m["auto_dtype"], m["cpu_native_bf16"]) == ("fp32", [])  # a pinned bf16 on AVX2 stands out
    assert _machine.machine(None)["dtype"] is None


def test_every_benchmark_writes_through_the_machine_record() -> None:
    benches = sorted((REPO / "tests" / "benchmarks").glob("bench_*.py"))
    assert len(benches) >= 5
    for path in benches:
        src = path.read_text()
        assert "from tests.benchmarks._machine import" in src, f"{path.name} writes var/bench without the machine record"
