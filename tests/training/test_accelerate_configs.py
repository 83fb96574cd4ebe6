"""Every launch topology in accelerate_configs/ parses with Accelerate's own config loader."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "accelerate_configs").glob("*.yaml"))
EXPECTED = {
    "cpu": ("NO", 1), "cpu_2proc": ("MULTI_GPU", 2), "gpu_1": ("NO", 1), "gpu_8_ddp": ("MULTI_GPU", 8),
    "gpu_8_fp8_torchao": ("MULTI_GPU", 8), "gpu_8_fp8_te": ("MULTI_GPU", 8), "gpu_8_fsdp": ("FSDP", 8),
    "multi_node": ("MULTI_GPU", 16), "cpu_2proc_fsdp": ("FSDP", 2),
}


def test_all_topologies_present():
    assert {p.stem for p in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads(path):
    config = load_config_from_file(str(path))
    distributed, processes = EXPECTED[path.stem]
    assert str(config.distributed_type).split(".")[-1] == distributed
    assert config.num_processes == processes
    if "fp8" in path.stem:
        assert str(config.mixed_precision).split(".")[-1].lower() == "fp8"
        assert config.fp8_config["backend"] in ("AO", "TE")
    if path.stem.startswith("cpu"):
        assert config.use_cpu
