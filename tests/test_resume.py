"""Nothing lost: SIGKILL then --resume ends where an uninterrupted run ends; a save killed before
its rename leaves the previous checkpoint loadable; a full disk is one clear line."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import pretrain
import model as M
import run

SFT = ["sft.py", "--max-steps", "10", "--batch-size", "4", "--train-size", "24", "--eval-every",
       "0", "--eval-n", "2", "--save-every", "2", "--keep", "2"]
TIMING = {"elapsed_s", "time_generate", "time_score", "time_ref", "time_train"}


def _run(args, out, **kw):
    return subprocess.run([sys.executable, *args, "--out", str(out)], capture_output=True,
                          text=True, **kw)


def _kill_after_first_checkpoint(args, out):
    """Start a run, SIGKILL it as soon as its first periodic checkpoint is complete."""
    p = subprocess.Popen([sys.executable, *args, "--out", str(out)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not run.list_checkpoints(str(out)) and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def _same_run(a, b):
    wa, wb = M.load(str(a))[0].state_dict(), M.load(str(b))[0].state_dict()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    la = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    # none repeated or skipped
    assert [x["step"] for x in la] == [x["step"] for x in lb] == list(range(1, len(la) + 1))
    for x, y in zip(la, lb):
        for k in x.keys() - TIMING:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)


def test_sft_killed_and_resumed_equals_uninterrupted(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _run(SFT, whole).returncode == 0
    _kill_after_first_checkpoint(SFT, killed)
    r = _run(SFT + ["--resume", "true"], killed)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout
    _same_run(whole, killed)


@pytest.mark.parametrize("lora", [[], ["--lora-r", "4", "--beta", "0.1"]], ids=["full", "lora"])
def test_grpo_killed_and_resumed_equals_uninterrupted(tmp_path, lora):
    init = tmp_path / "init"
    run.save(*pretrain.build(), str(init))
    # weight decay moves the weights every step even when a random-init model's groups have equal
    # rewards, so the sampled rollouts (and their lengths, entropies) depend on every restored
    # piece; under LoRA the resumed run rebuilds the frozen init and loads the adapters from the
    # checkpoint
    args = ["grpo.py", "--init", str(init), "--max-steps", "6", "--prompts", "2", "--group-size",
            "2",
            "--max-new-tokens", "8", "--eval-every", "0", "--eval-n", "2", "--train-size", "16",
            "--save-every", "2", "--weight-decay", "0.5", "--lr", "1e-2", "--warmup-steps", "1",
            *lora]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = _run(args, whole)
    assert r.returncode == 0, r.stderr[-2000:]
    _kill_after_first_checkpoint(args, killed)
    r = _run(args + ["--resume", "true"], killed)
    assert r.returncode == 0, r.stderr[-2000:]
    _same_run(whole, killed)


def test_resume_with_nothing_to_resume_starts_at_step_0(tmp_path):
    # a cluster job preempted before its first checkpoint is re-run with the same --resume command
    r = _run(SFT[:2] + ["2"] + SFT[3:] + ["--resume"], tmp_path / "fresh")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no checkpoint" in r.stdout and "starting from step 0" in r.stdout
    assert (tmp_path / "fresh" / "metrics.jsonl").read_text().count("\n") == 2


def test_a_save_killed_before_its_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, processor = pretrain.build()
    run.save_checkpoint(str(tmp_path), 2, model, processor, {"optimizer": {}, "order": [1, 2]})

    def killed(tmp):
        raise KeyboardInterrupt  # stands for SIGKILL: nothing after this line runs
    monkeypatch.setattr(run, "_before_rename", killed)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint(str(tmp_path), 4, model, processor, {"optimizer": {}, "order": [2]})
    found = run.list_checkpoints(str(tmp_path))
    assert [os.path.basename(f)
            for f in found] == ["step_000002"]  # the half-written one is ignored
    assert run.load_state(found[0])["step"] == 2
    loaded, _ = M.load(found[0])
    assert not torch.equal(loaded.lm_head.weight, model.lm_head.weight)  # the old weights, intact


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    model, processor = pretrain.build()
    run.save_checkpoint(str(tmp_path), 2, model, processor, {"optimizer": {}})

    def full(tmp):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(run, "_before_rename", full)
    with pytest.raises(SystemExit, match="No space left on device"):
        run.save_checkpoint(str(tmp_path), 4, model, processor, {"optimizer": {}})
    assert [os.path.basename(f) for f in run.list_checkpoints(str(tmp_path))] == ["step_000002"]
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if "tmp" in n]   # no debris


def test_ctrl_c_saves_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, *SFT[:2], "400", *SFT[3:], "--save-every", "0", "--out",
                          str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        m = out / "metrics.jsonl"
        if m.exists() and m.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    assert "--resume" in stdout and "Traceback" not in stderr
    step = run.load_state(run.list_checkpoints(str(out))[-1])["step"]
    assert 2 <= step < 400
