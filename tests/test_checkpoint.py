"""Checkpoints (p2pfed/checkpoint.py): atomic files that a kill -9 in the middle of a save never leaves unloadable, and
a peer resumed from one continues exactly where it stopped: bit for bit the parameters of a run that never stopped.

.venv/bin/python -m pytest -q tests/test_checkpoint.py
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from p2pfed.checkpoint import PARTIAL, list_checkpoints, load_latest, save_checkpoint
from p2pfed.cli import main
from tests.conftest import CPU_PROFILE, TINY, Launcher

# A writer that saves checkpoints back to back, each a 64 MB tensor filled with its own step, from the step after the
# newest complete one: the parent kills it at random moments.
WRITER = """
import sys, torch
from pathlib import Path
from p2pfed.checkpoint import load_latest, save_checkpoint
directory = Path(sys.argv[1])
found = load_latest(directory)
step = found[1]["step"] + 1 if found else 0
while True:
    save_checkpoint(directory, {"values": torch.full((16_000_000,), float(step))}, {"step": step}, keep=2)
    print(step, flush=True)
    step += 1
"""


def test_save_keeps_the_newest_and_load_skips_what_does_not_read(tmp_path: Path) -> None:
    # Execute
    for step in (3, 7, 12):
        save_checkpoint(tmp_path, {"w": torch.full((4,), float(step))}, {"step": step, "note": "x"}, keep=2)
    (tmp_path / PARTIAL / "ckpt-00000013.safetensors").write_bytes(b"half a file")  # a save that was killed
    newest = tmp_path / "ckpt-00000012.safetensors"

    # Assert
    assert [step for step, _ in list_checkpoints(tmp_path)] == [12, 7]
    tensors, meta, path = load_latest(tmp_path)  # type: ignore[misc]
    assert path == newest and meta == {"step": 12, "note": "x"} and torch.equal(tensors["w"], torch.full((4,), 12.0))
    newest.write_bytes(newest.read_bytes()[:100])  # a disk that lost the end of the newest file
    _, meta, _ = load_latest(tmp_path)  # type: ignore[misc]
    assert meta["step"] == 7
    save_checkpoint(tmp_path, {"w": torch.zeros(4)}, {"step": 13}, keep=2)
    assert not list((tmp_path / PARTIAL).iterdir())  # the next save clears what a killed one left


def test_kill_9_in_the_middle_of_saves_never_leaves_the_newest_checkpoint_unloadable(tmp_path: Path) -> None:
    rng = random.Random(0)
    caught_mid_save = 0
    for _ in range(10):
        # Prepare: a writer that resumes from the newest complete checkpoint
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert writer.stdout is not None
        assert writer.stdout.readline(), writer.stderr.read() if writer.stderr else ""  # one save of this life done

        # Execute: kill -9 at a random moment
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=10)
        caught_mid_save += bool(list((tmp_path / PARTIAL).iterdir()))

        # Assert: the newest checkpoint reads back whole, and it is the one its name says
        found = load_latest(tmp_path)
        assert found is not None
        tensors, meta, path = found
        assert path.name == f"ckpt-{meta['step']:08d}.safetensors"
        assert torch.equal(tensors["values"], torch.full((16_000_000,), float(meta["step"])))
    assert caught_mid_save >= 3, "the kills should land inside saves (a partial file left behind)"
    assert {p.name for p in tmp_path.iterdir()} <= {PARTIAL} | {p.name for _, p in list_checkpoints(tmp_path)}


@pytest.mark.slow
def test_a_resumed_peer_ends_bit_for_bit_where_an_uninterrupted_one_does(launcher: Launcher, tmp_path: Path) -> None:
    # Prepare: one peer alone (local steps), once straight to step 16, once to 8 with a checkpoint, then resumed
    def peer(name: str, *extra: str) -> int:
        proc = launcher.start(
            "peer", "--config", TINY, "--profile", CPU_PROFILE, "--events", "jsonl", *extra, name=name
        )  # fmt: skip
        return proc.wait(timeout=120)

    ckpt = tmp_path / "ckpt"

    # Execute
    assert peer("straight", "--max-steps", "16", "--save-params", str(tmp_path / "straight.safetensors")) == 0
    assert peer("first", "--max-steps", "8", "--set", f"checkpoint.dir={ckpt}") == 0
    assert [step for step, _ in list_checkpoints(ckpt)] == [8]  # the checkpoint written on the way out
    resumed = [
        "--max-steps", "16", "--resume", str(ckpt), "--save-params", str(tmp_path / "resumed.safetensors"),
        "--report", str(tmp_path / "resumed.json"),
    ]  # fmt: skip
    assert peer("resumed", *resumed) == 0

    # Assert: same parameters to the bit (model, AdamW moments and data position all came back), 8 steps trained
    straight, again = load_file(tmp_path / "straight.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    report = json.loads((tmp_path / "resumed.json").read_text())
    assert (report["start_step"], report["final_step"], report["steps"]) == (8, 16, 8)
    assert [step for step, _ in list_checkpoints(ckpt)] == [16, 8]


@pytest.mark.parametrize("where", ["nowhere", "empty"])
def test_resume_from_a_missing_or_empty_directory_is_one_clear_error(tmp_path: Path, where: str) -> None:
    # Prepare
    (tmp_path / "empty").mkdir()

    # Execute: checked before the peer starts anything
    result = CliRunner().invoke(
        main, ["peer", "--config", TINY, "--max-steps", "2", "--resume", str(tmp_path / where)]
    )  # fmt: skip

    # Assert
    assert result.exit_code == 2
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert ("does not exist" if where == "nowhere" else "holds no checkpoint") in result.stderr


@pytest.mark.slow
def test_resume_into_another_model_is_one_clear_error(launcher: Launcher, tmp_path: Path) -> None:
    # Prepare: a checkpoint that is not of the tiny model
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, {"model/x": torch.zeros(1)}, {"step": 3, "numel": 1, "run_id": "tiny"}, keep=1)

    # Execute
    proc = launcher.start(
        "peer", "--config", TINY, "--profile", CPU_PROFILE, "--max-steps", "2", "--resume", str(ckpt), name="other"
    )  # fmt: skip
    code = proc.wait(timeout=120)

    # Assert: exit 2, one error line that says what to do, no traceback
    errors = [line for line in proc.stderr().splitlines() if line.startswith("error:")]
    assert code == 2, proc.stderr()[-2000:]
    assert len(errors) == 1 and "Traceback" not in proc.stderr(), proc.stderr()[-2000:]
    assert "resume with the config it was made with" in errors[0]
