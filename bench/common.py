"""Shared pieces of the bench scripts: the training step as volclf runs it, its variants, the
peer model, FLOP counting, device peaks, volclf's memory estimate and the CPU peak-memory probe.

Also a small command line used by bench/train.py and tests/test_fastpaths.py to measure CPU
peak memory in a fresh process (the only honest way on CPU: a process's high-water mark):

    python bench/common.py memory '{"specs": [{"arch": "vit", "model": {...}, "batch_sizes": [4, 16]}]}'
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the volclf next to it
    sys.path.insert(0, str(ROOT))

from volclf.config import MODEL_CONFIGS, ModelConfig, ViTConfig, make_run_config  # noqa: E402
from volclf.models import build_model, count_parameters, training_memory_estimate  # noqa: E402

NUM_CLASSES = 3

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets. Matched
# in order against torch.cuda.get_device_name(); a device not listed gets no MFU ("n/a").
BF16_PEAKS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 PCIe", 0.0),  # a different peak (756 TFLOP/s); not in the table we were given
    ("H100 NVL", 0.0),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),  # SXM4 and PCIe, 40 and 80 GB
]

VARIANTS = ("volclf", "fp32-eager", "bf16", "channels-last", "compiled", "monai")
VARIANT_HELP = {
    "volclf": "as shipped: train.py's step (bf16 autocast + fused AdamW + TF32 on CUDA, fp32 on CPU), fused attention",
    "fp32-eager": "the same model in plain fp32 eager: plain attention, no TF32, default AdamW, no autocast",
    "bf16": "volclf with bf16 autocast forced (on CPU too); on CUDA the same as volclf",
    "channels-last": "volclf with the cnn in channels_last_3d (model.channels_last=true)",
    "compiled": "volclf under torch.compile (train.compile=true); the compilation is in first_step_s",
    "monai": "the peer: monai.networks.nets.ViT at the equal configuration, volclf's training step",
}


# ------------------------------------------------------------------------- configurations
def preset_config(arch: str, preset: str) -> tuple[ModelConfig, int]:
    """The model configuration and batch size of a preset in ``jobs/<arch>.toml``."""
    cfg = make_run_config(campaign="bench", arch=arch, run=0, seed=0, preset=preset)
    return cfg.model, cfg.train.batch_size


def model_config(arch: str, values: dict[str, Any]) -> ModelConfig:
    """A model configuration from ``dataclasses.asdict`` output (lists back to tuples)."""
    return MODEL_CONFIGS[arch](**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# The peer comparison. What MONAI's ViT cannot follow in the seed model (the four-layer patch
# stem, the skip-layer decoder with flatten) is replaced on volclf's side by what MONAI has: a
# one-layer patch stem and one pooled representation into a small head, whose width is chosen
# so that both networks have the same number of parameters. Everything else is the seed
# transformer: 10×190×190 input, patch 10, width 256, 18 layers, 4 heads, MLP 512, dropout 0.15.
PEER_SEED = dict(input_shape=(10, 190, 190), patch_size=10, embed_dim=256, depth=18, num_heads=4,
                 mlp_dim=512, dropout=0.15)
PEER_TINY = dict(input_shape=(4, 16, 16), patch_size=4, embed_dim=16, depth=2, num_heads=2,
                 mlp_dim=32, dropout=0.1)
PARAM_TOLERANCE = 0.01


def peer_configs(tiny: bool = False) -> tuple[ViTConfig, dict[str, Any]]:
    """(volclf's ViTConfig, MONAI ViT keyword arguments) of the equal configuration."""
    t = PEER_TINY if tiny else PEER_SEED
    monai = dict(
        in_channels=1, img_size=t["input_shape"], patch_size=t["patch_size"], hidden_size=t["embed_dim"],
        mlp_dim=t["mlp_dim"], num_layers=t["depth"], num_heads=t["num_heads"], proj_type="conv",
        classification=True, num_classes=NUM_CLASSES, dropout_rate=t["dropout"],
        qkv_bias=True,  # the seed's Dense layers have biases, and so has volclf's qkv
    )
    base = ViTConfig(**t, stem_multipliers=(1,), pool="mean", skip_layers=(t["depth"],), decoder_dim=1)
    target = count_on_meta(lambda: MonaiLogits(**monai)) if monai_available() is None else None
    if target is not None:  # each unit of the head's hidden layer costs embed_dim + 1 + num_classes weights
        one = count_on_meta(lambda: build_model(base, NUM_CLASSES))
        width = max(1, 1 + round((target - one) / (t["embed_dim"] + 1 + NUM_CLASSES)))
        base = dataclasses.replace(base, decoder_dim=width)
    return base, monai


def count_on_meta(make: Callable[[], nn.Module]) -> int:
    with torch.device("meta"):
        return count_parameters(make())


def monai_available() -> str | None:
    """None when MONAI's ViT can be built, else why not (and how to install it)."""
    try:
        from monai.networks.nets import ViT  # noqa: F401
        import einops  # noqa: F401  (MONAI's attention rearranges with it)
    except ImportError as exc:
        return f"{exc}; install the benchmark-only extra: .venv/bin/pip install monai==1.6.1 einops"
    return None


class MonaiLogits(nn.Module):
    """MONAI's ViT returns (logits, hidden states); the training step wants the logits."""

    def __init__(self, **kwargs: Any):
        super().__init__()
        from monai.networks.nets import ViT

        self.net = ViT(**kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


# --------------------------------------------------------------------------- training step
@dataclass
class Case:
    """One thing to measure: a model configuration (or the peer), a variant, a batch size."""

    arch: str  # "vit" or "cnn"
    preset: str  # a preset name, or a label ("peer") when cfg is given
    variant: str
    batch_size: int
    cfg: ModelConfig | None = None  # None: the preset's
    monai_kwargs: dict[str, Any] | None = None  # the peer's configuration (variant "monai")

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose from {', '.join(VARIANTS)}")
        if self.cfg is None:
            self.cfg = preset_config(self.arch, self.preset)[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch_size, 1, *self.cfg.input_shape)

    def build(self, device: torch.device | str = "cpu") -> nn.Module:
        if self.variant == "monai":
            return MonaiLogits(**(self.monai_kwargs or peer_configs()[1])).to(device)
        cfg = self.cfg
        if self.variant == "channels-last":
            cfg = dataclasses.replace(cfg, channels_last=True)
        elif self.variant == "fp32-eager" and isinstance(cfg, ViTConfig):
            cfg = dataclasses.replace(cfg, fused_attention=False)
        elif self.variant == "fp32-eager":
            cfg = dataclasses.replace(cfg, channels_last=False)
        return build_model(cfg, NUM_CLASSES).to(device)


class TrainStep:
    """One optimiser step on a fixed random batch, as volclf.train.Trainer does it.

    The same sequence as ``Trainer._train_epoch``: autocast forward, cross-entropy on float
    logits, backward, gradient clipping at 1.0, AdamW step, ``zero_grad(set_to_none=True)``;
    no host synchronisation inside the step. Data loading is not part of it.
    """

    def __init__(self, case: Case, device: torch.device):
        self.case, self.device = case, device
        cuda = device.type == "cuda"
        v = case.variant
        self.amp_dtype = torch.bfloat16 if (cuda and v != "fp32-eager") or v == "bf16" else None
        self.plain = v == "fp32-eager"
        model = case.build(device)
        self.memory_format = torch.contiguous_format
        channels_last = v == "channels-last" or (v != "fp32-eager" and getattr(case.cfg, "channels_last", False))
        if channels_last:
            self.memory_format = torch.channels_last_3d
            model = model.to(memory_format=self.memory_format)
        self.model = model
        self.model.train()
        # train.py: fused AdamW on CUDA; the plain variant keeps PyTorch's default implementation.
        fused = cuda and not self.plain
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=fused or None)
        self.step_model: Callable[[torch.Tensor], torch.Tensor] = model
        if v == "compiled":
            self.step_model = torch.compile(model)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(case.input_shape, generator=g)
        self.x = x.to(device, memory_format=self.memory_format)
        self.y = torch.randint(0, NUM_CLASSES, (case.batch_size,), generator=g).to(device)

    def activate(self) -> None:
        """Set the process-wide switches this variant runs under (variants are interleaved)."""
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = not self.plain
            torch.backends.cudnn.allow_tf32 = not self.plain
            torch.backends.cudnn.benchmark = not self.plain

    def __call__(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None):
            logits = self.step_model(self.x)
            loss = F.cross_entropy(logits.float(), self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def resident_bytes(self) -> int:
        """Bytes this case holds between steps: weights, buffers, optimiser state, the batch."""
        tensors = [*self.model.parameters(), *self.model.buffers(), self.x, self.y]
        for state in self.optimizer.state.values():
            tensors += [t for t in state.values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: TrainStep, n: int) -> list[float]:
    """Wall time of each of ``n`` steps, the device synchronised at each end."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        synchronize(step.device)
        times.append(time.perf_counter() - t0)
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); a single value gives it three times."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


# ---------------------------------------------------------------------------------- FLOPs
def flops_per_sample(case: Case) -> int:
    """Forward + backward FLOPs of one sample (FlopCounterMode on the meta device: no compute).

    Counts matrix products, convolutions and attention (2 FLOPs per multiply-add); elementwise
    work, norms and the optimiser are not counted, as usual for MFU.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = case.build("meta")
    model.train()
    x = torch.empty(case.input_shape, device="meta")
    y = torch.zeros(case.batch_size, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x).float(), y).backward()
    return round(counter.get_total_flops() / case.batch_size)


def bf16_peak(device_name: str) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when the table does not know it."""
    for pattern, peak in BF16_PEAKS:
        if pattern.lower() in device_name.lower():
            return peak or None
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_model()}, {torch.get_num_threads()} threads)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# --------------------------------------------------------------------------------- memory
def memory_estimate(case: Case) -> dict[str, int]:
    """volclf's own estimate (``training_memory_estimate``); the peer has none."""
    if case.variant == "monai":
        return {}
    return training_memory_estimate(case.cfg, NUM_CLASSES)


def estimated_peak(case: Case, device: torch.device) -> int | None:
    """Estimated bytes for one training step of ``case``: fixed + per sample × batch."""
    est = memory_estimate(case)
    if not est:
        return None
    bf16 = (device.type == "cuda" and case.variant != "fp32-eager") or case.variant == "bf16"
    return est["fixed"] + case.batch_size * est["per_sample_bf16" if bf16 else "per_sample_fp32"]


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None off Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak_rss() -> None:
    # Linux >= 4.0: writing 5 resets the process's peak RSS (VmHWM) to its current RSS.
    Path("/proc/self/clear_refs").write_text("5")


def cpu_memory_probe(specs: list[dict[str, Any]], threads: int = 0) -> list[dict[str, Any]]:
    """Peak RSS of training steps for each spec and batch size, in this (fresh) process.

    A spec is ``{"arch", "model" (asdict of the configuration), "batch_sizes", "variant",
    "steps", "monai_kwargs"}``. First a tiny model of the same architecture takes a step, so
    that what any first step loads once (kernel libraries, thread pools) is resident before the
    baseline.
    The baseline is then the resident size before the spec's model is built; for each batch
    size (ascending, same model and optimiser) the peak RSS is reset, the steps run, and the
    high-water mark minus the baseline is reported: weights, gradients, AdamW state and
    activations, as CUDA's max_memory_allocated counts them (plus allocator slack).
    """
    if threads:
        torch.set_num_threads(threads)
    results = []
    for spec in specs:
        arch, variant, steps = spec["arch"], spec.get("variant", "volclf"), spec.get("steps", 2)
        torch.manual_seed(0)
        warm = Case(arch, "tiny", "bf16" if variant == "bf16" else "volclf", 4)
        TrainStep(warm, torch.device("cpu"))()
        del warm
        if variant == "monai":
            from monai.networks.nets import ViT  # noqa: F401  (its import is not the model's memory)
        gc.collect()
        baseline = _proc_status_kib("VmRSS")
        cfg = model_config(arch, spec["model"])
        peaks: dict[str, int] = {}
        step = None
        for b in sorted(spec["batch_sizes"]):
            case = Case(arch, "probe", variant, b, cfg=cfg, monai_kwargs=spec.get("monai_kwargs"))
            if step is None:
                step = TrainStep(case, torch.device("cpu"))
            else:  # same model and optimiser, a new batch
                g = torch.Generator().manual_seed(0)
                step.case = case
                step.x = torch.randn(case.input_shape, generator=g).to(memory_format=step.memory_format)
                step.y = torch.randint(0, NUM_CLASSES, (b,), generator=g)
            gc.collect()
            _reset_peak_rss()
            for _ in range(steps):
                step()
            # (tiny models: the peak can sit a few pages below the baseline; that reads as 0)
            peaks[str(b)] = max(0, _proc_status_kib("VmHWM") - baseline)
        del step
        gc.collect()
        results.append({"baseline_rss_bytes": baseline, "peak_bytes": peaks})
    return results


def measure_cpu_peaks(specs: list[dict[str, Any]], threads: int = 0, timeout: float = 900) -> list[dict[int, int]]:
    """Run :func:`cpu_memory_probe` in a fresh process; per spec, bytes per batch size.

    The child's malloc returns every block above 128 KiB to the system when freed
    (MALLOC_MMAP_THRESHOLD_), so its high-water mark follows the tensors alive rather than
    what glibc keeps for later; the timing runs, in the parent, are not affected.
    """
    specs = [dict(s, model=dataclasses.asdict(s["model"])) if dataclasses.is_dataclass(s["model"]) else s
             for s in specs]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    arg = json.dumps({"specs": specs, "threads": threads})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "memory", arg],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"CPU memory probe failed ({arg[:300]}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return [{int(b): p for b, p in r["peak_bytes"].items()} for r in out]


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "memory":
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(cpu_memory_probe(**json.loads(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
