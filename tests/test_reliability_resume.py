"""A recipe killed with SIGKILL in the middle of an epoch, while writing a checkpoint, and restarted with
`--resume_from_checkpoint` ends with the same adapter and metrics as an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import require

require("sklearn")
require("seqeval")

from test_recipes import (  # noqa: E402  (the recipe tests' fixture data and runner)
    ENV,
    PYTHON,
    RECIPES,
    REPO,
    _tiny_bert,
    adapter,
    assert_same_weights,
    run_recipe,
    small,
    write_conll,
)

# Runs ner.py as `accelerate launch` would, but SIGKILLs itself at the n-th checkpoint, after Accelerate has written
# the checkpoint's files into their temporary folder and before the folder is renamed into place.
KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import common.checkpoint as checkpoint
    import ner
    from common.errors import run_main

    kill_at, calls, commit = int(sys.argv[2]), [], checkpoint.commit_dir

    def commit_or_die(tmp, final):
        calls.append(final)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        commit(tmp, final)

    checkpoint.commit_dir = commit_or_die
    run_main(lambda: ner.main(sys.argv[3:]))
    """
)


@pytest.fixture
def one_thread():
    # The killed run is a separate process with OMP_NUM_THREADS=1; the same here keeps float sums in the same order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sigkill_mid_epoch_during_a_checkpoint_then_resume_equals_uninterrupted(tmp_path: Path, one_thread) -> None:
    model = _tiny_bert(tmp_path / "tiny-bert", dropout=0.1)  # dropout on: the RNG state must be restored too
    data = write_conll(tmp_path / "conll", n_train=40)  # 10 steps per epoch at batch 4
    schedule = ("--num_train_epochs", "2", "--checkpointing_steps", "3", "--seed", "7")
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_recipe("ner.py", *small(model, data, full, *schedule))

    # Checkpoints at steps 3, 6, 9 (epoch 0), 12, 15, 18 (epoch 1): die while writing step_15, mid-epoch 1.
    proc = subprocess.run([PYTHON, "-c", KILLED_RUN, str(RECIPES), "5", *small(model, data, killed, *schedule)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (killed / "step_12" / "progress.json").is_file()
    assert not (killed / "step_15").exists() and (killed / ".step_15.tmp").is_dir()  # the interrupted write
    assert not (killed / "adapter_model.safetensors").exists() and not (killed / "metrics.json").exists()

    proc = run_recipe("ner.py", *small(model, data, killed, *schedule, "--resume_from_checkpoint"))
    assert f"Resuming from {killed / 'step_12'}" in proc.stdout + proc.stderr
    assert_same_weights(adapter(full), adapter(killed), atol=1e-6)
    expected, resumed = (json.loads((out / "metrics.json").read_text()) for out in (full, killed))
    for key in ("test_f1", "test_precision", "test_recall", "test_token_accuracy", "eval_f1", "train_steps", "epochs"):
        assert resumed[key] == pytest.approx(expected[key], abs=1e-6), key
    assert resumed["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-6)
    assert len(resumed["history"]) == len(expected["history"]) == 2  # epoch 0's evaluation kept from before the kill
    for got, want in zip(resumed["history"], expected["history"]):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), key
    assert not list(killed.glob(".*tmp*")), "temporary folders left behind"
