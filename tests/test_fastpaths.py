"""The fast paths compute what the plain paths compute: fused attention, channels_last_3d,
bf16 autocast, torch.compile's graph capture; and volclf's memory estimate against a measured
peak. All on CPU; the CUDA figures come from bench/gpu_check.sh."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import PYTHON, ROOT, subprocess_env
from volclf.config import make_run_config
from volclf.models import build_model, training_memory_estimate
from volclf.models.vit import Attention


def _load_bench_common():
    """bench/common.py, loaded by path: bench/ is scripts, not a package on sys.path."""
    spec = importlib.util.spec_from_file_location("volclf_bench_common", ROOT / "bench" / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_bench_common()

LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def model_cfg(arch: str, preset: str, **changes):
    cfg = make_run_config(campaign="t", arch=arch, run=0, seed=0, preset=preset).model
    return dataclasses.replace(cfg, **changes)


def loss_and_grads(model, x, autocast: bool = False):
    """Training-mode loss and every parameter's gradient, as the training step computes them."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), LABELS[: len(x)])
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(got: dict, want: dict, rtol: float) -> None:
    """Every parameter's gradient, with an absolute tolerance relative to the largest gradient
    entry of the model: some gradients are exactly zero in exact arithmetic (the stem
    convolution's bias, which max-pool and batch norm cancel), so only rounding is left there."""
    assert got.keys() == want.keys()
    scale = max(g.abs().max().item() for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * 0.1 * scale,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")
    flat_got = torch.cat([got[n].flatten() for n in want])
    flat_want = torch.cat([g.flatten() for g in want.values()])
    assert (flat_got - flat_want).norm() <= rtol * flat_want.norm()


# ------------------------------------------------------------------------ fused attention
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_fused_attention_gives_the_plain_paths_output_and_gradients_in_training(preset):
    torch.manual_seed(0)
    model = build_model(model_cfg("vit", preset, dropout=0.0), 3).train()  # batch norm on batch statistics
    x = torch.randn(6, 1, *model.cfg.input_shape)
    fused_out, fused_loss, fused_grads = loss_and_grads(model, x)
    model.set_fused_attention(False)
    assert not any(b.attn.fused for b in model.blocks)
    plain_out, plain_loss, plain_grads = loss_and_grads(model, x)
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(fused_grads, plain_grads, rtol=1e-3)


def test_fused_attention_layer_at_the_seed_width_matches_in_value_and_gradient():
    torch.manual_seed(0)
    cfg = model_cfg("vit", "seed")
    attn = Attention(cfg.embed_dim, cfg.num_heads)
    x = torch.randn(2, 361, cfg.embed_dim, requires_grad=True)
    upstream = torch.randn(2, 361, cfg.embed_dim)
    results = []
    for fused in (True, False):
        attn.fused = fused
        attn.zero_grad(set_to_none=True)
        x.grad = None
        out = attn(x)
        out.backward(upstream)
        results.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in attn.named_parameters()}))
    (fo, fx, fg), (po, px, pg) = results
    torch.testing.assert_close(fo, po, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fx, px, rtol=1e-3, atol=1e-5)
    assert_grads_close(fg, pg, rtol=1e-3)


# -------------------------------------------------------------------------------- dropout
def test_cpu_dropout_draws_the_mask_of_nn_dropout():
    """volclf.models.vit.Dropout thresholds uniform numbers on CPU instead of ATen's bernoulli_:
    the same distribution (keep with probability 1-p, scale the kept by 1/(1-p)), the mask as
    the gradient, the input's dtype, and nn.Dropout's behaviour in eval mode and at p = 0 or 1."""
    from volclf.models.vit import Dropout

    torch.manual_seed(0)
    n, p = 400_000, 0.15
    drop = Dropout(p).train()
    x = torch.ones(n, requires_grad=True)
    y = drop(x)
    kept = y != 0
    # binomial: sd of the kept fraction = sqrt(p(1-p)/n) = 0.00056; 0.003 is over 5 sd
    assert abs(kept.float().mean().item() - (1 - p)) < 0.003
    torch.testing.assert_close(y[kept], torch.full((int(kept.sum()),), 1 / (1 - p)))
    y.backward(torch.ones(n))
    assert torch.equal(x.grad, y.detach())
    again = drop(x)
    assert not torch.equal(again != 0, kept)  # a new mask each call
    assert drop(torch.ones(8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros(n))
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert drop.eval()(x) is x


# ---------------------------------------------------------------------- channels_last_3d
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_channels_last_3d_cnn_matches_the_contiguous_one(preset):
    torch.manual_seed(0)
    ref = build_model(model_cfg("cnn", preset), 3).train()
    fast = copy.deepcopy(ref).to(memory_format=torch.channels_last_3d)
    x = torch.randn(4, 1, *ref.cfg.input_shape)
    ref_out, ref_loss, ref_grads = loss_and_grads(ref, x)
    fast_out, fast_loss, fast_grads = loss_and_grads(fast, x.to(memory_format=torch.channels_last_3d))
    # the conversion really happened: convolution weights and their gradients are channels-last
    conv = fast.stages[0][0].conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert conv.weight.grad.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(fast_out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=1e-6)
    # The two layouts use different convolution kernels, whose rounding differs by ~1e-6. Where a
    # ReLU or max-pool input sits that close to its switch point, the two runs route one element's
    # gradient differently: that alone moves a layer's gradient by ~1/sqrt(elements), ~0.5 % at
    # the small preset, where one ReLU of 70 304 flips on the channels-last side (checked against
    # float64: the other layout is within 1e-6 of it). A layout bug (a wrong stride, a permuted
    # axis) moves it by ~100 %.
    largest = max(g.norm() for g in ref_grads.values())
    for name, want in ref_grads.items():
        if want.norm() < 1e-3 * largest:
            continue  # the stem convolution's bias: zero up to rounding (max-pool and batch norm cancel it)
        rel = ((fast_grads[name] - want).norm() / want.norm()).item()
        assert rel < 0.02, f"gradient of {name} differs by {rel:.2%} between the layouts"


# ----------------------------------------------------------------------- bf16 autocast
@pytest.mark.parametrize("arch,preset", [(a, p) for a in ("vit", "cnn") for p in ("tiny", "small")])
def test_bf16_autocast_on_cpu_trains_the_same_model_within_a_loose_tolerance(arch, preset):
    """bf16 keeps 8 bits of mantissa. The block outputs differ by ~0.5 %; the decoder's batch norm
    removes each feature's large mean over the batch and patches, which turns that into ~5-10 %
    on the logits of an untrained vit. Hence loose bounds on logits and gradient direction, a
    tight one on the loss."""
    torch.manual_seed(0)
    changes = {"dropout": 0.0} if arch == "vit" else {}
    model = build_model(model_cfg(arch, preset, **changes), 3).train()
    x = torch.randn(8, 1, *model.cfg.input_shape)
    out32, loss32, grads32 = loss_and_grads(model, x)
    out16, loss16, grads16 = loss_and_grads(model, x, autocast=True)
    assert out32.dtype == torch.float32 and out16.dtype == torch.bfloat16  # autocast really ran the head in bf16
    assert torch.isfinite(out16).all() and torch.isfinite(loss16)
    rel = ((out16.float() - out32).norm() / out32.norm()).item()
    assert rel < 0.25, f"bf16 logits differ from fp32 by {rel:.1%}"
    assert abs(loss16 - loss32) / loss32 < 0.02
    g32 = torch.cat([g.flatten() for g in grads32.values()])
    g16 = torch.cat([grads16[n].float().flatten() for n in grads32])
    cos = F.cosine_similarity(g32, g16, dim=0).item()
    assert cos > 0.9, f"bf16 gradient direction differs from fp32: cosine {cos:.3f}"
    assert all(grads16[n].dtype == torch.float32 for n in grads16)  # parameters and their gradients stay fp32


# ------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("arch", ["vit", "cnn"])
def test_torch_compile_captures_each_model_whole_and_matches_eager(arch):
    """train.compile=true wraps the model in torch.compile. The graph capture (dynamo + AOT
    autograd, backend "aot_eager") must take each model in one graph, with no break that would
    cost speed on a GPU, and give eager's values. Inductor's code generation is not run here:
    compiling C++ for even the tiny models takes close to a minute on a 2-core CPU."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    changes = {"dropout": 0.0} if arch == "vit" else {}
    model = build_model(model_cfg(arch, "tiny", **changes), 3).train()
    x = torch.randn(4, 1, *model.cfg.input_shape)
    want_out, want_loss, want_grads = loss_and_grads(model, x)
    started = time.monotonic()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    got_out, got_loss, _ = loss_and_grads(compiled, x)
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert time.monotonic() - started < 60
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_loss, want_loss)
    assert_grads_close(got_grads, want_grads, rtol=1e-4)


# ----------------------------------------------------------------------- memory estimate
MEMORY_CASES = [("vit", "tiny", (16, 128)), ("cnn", "tiny", (16, 128)), ("vit", "small", (4, 16)), ("cnn", "small", (4, 16))]
GROWTH_BAND = (0.5, 2.0)


@pytest.mark.slow
def test_memory_estimate_per_sample_is_within_a_factor_two_of_the_measured_growth():
    """``training_memory_estimate`` (what ``describe`` prints and the batch sizes of the seed
    presets are chosen from) against the measured peak resident memory of CPU training steps
    at two batch sizes: the growth per sample must be within 0.5×–2× of the estimate. Measured
    on 2026-12-04: vit tiny 1.3×, cnn tiny 1.6×, vit small 0.7× (fused attention keeps less than
    the estimate counts), cnn small 1.2× (bench/README.md)."""
    specs = [{"arch": a, "model": model_cfg(a, p), "batch_sizes": list(bs), "steps": 2} for a, p, bs in MEMORY_CASES]
    peaks = bench.measure_cpu_peaks(specs, threads=1)
    report = []
    for (arch, preset, (b1, b2)), peak in zip(MEMORY_CASES, peaks):
        measured = (peak[b2] - peak[b1]) / (b2 - b1)
        estimate = training_memory_estimate(model_cfg(arch, preset), 3)["per_sample_fp32"]
        report.append((arch, preset, measured / estimate))
        assert peak[b2] > peak[b1] > 0
    bad = [r for r in report if not GROWTH_BAND[0] <= r[2] <= GROWTH_BAND[1]]
    assert not bad, f"measured/estimated per-sample memory outside {GROWTH_BAND}: {report}"


# ------------------------------------------------------------------------------- bench
def test_bf16_peak_table_knows_the_cluster_gpus_and_no_others():
    assert bench.bf16_peak("NVIDIA A100-SXM4-40GB") == 312e12
    assert bench.bf16_peak("NVIDIA A100-PCIE-40GB") == 312e12
    assert bench.bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.bf16_peak("NVIDIA H200") == 989e12
    assert bench.bf16_peak("NVIDIA H100 PCIe") is None  # another peak: no MFU rather than a wrong one
    assert bench.bf16_peak("Tesla V100-SXM2-32GB") is None


def test_peer_configurations_have_equal_parameter_counts():
    if bench.monai_available():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI installs the bench extra (make setup), yet: {bench.monai_available()}")
        pytest.skip(f"MONAI not installed: {bench.monai_available()}")
    for tiny in (True, False):
        cfg, kwargs = bench.peer_configs(tiny=tiny)
        ours = bench.count_on_meta(lambda: build_model(cfg, 3))
        theirs = bench.count_on_meta(lambda: bench.MonaiLogits(**kwargs))
        assert abs(ours - theirs) / theirs < bench.PARAM_TOLERANCE
        assert cfg.stem_multipliers == (1,) and cfg.pool == "mean"


@pytest.mark.slow
def test_bench_train_runs_every_code_path_at_tiny_size():
    """What bench/gpu_check.sh runs, on CPU at tiny sizes: a table and one JSON line per result."""
    import json

    proc = subprocess.run(
        [PYTHON, str(ROOT / "bench" / "train.py"), "--tiny", "--device", "cpu", "--repeats", "2", "--steps", "1",
         "--peer-repeats", "2", "--variants", "volclf", "fp32-eager", "bf16", "channels-last"],
        capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    runs = [r for r in lines if r["kind"] == "throughput"]
    assert {(r["arch"], r["variant"]) for r in runs} >= {("vit", "volclf"), ("vit", "fp32-eager"), ("vit", "bf16"),
                                                         ("cnn", "volclf"), ("cnn", "channels-last")}
    for r in runs:
        assert r["status"] == "ok" and r["samples_per_s"] > 0 and r["flops_per_sample"] > 0
        assert r["peak_memory_kind"] == "cpu_peak_rss" and r["peak_memory_bytes"] >= 0
        assert r["mfu"] is None  # no bf16 peak for a CPU
    assert any(r["kind"] == "ratio" and r["what"] == "volclf/fp32-eager" for r in lines)
    assert lines[-1]["kind"] == "summary"
