"""Run configs and peer profiles: loading, --set overrides, and one-line errors that name the bad key and value.

.venv/bin/python -m pytest -q tests/test_config.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from p2pfed.cli import main
from p2pfed.config import Config, DataConfig, Profile, apply_overrides, load_config, load_profile
from p2pfed.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
LOCAL_CPU = ROOT / "peers" / "local-cpu.yaml"


def _config_error(overrides: list[str], path: Path | None = TINY) -> str:
    """The message of the ConfigError that load_config raises; fails the test if it is not one line."""
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- loading the shipped files ---------------------------------------------------------------------------------------


def test_tiny_config_loads_with_the_values_in_the_file():
    # Execute
    cfg = load_config(TINY)

    # Assert
    assert isinstance(cfg, Config)
    assert cfg.run.id == "tiny"
    assert cfg.model.arch == "llama"
    assert cfg.model.seq_len == 64
    assert cfg.data.source == "embedded"
    assert cfg.data.max_chars == 4_000_000
    assert cfg.averaging.timeout == 20.0
    assert cfg.averaging.round_timeout == 30.0
    assert cfg.swarm.min_peers == 1


def test_local_cpu_profile_loads_with_the_values_in_the_file():
    # Execute
    profile = load_profile(LOCAL_CPU)

    # Assert
    assert isinstance(profile, Profile)
    assert profile.name == "local-cpu"
    assert profile.device == "cpu"
    assert profile.threads == 1
    assert profile.memory_cap_gb == 4.0
    assert profile.region == "loopback"
    assert profile.client_mode is False


def test_no_path_gives_the_defaults():
    # Execute
    cfg = load_config(None)
    profile = load_profile(None)

    # Assert
    assert cfg == Config()
    assert profile == Profile()


# --- overrides -------------------------------------------------------------------------------------------------------


def test_overrides_change_nested_values_and_parse_yaml_scalars():
    # Prepare
    overrides = [
        "averaging.timeout=45",  # int
        "training.lr=0.01",  # float
        "training.max_grad_norm=null",  # None
        "data.paths=[a.txt, b.jsonl]",  # list
        "run.id=other-run",  # str
    ]

    # Execute
    cfg = load_config(TINY, overrides)

    # Assert
    assert cfg.averaging.timeout == 45.0
    assert cfg.training.lr == 0.01
    assert cfg.training.max_grad_norm is None
    assert cfg.data.paths == ["a.txt", "b.jsonl"]
    assert cfg.run.id == "other-run"
    # untouched siblings keep the file's values
    assert cfg.averaging.round_timeout == 30.0
    assert cfg.training.batch_size == 8


def test_profile_overrides_parse_bools_and_ints():
    # Execute
    profile = load_profile(LOCAL_CPU, ["client_mode=true", "threads=4", "slowdown=2.5"])

    # Assert
    assert profile.client_mode is True
    assert profile.threads == 4
    assert profile.slowdown == 2.5


def test_apply_overrides_builds_the_nested_dict_and_applies_in_order():
    # Prepare
    data = {"averaging": {"timeout": 20}}

    # Execute
    out = apply_overrides(data, ["averaging.timeout=1", "averaging.timeout=2", "swarm.min_peers=3", "x.y.z=[1, 2.5]"])

    # Assert
    assert out == {"averaging": {"timeout": 2}, "swarm": {"min_peers": 3}, "x": {"y": {"z": [1, 2.5]}}}
    assert isinstance(out["averaging"]["timeout"], int)
    assert isinstance(out["x"]["y"]["z"][1], float)


@pytest.mark.parametrize("item", ["noequals", "a..b=1", "=1", ".a=1", "a.=1"])
def test_malformed_override_raises_config_error(item):
    # Execute
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, [item])

    # Assert
    assert repr(item) in str(info.value)
    assert "\n" not in str(info.value)


def test_override_below_a_scalar_raises_config_error():
    # Execute
    message = _config_error(["run.id.x=1"])

    # Assert
    assert "run.id" in message


# --- unknown keys and bad values -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["bogus", "averaging.bogus", "model.hidden"])
def test_unknown_key_is_named_with_its_dotted_path(key):
    # Execute
    message = _config_error([f"{key}=1"])

    # Assert
    assert repr(key) in message
    assert "unknown key" in message


def test_unknown_key_in_profile_is_named():
    # Execute
    with pytest.raises(ConfigError) as info:
        load_profile(LOCAL_CPU, ["gpus=2"])

    # Assert
    assert "'gpus'" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_a_file_is_named(tmp_path):
    # Prepare
    path = tmp_path / "run.yaml"
    path.write_text("run:\n  id: x\ntraining:\n  batch_size: 4\n  learning_rate: 0.1\n")

    # Execute
    message = _config_error([], path)

    # Assert
    assert "'training.learning_rate'" in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("averaging.timeout=-1", "averaging.timeout", "-1"),
        ("swarm.join_timeout=0", "swarm.join_timeout", "0"),
        ("training.batch_size=abc", "training.batch_size", "'abc'"),
        ("model.arch=bert", "model.arch", "'bert'"),
        ("compression.name=zstd", "compression.name", "'zstd'"),
        ("run.id=has space", "run.id", "'has space'"),
    ],
)
def test_bad_value_names_the_key_and_the_value(override, key, value):
    # Execute
    message = _config_error([override])

    # Assert
    assert key in message
    assert value in message


def test_bad_profile_value_names_the_key_and_the_value():
    # Execute
    with pytest.raises(ConfigError) as info:
        load_profile(LOCAL_CPU, ["device=tpu"])

    # Assert
    message = str(info.value)
    assert "device" in message and "'tpu'" in message
    assert "\n" not in message


# --- cross-field checks ----------------------------------------------------------------------------------------------


def test_partition_index_must_be_below_num_partitions():
    # Execute
    message = _config_error(["data.num_partitions=3", "data.partition_index=3"])

    # Assert
    assert "data.partition_index" in message
    assert "got 3" in message


def test_partition_index_below_num_partitions_is_accepted():
    # Execute
    cfg = load_config(TINY, ["data.num_partitions=3", "data.partition_index=2"])

    # Assert
    assert (cfg.data.partition_index, cfg.data.num_partitions) == (2, 3)


@pytest.mark.parametrize("round_timeout", ["1.0", "0.5"])
def test_round_timeout_must_exceed_matchmaking_time(round_timeout):
    # Execute
    message = _config_error(["averaging.matchmaking_time=1.0", f"averaging.round_timeout={round_timeout}"])

    # Assert
    assert "averaging.round_timeout" in message
    assert f"got {float(round_timeout)}" in message


def test_files_source_needs_paths():
    # Execute
    message = _config_error(["data.source=files"])

    # Assert
    assert "data.paths" in message


def test_cross_field_checks_also_run_on_direct_construction():
    # Execute / Assert
    with pytest.raises(ValueError, match="data.partition_index"):
        DataConfig(num_partitions=2, partition_index=5)
    with pytest.raises(ValueError, match="data.paths"):
        DataConfig(source="files")


# --- unreadable files ------------------------------------------------------------------------------------------------


def test_missing_file_raises_config_error(tmp_path):
    # Prepare
    path = tmp_path / "nope.yaml"

    # Execute
    message = _config_error([], path)

    # Assert
    assert str(path) in message
    assert "does not exist" in message


def test_missing_profile_raises_config_error(tmp_path):
    # Execute
    with pytest.raises(ConfigError) as info:
        load_profile(tmp_path / "nope.yaml")

    # Assert
    assert "nope.yaml" in str(info.value)
    assert "\n" not in str(info.value)


def test_invalid_yaml_raises_config_error(tmp_path):
    # Prepare
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  id: [tiny\ntraining:\n  batch_size: 8\n")

    # Execute
    message = _config_error([], path)

    # Assert
    assert str(path) in message
    assert "not valid YAML" in message


def test_yaml_that_is_not_a_mapping_raises_config_error(tmp_path):
    # Prepare
    path = tmp_path / "list.yaml"
    path.write_text("- run\n- model\n")

    # Execute
    message = _config_error([], path)

    # Assert
    assert "mapping" in message


# --- through the CLI -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--config", str(TINY), "--set", "averaging.bogus=1"], "averaging.bogus"),
        (["--config", "/nonexistent.yaml"], "/nonexistent.yaml"),
        (["--config", str(TINY), "--set", "averaging.timeout=-5"], "averaging.timeout"),
        (["--config", str(TINY), "--profile", "/nonexistent-profile.yaml"], "/nonexistent-profile.yaml"),
    ],
)
def test_cli_prints_one_error_line_and_exits_2(args, named):
    # Prepare
    runner = CliRunner()  # click >= 8.2 keeps stderr apart from stdout

    # Execute
    result = runner.invoke(main, ["peer", *args])

    # Assert
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    assert named in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""


_ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("path", sorted((_ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.run.id


@pytest.mark.parametrize("path", sorted((_ROOT / "peers").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_profile_loads(path: Path) -> None:
    assert load_profile(path).name


def test_config_reference_in_docs_is_current() -> None:
    from p2pfed.config_reference import reference_markdown

    documented = (_ROOT / "docs" / "CONFIG.md").read_text()
    assert documented == reference_markdown(), "docs/CONFIG.md is stale: run `p2pfed config reference > docs/CONFIG.md`"
    for section, field in Config.model_fields.items():
        for key in field.annotation.model_fields:  # type: ignore[union-attr]
            assert f"`{section}.{key}`" in documented


def test_config_show_prints_the_resolved_config() -> None:
    from click.testing import CliRunner

    from p2pfed.cli import main

    result = CliRunner().invoke(main, ["config", "show", "--config", str(_ROOT / "configs" / "tiny.yaml"),
                                       "--set", "averaging.mode=diloco"])  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["averaging"]["mode"] == "diloco"
    assert Config.model_validate(shown) == load_config(_ROOT / "configs" / "tiny.yaml", ["averaging.mode=diloco"])


def test_cli_compression_choices_match_the_config_and_the_registry() -> None:
    from typing import get_args

    from p2pfed.cli import COMPRESSION_NAMES
    from p2pfed.compression import COMPRESSORS
    from p2pfed.config import CompressionConfig

    assert COMPRESSION_NAMES == get_args(CompressionConfig.model_fields["name"].annotation)
    assert set(COMPRESSION_NAMES) == set(COMPRESSORS)


def test_group_size_follows_the_ready_peers_and_gossip_makes_room_for_hungry_ones() -> None:
    sync = load_config(TINY, ["swarm.min_peers=3"])
    assert sync.group_size(2) == 3  # before the swarm has formed, at least swarm.min_peers
    assert sync.group_size(2, formed=True) == 2 and sync.group_size(5, formed=True) == 5
    gossip = load_config(TINY, ["averaging.mode=gossip", "averaging.gossip_group_size=2"])
    assert gossip.group_size(5) == 2
    assert gossip.group_size(5, hungry=1) == 3 and gossip.group_size(5, hungry=2) == 4
    assert gossip.group_size(3, hungry=2) == 3  # never more than the ready peers
    assert gossip.group_size(1, hungry=1) == 2
