"""Every accelerate config in launch/ is one accelerate (the pinned version) reads as intended.

Nothing here launches anything (these are GPU recipes; see launch/README.md): each YAML is loaded by
accelerate's own config loader, which refuses unknown top-level keys, and turned into launcher
arguments by ``accelerate launch``'s own validation. The DeepSpeed/FSDP blocks may only use keys
``accelerate launch`` has options for (an unknown one would be silently ignored), process counts
must split evenly over machines, and the FSDP plugin is built from the environment the launcher
would export.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
CONFIGS = sorted(LAUNCH.glob("*.yaml"))
REQUIRED = ("compute_environment", "distributed_type", "num_processes", "num_machines", "machine_rank",
            "mixed_precision", "use_cpu", "main_training_function", "rdzv_backend")
KIND = {"MULTI_GPU": "multi_gpu", "DEEPSPEED": "use_deepspeed", "FSDP": "use_fsdp"}  # launcher flag of each type


def raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def validated(path: Path, *cli: str):
    """The arguments ``accelerate launch --config_file path *cli script.py`` would run with."""
    args = launch_command_parser().parse_args(["--config_file", str(path), *cli, "script.py"])
    return _validate_launch_command(args)[0]


def test_the_recipes_cover_every_scale_out_route():
    assert {p.name for p in CONFIGS} >= {"multi_gpu.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml",
                                         "fsdp.yaml", "multi_node.yaml"}
    stages = {raw(p)["deepspeed_config"]["zero_stage"] for p in CONFIGS if raw(p)["distributed_type"] == "DEEPSPEED"}
    assert stages == {2, 3}
    assert any(raw(p)["num_machines"] > 1 for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_read_by_accelerate_with_consistent_values(path):
    config = raw(path)
    assert all(key in config for key in REQUIRED), [k for k in REQUIRED if k not in config]
    loaded = load_config_from_file(str(path))  # accelerate's loader: unknown keys are an error
    assert loaded.compute_environment.value == "LOCAL_MACHINE" and not loaded.use_cpu
    assert loaded.distributed_type.value in KIND
    assert loaded.num_processes > 1 and loaded.num_processes % loaded.num_machines == 0  # total over machines
    assert 0 <= loaded.machine_rank < loaded.num_machines
    assert loaded.mixed_precision == "bf16"
    if loaded.num_machines > 1:
        assert loaded.main_process_ip and loaded.main_process_port
    args = validated(path)
    assert getattr(args, KIND[loaded.distributed_type.value]) is True
    assert (args.num_processes, args.num_machines) == (loaded.num_processes, loaded.num_machines)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_engine_blocks_use_only_keys_accelerate_launch_knows(path):
    config, options = raw(path), {a.dest for a in launch_command_parser()._actions}
    kind = config["distributed_type"]
    assert bool(config.get("deepspeed_config")) == (kind == "DEEPSPEED")
    assert bool(config.get("fsdp_config")) == (kind == "FSDP")
    block = config.get("deepspeed_config") or config.get("fsdp_config") or {}
    assert set(block) <= options, set(block) - options


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_header_shows_the_command_that_uses_it(path):
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert f"accelerate launch --config_file launch/{path.name}" in header
    assert "experiments/run.py" in header


def test_fsdp_plugin_builds_from_the_launchers_environment(monkeypatch):
    args = validated(LAUNCH / "fsdp.yaml")
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    from transformers.models.llama import modeling_llama  # the class to wrap must exist by that name

    assert all(hasattr(modeling_llama, name) for name in plugin.transformer_cls_names_to_wrap)


def test_multi_node_rank_and_address_come_from_each_machines_command_line():
    args = validated(LAUNCH / "multi_node.yaml", "--machine_rank", "1", "--main_process_ip", "10.1.2.3")
    assert (args.machine_rank, args.main_process_ip) == (1, "10.1.2.3")
    assert raw(LAUNCH / "multi_node.yaml")["main_process_ip"] == "main-machine-address-from-command-line"


# ------------------------------------------------------------------ Hydra launchers (multiruns)

CONF = LAUNCH.parent / "conf"


def compose_hydra(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_local_parallel_multiruns_use_the_joblib_launcher():
    launcher = compose_hydra("hydra/launcher=joblib", "hydra.launcher.n_jobs=2").hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2


def test_slurm_launcher_extends_the_submitit_plugin():
    """The plugin is an optional extra (`pip install -e ".[slurm]"`): with it, the config composes
    into the plugin's schema (which rejects misspelled fields); without it, composing names the
    missing plugin config instead of running the sweep locally."""
    from importlib.util import find_spec

    from hydra.errors import MissingConfigException

    own = yaml.safe_load((CONF / "hydra" / "launcher" / "slurm.yaml").read_text())
    assert own["defaults"] == ["submitit_slurm", "_self_"]
    assert own["gpus_per_node"] >= 1 and own["timeout_min"] > 0 and "partition" in own
    if find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        with pytest.raises(MissingConfigException, match="hydra/launcher/submitit_slurm"):
            compose_hydra("hydra/launcher=slurm")
        return
    launcher = compose_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu").hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == own["gpus_per_node"]
