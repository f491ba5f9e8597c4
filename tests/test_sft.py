"""sft.py: the loss mask covers exactly the response tokens, and the script runs end to end."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import model as M
import run
import sft


def test_loss_mask_is_exactly_the_response_and_its_end_token():
    model, processor = M.load("tiny")
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
        assert target == tok(response, add_special_tokens=False)["input_ids"] + [end]   # all of it, in order
        assert tok.decode(target[:-1]) == response                                     # and nothing else
    # nothing of the prompt (system text, question, image tokens) is ever a target
    assert not torch.isin(ids[mask.bool()], torch.tensor([processor.image_token_id])).any()
    assert mask.sum() < ids.numel() or len(set(len(r) for r in rows["response"])) == 1


def test_param_groups_cover_every_parameter_once_with_a_slower_vision_tower():
    model, _ = M.load("tiny")
    groups = sft.param_groups(model, sft.SFTConfig(vision_lr_scale=0.1, weight_decay=0.01))
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())          # all, and none twice
    vision = {id(p) for p in model.model.visual.parameters()}
    for g in groups:
        is_vision = {id(p) in vision for p in g["params"]}
        assert len(is_vision) == 1                                              # never mixed
        assert g["lr_scale"] == (0.1 if is_vision.pop() else 1.0)
        assert all((p.dim() >= 2) == (g["weight_decay"] > 0) for p in g["params"])


def test_sft_then_evaluate_smoke(tmp_path):
    out = tmp_path / "sft"
    r = subprocess.run([sys.executable, "sft.py", "--max-steps", "4", "--batch-size", "4", "--eval-every", "2",
                        "--eval-n", "2", "--train-size", "64", "--tower-steps", "2", "--reading-steps", "2",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reading warm-up: 2 steps" in r.stdout
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and lines[-1]["loss"] < lines[0]["loss"]
    assert all(0 <= lines[-1][f"val_{k}"] <= 1 for k in ("format", "answer", "iou", "grounding"))
    assert json.loads((out / "run_config.json").read_text())["max_steps"] == 4
    # ... and evaluate.py reads what sft.py wrote
    res = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(out), "--split", "validation",
                        "--n", "6", "--batch-size", "3", "--max-new-tokens", "12", "--json", str(res),
                        "--gallery", str(tmp_path / "g.png")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(res.read_text())
    assert summary["checkpoint"] == str(out) and summary["n"] == 6
    assert all(0 <= summary[k] <= 1 for k in ("format_rate", "accuracy", "mean_iou", "iou50_rate", "grounding_rate"))
    assert (tmp_path / "g.png").exists()


def test_reading_batch_targets_exactly_the_answer():
    """The reading warm-up is text only, and its loss falls on the answer alone: the reasoning
    is context (never a target), so it cannot teach what a film shows."""
    model, processor = M.load("tiny")
    rows = [(s["question"], s["response"]) for s in (data.make_sample("reading", i) for i in range(4))]
    end, tok = M.end_ids(model)[0], processor.tokenizer
    ids, attention, answer = sft.reading_batch(processor, rows, end, "cpu")
    T = answer.shape[1]
    assert ids.shape == attention.shape and not (ids == processor.image_token_id).any()      # no image
    for i, (_, response) in enumerate(rows):
        target = ids[i, -T:][answer[i].bool()].tolist()
        said = response[response.rindex("<answer>") + len("<answer>"):]                     # e.g. "B</answer>"
        assert target == tok(said, add_special_tokens=False)["input_ids"] + [end]
        assert tok.decode(ids[i, -T:][attention[i, -T:].bool()].tolist()[:-1]) == response  # the whole response is there


def test_tower_targets_by_hand():
    """A 2x2 token grid on a 20-px frame (cells of 10 px): a region box covering the left column,
    abnormal with a nodule, and one covering only a sliver (< 1/4) of the top-right cell."""
    boxes = {r: [0, 0, 1, 1] for r in data.REGIONS}                    # 1 px: covers no cell enough
    boxes["right mid lung zone"] = [0, 0, 10, 20]                        # tokens 0 and 2 (left column)
    boxes["upper mediastinum"] = [18, 0, 20, 10]                         # 2 px of token 1: not enough
    y = sft.tower_targets(boxes, {"right mid lung zone": "nodule"}, grid=2, frame=20)
    k, R = data.REGIONS.index("right mid lung zone"), len(data.REGIONS)
    nodule = 2 * R + list(data.FINDINGS).index("nodule")
    assert y.shape == (4, 2 * R + len(data.FINDINGS))
    assert y[:, k].tolist() == [1, 0, 1, 0] and y[:, R + k].tolist() == [1, 0, 1, 0]
    assert y[:, nodule].tolist() == [1, 0, 1, 0]
    assert y.sum() == 6                                                  # nothing else is set


def test_learning_rate_schedule_by_hand():
    """Linear warm-up to the peak, then half a cosine down to 10% of it (the warm-up reuses `cosine`)."""
    cfg = sft.SFTConfig(lr=1e-3, warmup_steps=10, max_steps=110)
    assert sft.lr_at(0, cfg) == pytest.approx(1e-4) and sft.lr_at(9, cfg) == pytest.approx(1e-3)
    assert sft.lr_at(60, cfg) == pytest.approx(1e-3 * 0.55)          # half-way: 0.1 + 0.9 * 0.5
    assert sft.lr_at(110, cfg) == pytest.approx(1e-4) == sft.lr_at(500, cfg)   # the floor, and it stays there
    assert sft.cosine(0) == 1.0 and sft.cosine(1) == pytest.approx(0.1)


def test_patch_order_matches_the_processor():
    """The warm-up's per-patch targets are put in the tower's patch order: check that order
    against the processor itself, on an image whose 14-px patches are numbered by brightness."""
    _, processor = M.load("tiny")
    ip = processor.image_processor
    grid, m, size = 4, ip.merge_size, ip.patch_size
    pgrid = grid * m
    img = np.zeros((pgrid * size, pgrid * size), dtype=np.uint8)
    for r in range(pgrid):
        for c in range(pgrid):
            img[r * size:(r + 1) * size, c * size:(c + 1) * size] = 3 * (r * pgrid + c)
    pix = ip(images=[Image.fromarray(img)], return_tensors="pt")["pixel_values"]    # [patches, C*T*14*14]
    assert pix.shape[0] == pgrid * pgrid
    seen = pix.mean(-1).argsort().argsort()        # each row's rank by brightness = its raster index
    assert torch.equal(seen, sft.patch_order(grid, m))


def test_gradient_accumulation_equals_one_large_batch():
    # two batches of 2 accumulated give the gradient of one batch of 4: each batch's share of the
    # token mean is divided by the tokens of ALL the batches (not averaged per batch)
    model, processor = M.load("tiny")
    rows = [data.make_sample("train", i) for i in range(4)]
    cols = {k: [r[k] for r in rows] for k in ("image", "question", "response")}
    end = M.end_ids(model)[0]
    grads = []
    for parts in ([slice(0, 4)], [slice(0, 2), slice(2, 4)]):
        model.zero_grad()
        batches = [sft.sft_batch(processor, {k: v[s] for k, v in cols.items()}, end, torch.device("cpu")) for s in parts]
        sft.token_mean_backward(model, batches)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_lora_sft_in_bf16_then_grpo_from_it(tmp_path):
    # the small-card recipe end to end on the tiny model: LoRA SFT over a bf16 base with gradient
    # accumulation writes a merged checkpoint; LoRA GRPO starts from it with the reference policy
    # taken from the same weights (adapters off), and its checkpoint loads in plain transformers
    from transformers import AutoModelForImageTextToText
    init = tmp_path / "init"
    run.save(*M.load("tiny"), str(init))
    lora = ["--lora-r", "4", "--dtype", "bfloat16", "--eval-n", "2", "--out"]
    r = subprocess.run([sys.executable, "sft.py", "--model", str(init), "--max-steps", "3", "--batch-size", "2",
                        "--grad-accum", "2", "--train-size", "16", "--eval-every", "0", "--lr", "1e-2", *lora, str(tmp_path / "sft")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LoRA r=4" in r.stdout
    r = subprocess.run([sys.executable, "grpo.py", "--init", str(tmp_path / "sft"), "--max-steps", "2", "--prompts", "2",
                        "--group-size", "2", "--max-new-tokens", "8", "--train-size", "8", "--eval-every", "0",
                        "--beta", "0.1", *lora, str(tmp_path / "grpo")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    kl = [json.loads(x)["kl_ref"] for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(kl) == 2 and kl[0] == pytest.approx(0.0, abs=1e-3)        # step 1: adapters at 0, policy = reference
    m = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "grpo"))
    assert m.dtype == torch.bfloat16 and not any("lora" in n for n in m.state_dict())
