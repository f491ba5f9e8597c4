"""Bad input is one line that names the culprit and a non-zero exit, never a library traceback."""
import json
import subprocess
import sys
from dataclasses import replace

import pytest

import pretrain
import model as M
import run
import sft


def _cli(*args):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return r.stderr.strip().splitlines()[-1]


def test_checkpoints_that_are_not_models(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    run.save(*pretrain.build(), str(tmp_path / "noweights"))
    (tmp_path / "noweights" / "model.safetensors").unlink()
    for name, word in (("missing", "does not exist"), ("empty", "no config.json"),
                       ("gpt2", "'gpt2'"),
                       ("broken", "cannot read its config"), ("noweights", "cannot load")):
        path = str(tmp_path / name)
        with pytest.raises(SystemExit) as e:
            M.load(path)
        assert path in str(e.value) and word in str(e.value), str(e.value)


def test_each_script_names_the_bad_checkpoint(tmp_path):
    missing = str(tmp_path / "nope")
    assert missing in _cli("evaluate.py", "--checkpoint", missing)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    line = _cli("grpo.py", "--init", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o"))
    assert "gpt2" in line and str(tmp_path / "gpt2") in line


@pytest.mark.parametrize("flags,word", [({"lr": -1.0}, "--lr"), ({"batch_size": 0}, "--batch-size"),
                                        ({"train_size": 10**6}, "--train-size"),
                                        ({"grad_clip": 0.0}, "--grad-clip"),
                                        ({"eval_n": 0}, "--eval-n"), ({"keep": 0}, "--keep"),
                                        ({"trace": "cot"}, "--trace")])
def test_sft_flags_out_of_range(flags, word):
    with pytest.raises(SystemExit, match=word):
        sft.check(replace(sft.SFTConfig(), **flags))


def test_cli_flag_errors_and_unwritable_out(tmp_path):
    assert "--lr" in _cli("sft.py", "--lr", "-1")
    assert "--resume" in _cli("sft.py", "--resume", "maybe")           # not a boolean
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = str(blocker / "run")                                           # a directory under a file
    line = _cli("sft.py", "--out", out, "--max-steps", "1")
    assert out in line and "not writable" in line
