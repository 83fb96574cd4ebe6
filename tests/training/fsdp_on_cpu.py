"""Run a module under Accelerate's FSDP2 code path on CPU processes (a test harness).

Accelerate 1.15 enables FSDP only for accelerator devices: with CPU processes its state says
MULTI_CPU and `prepare` silently skips sharding, although FSDP2 itself (`fully_shard` on a CPU
mesh, gloo collectives) works on the CPU. This launcher switches the state to FSDP when Accelerate
built an FSDP plugin from the launch config, then runs the module as `python -m` would, so a
2-process CPU test goes through the same `prepare` (auto-wrap, `fully_shard`, optimizer parameter
switch), `save_state`/`load_state` (torch.distributed.checkpoint) and `get_state_dict` as a GPU run.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file accelerate_configs/cpu_2proc_fsdp.yaml \\
        tests/training/fsdp_on_cpu.py training.pretrain --depth 2 ...
"""

from __future__ import annotations

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # every later AcceleratorState() copies PartialState's attributes over its own: set both
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: fsdp_on_cpu.py MODULE [ARGS...]")
    AcceleratorState.__init__ = _init_with_fsdp_on_cpu
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
