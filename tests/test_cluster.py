"""The SLURM request as submitit writes it (no scheduler needed): profiles, GPU forms, time."""

from __future__ import annotations

import pytest

from volclf.cluster import batch_script, gpu_parameters, parse_time
from volclf.config import ResourceConfig, RunConfig, load_profile
from volclf.errors import ConfigError


def profile(name: str, **over) -> ResourceConfig:
    values = {**load_profile(name), **over}
    return RunConfig.from_dict({"campaign": "c", "arch": "vit", "run": 0, "seed": 0, "preset": "seed",
                                "resources": values}).resources


def sbatch_lines(script: str) -> list[str]:
    return [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]


def test_cedia_dry_run_script_has_the_expected_request():
    script = batch_script(profile("cedia"), "volclf-vit-adni", "/home/u/results/adni/logs", 5)
    lines = sbatch_lines(script)
    for expected in (
        "#SBATCH --array=0-4%5",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --mem=64GB",
        "#SBATCH --gres=gpu:a100-sxm4-40gb:1",
        "#SBATCH --partition=gpu-dev",
        "#SBATCH --job-name=volclf-vit-adni",
        "#SBATCH --time=1440",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=/home/u/results/adni/logs/%A_%a/%A_%a_0_log.out",
    ):
        assert expected in lines, f"{expected} missing from:\n" + "\n".join(lines)
    assert "#SBATCH --wckey=submitit" not in lines  # empty unless a profile names one
    assert not any(ln.startswith("#SBATCH --time=5") for ln in lines)
    setup = script[script.index("# setup"):script.index("# command")]
    assert "module load python/3.11 pytorch/2.2 cuda/12.4" in setup
    assert "source $HOME/venvs/volclf/bin/activate" in setup


def test_single_run_is_a_plain_job_with_the_same_request():
    lines = sbatch_lines(batch_script(profile("default"), "volclf-cnn-x", "/r/x/logs", 1))
    assert not any("--array" in ln for ln in lines)
    assert "#SBATCH --gres=gpu:1" in lines and "#SBATCH --cpus-per-task=12" in lines
    assert "#SBATCH --time=1440" in lines


def test_array_throttle_from_the_profile():
    lines = sbatch_lines(batch_script(profile("default", array_parallelism=2), "n", "/r/logs", 10))
    assert "#SBATCH --array=0-9%2" in lines


@pytest.mark.parametrize("form,gpu_type,expected", [
    ("gres", "a100", {"slurm_gres": "gpu:a100:1"}),
    ("gres", "", {"slurm_gres": "gpu:1"}),
    ("gpus", "a100", {"slurm_additional_parameters": {"gpus": "a100:1"}}),
    ("gpus-per-node", "", {"gpus_per_node": 1}),
    ("gpus-per-node", "a100", {"slurm_additional_parameters": {"gpus_per_node": "a100:1"}}),
])
def test_gpu_request_forms(form, gpu_type, expected):
    assert gpu_parameters(ResourceConfig(gpu_request=form, gpu_type=gpu_type)) == expected


def test_gpus_form_in_the_script():
    lines = sbatch_lines(batch_script(profile("default", gpu_request="gpus"), "n", "/r/logs", 2))
    assert "#SBATCH --gpus=1" in lines and not any("--gres" in ln for ln in lines)


def test_unknown_gpu_request_form_lists_the_choices():
    with pytest.raises(ConfigError, match="gres, gpus, gpus-per-node"):
        gpu_parameters(ResourceConfig(gpu_request="cards"))


@pytest.mark.parametrize("text,minutes", [
    ("30", 30), ("30:30", 31), ("24:00:00", 1440), ("2-00:00:00", 2880), ("1-12", 2160), ("0-00:05", 5),
])
def test_slurm_time_formats(text, minutes):
    assert parse_time(text) == minutes


def test_bad_time_names_the_value():
    with pytest.raises(ConfigError, match="'tomorrow'"):
        parse_time("tomorrow")


def test_profile_with_an_unknown_field_names_the_file(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "bad.toml").write_text("[resources]\ngpu_count = 2\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*gpu_count"):
        load_profile("bad", jobs_dir=tmp_path)
