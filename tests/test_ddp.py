"""sft.py and grpo.py under `torchrun --nproc_per_node=2` on CPU (gloo): both finish, the two
ranks end with the same weights (each script asserts it), and rank 0 alone logs and saves."""
import json
import subprocess
import sys

import pytest
import torch

import model as M
import run


def torchrun(script, *flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_sft_then_grpo_on_two_processes(tmp_path):
    sft_out, grpo_out = tmp_path / "sft", tmp_path / "grpo"
    r = torchrun("sft.py", "--max-steps", "3", "--batch-size", "2", "--train-size", "32", "--eval-every", "0",
                 "--eval-n", "2", "--save-every", "2", "--tower-steps", "2", "--reading-steps", "2", "--out", str(sft_out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks agree on the weights" in r.stdout and "rank 1 of 2" in r.stdout
    lines = [json.loads(x) for x in (sft_out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]                       # one writer: no duplicated lines
    state = run.load_state(sft_out / "checkpoints" / "step_000002")
    assert len(state["rng"]["ranks"]) == 2                               # each rank's RNG, for --resume
    M.load(str(sft_out))

    r = torchrun("grpo.py", "--init", str(sft_out), "--out", str(grpo_out), "--max-steps", "2", "--prompts", "2",
                 "--group-size", "2", "--max-new-tokens", "8", "--mu", "2", "--micro-batch", "2",
                 "--eval-every", "0", "--eval-n", "2", "--show-every", "0", "--save-every", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks agree on the weights" in r.stdout
    assert len((grpo_out / "metrics.jsonl").read_text().splitlines()) == 2
    M.load(str(grpo_out))
