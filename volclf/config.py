"""Typed, frozen run descriptions and the one precedence order that builds them.

Configuration flows one way (STYLE.md): dataclass defaults < preset in ``jobs/<arch>.toml``
< command-line overrides (``--set section.key=value``) -> a frozen :class:`RunConfig`
-> the run folder's ``config.json`` -> the training function.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volclf.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
JOBS_DIR = ROOT / "jobs"
ARCHS = ("vit", "cnn")
PRESETS = ("seed", "small", "tiny")


@dataclass(frozen=True)
class ViTConfig:
    """The transformer of SPEC §2; the defaults are the seed (full-size) model."""

    input_shape: tuple[int, int, int] = (10, 190, 190)  # (D, H, W), one channel
    patch_size: int = 10
    embed_dim: int = 256
    # The patch encoder's four convolutions have embed_dim times these many filters.
    stem_multipliers: tuple[int, ...] = (8, 4, 2, 1)
    depth: int = 18
    num_heads: int = 4
    mlp_dim: int = 512
    dropout: float = 0.15
    # 1-based indices of the transformer layers whose outputs the decoder concatenates.
    skip_layers: tuple[int, ...] = (3, 6, 9, 12, 15, 18)
    pool: str = "flatten"  # "flatten" (the Keras example) or "mean" over patches
    decoder_dim: int = 128
    fused_attention: bool = True


@dataclass(frozen=True)
class ResNetConfig:
    """The 3D ResNet of SPEC §2; the defaults are the seed (full-size) model."""

    input_shape: tuple[int, int, int] = (190, 190, 190)  # (D, H, W), one channel
    width: int = 32
    # One string per stage, one letter per residual block: "d" downsample, "p" plain.
    stages: tuple[str, ...] = ("pp", "pp", "dp", "pp", "pp", "dp", "pp", "pp", "dp", "pp")
    final_pool: int = 2
    hidden_dims: tuple[int, ...] = (256, 256)
    channels_last: bool = False


ModelConfig = ViTConfig | ResNetConfig
MODEL_CONFIGS: dict[str, type] = {"vit": ViTConfig, "cnn": ResNetConfig}


@dataclass(frozen=True)
class DataConfig:
    """Where the volumes come from and how they are split."""

    source: str = "synthetic"  # "synthetic", a folder, or a .npz file
    data_seed: int = 0  # fixes the split and the synthetic set; separate from the model seed
    val_fraction: float = 0.25
    split: str = "holdout"  # "holdout" or "kfold"
    folds: int = 5
    # Real data: where prepared volumes are cached; "" = a .volclf-cache folder next to the data.
    cache_dir: str = ""
    # Synthetic set only:
    num_classes: int = 3
    num_samples: int = 256
    noise: float = 0.6
    augment: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings."""

    epochs: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    num_workers: int = -1  # -1: the job's CPUs minus one
    device: str = "auto"  # "auto", "cpu", "cuda"
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp32"
    compile: bool = False
    deterministic: bool = False  # bitwise-repeatable kernels (slower on GPU)
    threads: int = 0  # CPU threads for torch; 0: the job's CPUs


@dataclass(frozen=True)
class ResourceConfig:
    """What one job asks the scheduler for (a CEDIA node by default)."""

    cpus_per_task: int = 12
    mem_gb: int = 64
    gpus: int = 1
    gpu_type: str = ""  # e.g. "a100-sxm4-40gb"; empty: any GPU
    gpu_request: str = "gres"  # "gres" (--gres=gpu[:type]:N), "gpus" (--gpus), "gpus-per-node"
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""
    qos: str = ""
    array_parallelism: int = 0  # 0: no throttle
    wckey: str = ""
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to checkpoint
    setup: tuple[str, ...] = ()  # shell lines run before the job (module load, activate)
    max_requeues: int = 10


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; its identity is (campaign, arch, run, seed)."""

    campaign: str
    arch: str
    run: int
    seed: int
    preset: str
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    results: str = "results"

    @property
    def run_dir(self) -> Path:
        return Path(self.results) / self.campaign / self.arch / f"run-{self.run}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> RunConfig:
        data = dict(data)
        arch = data.get("arch")
        if arch not in MODEL_CONFIGS:
            raise ConfigError(f"{where}: arch must be one of {', '.join(ARCHS)}, got {arch!r}")
        data["model"] = _build(MODEL_CONFIGS[arch], data.get("model", {}), f"{where}: model")
        for name, typ in (("data", DataConfig), ("train", TrainConfig), ("resources", ResourceConfig)):
            data[name] = _build(typ, data.get(name, {}), f"{where}: {name}")
        return _build(cls, data, where, nested_ok=True)


SECTIONS = ("model", "data", "train", "resources")


def _build(cls: type, values: dict[str, Any], where: str, nested_ok: bool = False) -> Any:
    """Instantiate a config dataclass from plain values, checking names and types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in values.items():
        if nested_ok and dataclasses.is_dataclass(value):
            kwargs[key] = value
        else:
            kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, where) for v in value)
    if origin in (typing.Union, types.UnionType) or hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"train.lr=1e-3"`` -> ``("train", "lr", 0.001)``; values are read as TOML, else as text."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.lr=1e-3")
    key, raw = text.split("=", 1)
    section, _, name = key.strip().partition(".")
    if section not in SECTIONS or not name:
        raise ConfigError(
            f"--set {text!r}: the key must be <section>.<name> with section one of {', '.join(SECTIONS)}"
        )
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, name, value


def load_preset(arch: str, preset: str, jobs_dir: Path = JOBS_DIR) -> dict[str, dict[str, Any]]:
    """The ``[<preset>.<section>]`` tables of ``jobs/<arch>.toml``."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    path = jobs_dir / f"{arch}.toml"
    try:
        with path.open("rb") as fh:
            presets = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: preset file missing") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    if preset not in presets:
        raise ConfigError(f"{path}: no preset {preset!r}; presets: {', '.join(presets)}")
    tables = presets[preset]
    bad = sorted(set(tables) - set(SECTIONS))
    if bad:
        raise ConfigError(f"{path}: [{preset}] has unknown table(s) {bad}; valid: {SECTIONS}")
    return {s: dict(tables.get(s, {})) for s in SECTIONS}


def make_run_config(
    *,
    campaign: str,
    arch: str,
    run: int,
    seed: int,
    preset: str,
    overrides: dict[str, dict[str, Any]] | None = None,
    results: str | Path = "results",
    jobs_dir: Path = JOBS_DIR,
) -> RunConfig:
    """Preset < overrides, resolved into a frozen :class:`RunConfig`."""
    tables = load_preset(arch, preset, jobs_dir)
    for section, values in (overrides or {}).items():
        tables[section].update(values)
    return RunConfig.from_dict(
        {
            "campaign": campaign,
            "arch": arch,
            "run": run,
            "seed": seed,
            "preset": preset,
            "results": str(results),
            **tables,
        },
        where=f"{arch} preset {preset!r}",
    )


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two ``to_dict()`` results."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{key}.")
        elif _normal(va) != _normal(vb):
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def _normal(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def load_profile(name: str, jobs_dir: Path = JOBS_DIR) -> dict[str, Any]:
    """The ``[resources]`` table of the cluster profile ``jobs/profiles/<name>.toml``."""
    folder = jobs_dir / "profiles"
    path = folder / f"{name}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.toml"))) or "none"
        raise ConfigError(f"no cluster profile {name!r} ({path} is missing); profiles: {known}")
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(doc) - {"resources", "description"})
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {unknown}; a profile has [resources] (and a description)")
    values = dict(doc.get("resources", {}))
    _build(ResourceConfig, values, str(path))  # validate names and types now, with the file's name
    return values
