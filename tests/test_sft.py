"""sft.py: the loss mask covers exactly the response tokens, and the script runs end to end."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import pretrain
import model as M
import run
import sft


def test_loss_mask_is_exactly_the_response_and_its_end_token():
    model, processor = pretrain.build()
    rows = {k: [] for k in ("image", "question", "response")}
    for i in range(3):
        s = data.make_sample("train", i)
        for k in rows:
            rows[k].append(s[k])
    end = M.end_ids(model)[0]
    prompt, ids, mask = sft.sft_batch(processor, rows, end, "cpu")
    tok = processor.tokenizer
    for i, response in enumerate(rows["response"]):
        target = ids[i][mask[i].bool()].tolist()
        # all of it, in order
        assert target == tok(response, add_special_tokens=False)["input_ids"] + [end]
        assert tok.decode(target[:-1]) == response  # and nothing else
    # nothing of the prompt (system text, question, image tokens) is ever a target
    assert not torch.isin(ids[mask.bool()], torch.tensor([processor.image_token_id])).any()
    assert mask.sum() < ids.numel() or len(set(len(r) for r in rows["response"])) == 1


def test_param_groups_cover_every_parameter_once_and_decay_only_matrices():
    model, _ = pretrain.build()
    groups = sft.param_groups(model, sft.SFTConfig(weight_decay=0.01))
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())          # all, and none twice
    for g in groups:
        assert all((p.dim() >= 2) == (g["weight_decay"] > 0) for p in g["params"])


def test_sft_then_evaluate_smoke(tmp_path):
    out = tmp_path / "sft"
    r = subprocess.run([sys.executable, "sft.py", "--max-steps", "4", "--batch-size", "4",
                        "--eval-every", "2",
                        "--eval-n", "2", "--train-size", "64", "--out", str(out)],
                        capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and lines[-1]["loss"] < lines[0]["loss"]
    assert all(0 <= lines[-1][f"val_{k}"] <= 1 for k in ("format", "answer", "iou", "grounding"))
    assert json.loads((out / "run_config.json").read_text())["max_steps"] == 4
    # by default only the language model learned: the tower is the base's, bit for bit
    base, tuned = (load_file(f"{d}/model.safetensors") for d in (sft.SFTConfig.model, out))
    tower = [k for k in base if ".visual." in k or k.startswith("visual.")]
    assert tower and all(torch.equal(base[k], tuned[k]) for k in tower)
    assert any(not torch.equal(base[k], tuned[k]) for k in base if k not in tower)
    # ... and evaluate.py reads what sft.py wrote
    res = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(out), "--split",
                        "validation",
                        "--n", "6", "--batch-size", "3", "--max-new-tokens", "12", "--json",
                        str(res),
                        "--gallery", str(tmp_path / "g.png")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(res.read_text())
    assert summary["checkpoint"] == str(out) and summary["n"] == 6
    assert all(0 <= summary[k] <= 1
               for k in ("format_rate", "accuracy", "mean_iou", "iou50_rate", "grounding_rate"))
    assert (tmp_path / "g.png").exists()


def test_learning_rate_schedule_by_hand():
    """Linear warm-up to the peak, then half a cosine down to 10% of it."""
    cfg = sft.SFTConfig(lr=1e-3, warmup_steps=10, max_steps=110)
    assert sft.lr_at(0, cfg) == pytest.approx(1e-4) and sft.lr_at(9, cfg) == pytest.approx(1e-3)
    assert sft.lr_at(60, cfg) == pytest.approx(1e-3 * 0.55)          # half-way: 0.1 + 0.9 * 0.5
    # the floor, and it stays there
    assert sft.lr_at(110, cfg) == pytest.approx(1e-4) == sft.lr_at(500, cfg)
    assert run.cosine(0) == 1.0 and run.cosine(1) == pytest.approx(0.1)


def test_gradient_accumulation_equals_one_large_batch():
    # two batches of 2 accumulated give the gradient of one batch of 4: each batch's share of the
    # token mean is divided by the tokens of ALL the batches (not averaged per batch)
    model, processor = pretrain.build()
    rows = [data.make_sample("train", i) for i in range(4)]
    cols = {k: [r[k] for r in rows] for k in ("image", "question", "response")}
    end = M.end_ids(model)[0]
    grads = []
    for parts in ([slice(0, 4)], [slice(0, 2), slice(2, 4)]):
        model.zero_grad()
        batches = [sft.sft_batch(processor, {k: v[s] for k, v in cols.items()}, end,
                                 torch.device("cpu")) for s in parts]
        sft.token_mean_backward(model, batches)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()
                                if p.grad is not None]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_lora_sft_in_bf16_then_grpo_from_it(tmp_path):
    # the small-card recipe end to end on the tiny model: LoRA SFT over a bf16 base with gradient
    # accumulation writes a merged checkpoint; LoRA GRPO starts from it with the reference policy
    # taken from the same weights (adapters off), and its checkpoint loads in plain transformers
    from transformers import AutoModelForImageTextToText
    init = tmp_path / "init"
    run.save(*pretrain.build(), str(init))
    lora = ["--lora-r", "4", "--dtype", "bfloat16", "--eval-n", "2", "--out"]
    r = subprocess.run([sys.executable, "sft.py", "--model", str(init), "--max-steps", "3",
                        "--batch-size", "2",
                        "--grad-accum", "2", "--train-size", "16", "--eval-every", "0", "--lr",
                        "1e-2", *lora, str(tmp_path / "sft")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LoRA r=4" in r.stdout
    r = subprocess.run([sys.executable, "grpo.py", "--init", str(tmp_path / "sft"), "--max-steps",
                        "2", "--prompts", "2",
                        "--group-size", "2", "--max-new-tokens", "8", "--train-size", "8",
                        "--eval-every", "0",
                        "--beta", "0.1", *lora, str(tmp_path / "grpo")], capture_output=True,
                        text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    kl = [json.loads(x)["kl_ref"]
          for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    # step 1: adapters at 0, policy = reference
    assert len(kl) == 2 and kl[0] == pytest.approx(0.0, abs=1e-3)
    m = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "grpo"))
    assert m.dtype == torch.bfloat16 and not any("lora" in n for n in m.state_dict())
