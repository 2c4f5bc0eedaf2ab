"""The two models: SPEC §2 figures at the seed size, and sanity for every preset."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT, subprocess_env
from volclf.config import PRESETS, ResNetConfig, ViTConfig, make_run_config
from volclf.models import build_model, count_parameters, describe
from volclf.models.vit import same_padding

ALL = [(arch, preset) for arch in ("vit", "cnn") for preset in PRESETS]


def model_cfg(arch: str, preset: str):
    return make_run_config(campaign="t", arch=arch, run=0, seed=0, preset=preset).model


def test_seed_vit_has_361_tokens_and_the_flatten_decoder():
    info = describe(ViTConfig(), num_classes=3)
    assert info["tokens"] == 361 and info["patch_grid"] == [1, 19, 19]
    assert info["decoder_features"] == 361 * 6 * 256 == 554_496
    m = build_model(ViTConfig(), 3)
    assert m.decoder_fc.weight.numel() == 554_496 * 128  # about 71 M weights, as SPEC says
    stem = [m.patch_embed.proj.out_channels] + [c.out_channels for c in m.patch_embed.mix]
    assert stem == [2048, 1024, 512, 256]
    assert len(m.blocks) == 18 and m.blocks[0].attn.num_heads == 4
    assert (m.blocks[0].mlp.fc1.out_features, m.blocks[0].mlp.fc2.out_features) == (512, 256)


def test_seed_vit_mean_pool_option_changes_only_the_decoder_width():
    info = describe(ViTConfig(pool="mean"), num_classes=3)
    assert info["tokens"] == 361 and info["decoder_features"] == 6 * 256


def test_seed_cnn_has_20_blocks_and_55296_flatten_features():
    info = describe(ResNetConfig(), num_classes=3)
    assert info["flatten_features"] == 55_296 == 32 * 12**3
    assert info["feature_shape"] == [32, 12, 12, 12]
    assert info["residual_blocks"] == 20
    m = build_model(ResNetConfig(), 3)
    assert [fc.out_features for fc in m.fc] == [256, 256] and m.fc[0].in_features == 55_296


def test_keras_same_padding():
    assert same_padding(190, 10, 10) == (0, 0)
    assert same_padding(15, 10, 10) == (2, 3)  # out = ceil(15/10) = 2 -> 20 - 15 = 5 padded
    assert same_padding(4, 4, 4) == (0, 0)


@pytest.mark.parametrize("arch,preset", ALL)
def test_preset_parameter_count_matches_describe(arch, preset):
    cfg = model_cfg(arch, preset)
    assert describe(cfg, 4)["parameters"] == count_parameters(build_model(cfg, 4))


@pytest.mark.parametrize("arch,preset", [a for a in ALL if a[1] != "seed"])
def test_forward_backward_every_parameter_gets_a_gradient(arch, preset):
    torch.manual_seed(0)
    cfg = model_cfg(arch, preset)
    model = build_model(cfg, 3)
    x = torch.randn(3, 1, *cfg.input_shape)
    out = model(x)
    assert out.shape == (3, 3) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters()), "a parameter got a zero gradient"


@pytest.mark.parametrize("preset", PRESETS)
def test_fused_attention_equals_the_plain_path(preset):
    torch.manual_seed(0)
    cfg = model_cfg("vit", preset)
    if preset == "seed":  # full size on CPU: compare one transformer layer at the seed width
        from volclf.models.vit import Attention

        attn = Attention(cfg.embed_dim, cfg.num_heads).eval()
        x = torch.randn(2, 361, cfg.embed_dim)
        fused = attn(x)
        attn.fused = False
        torch.testing.assert_close(fused, attn(x), rtol=1e-4, atol=1e-5)
        return
    model = build_model(cfg, 3).eval()
    x = torch.randn(2, 1, *cfg.input_shape)
    with torch.no_grad():
        fused = model(x)
        model.set_fused_attention(False)
        plain = model(x)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vit", "cnn"])
def test_seed_model_forward_at_full_input_size_on_cpu(arch):
    cfg = model_cfg(arch, "seed")
    model = build_model(cfg, 3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, *cfg.input_shape))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_describe_command_prints_json():
    for arch, key, value in (("vit", "tokens", 361), ("cnn", "flatten_features", 55_296)):
        proc = subprocess.run([PYTHON, "-m", "volclf", "describe", "--arch", arch, "--preset", "seed", "--json"],
                              capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=120)
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert info[key] == value
        assert info["input_shape"] == [1, *model_cfg(arch, "seed").input_shape]
        assert info["memory_per_sample_bytes"]["fp32"] > info["memory_per_sample_bytes"]["bf16"] > 0


def test_memory_estimate_grows_with_input():
    small = describe(model_cfg("cnn", "tiny"), 3)["memory_per_sample_bytes"]["fp32"]
    big = describe(model_cfg("cnn", "small"), 3)["memory_per_sample_bytes"]["fp32"]
    assert big > small > 0
