"""The real-checkpoint path on CPU, on a hub-format lookalike of Qwen2.5-VL-3B-Instruct
(tests/qwen_lookalike.py: the real files, ids, vocabulary padding and generation config, toy
widths), and the single-GPU fixes it needed: each test here failed on the code before them."""
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import data
import gemex
import credit
import grpo
import pretrain
import memory
import model as M
import run

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qwen_lookalike as Q  # noqa: E402


@pytest.fixture(scope="module")
def lookalike(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen25vl3b")
    Q.build(str(out))
    return str(out)


def _samples(n=2):
    s = [data.make_sample("train", i) for i in range(n)]
    return [x["image"] for x in s], [x["question"] for x in s]


def test_the_hub_layout_loads_as_qwen_ships_it(lookalike):
    model, proc = M.load(lookalike)
    tok = proc.tokenizer
    assert (len(tok), model.get_output_embeddings().weight.shape[0]) == (Q.N_TOKENS, Q.VOCAB)
    assert M.end_ids(model) == [Q.ID["<|im_end|>"], Q.ID["<|endoftext|>"]]
    assert tok.pad_token_id == Q.ID["<|endoftext|>"]
    assert model.generation_config.repetition_penalty == 1.05  # what sample() must not apply
    assert M.image_frame(proc, data.GEMEX_FRAME) == 224 and tok.padding_side == "left"
    prompt = M.build_prompts(proc, *_samples())
    # a 112-px film: 16 tokens
    assert int((prompt["input_ids"] == Q.ID["<|image_pad|>"]).sum()) == 2 * 16


def test_a_224_px_film_is_64_image_tokens_through_window_attention(lookalike):
    model, proc = M.load(lookalike)
    assert model.config.vision_config.window_size == 112
    assert model.config.vision_config.fullatt_block_indexes == [1]
    s = data.make_sample("test", 0, frame=224)
    out = M.sample(model, proc, [s["image"]], [s["question"]], group_size=2, max_new_tokens=3)
    # a group of 2 shares one prompt
    assert int((out["prompt"]["input_ids"] == proc.image_token_id).sum()) == 64


def test_the_sampler_never_draws_past_the_tokenizer_nor_a_special_token(lookalike, monkeypatch):
    model, proc = M.load(lookalike)
    images, questions = _samples()
    torch.manual_seed(0)
    ids = M.sample(model, proc, images, questions, 8, 12)["completion_ids"]
    specials = set(proc.tokenizer.all_special_ids) - set(M.end_ids(model))
    assert (ids < Q.N_TOKENS).all() and not any(i in specials for i in ids.flatten().tolist())
    # the finding: a sampler that bans only the vision tokens draws the 271 ids past the tokenizer
    vision = proc.tokenizer.convert_tokens_to_ids(M.VISION_TOKENS)
    monkeypatch.setattr(M, "text_support", lambda m,
                        t: ~torch.isin(torch.arange(Q.VOCAB), torch.tensor(vision)))
    torch.manual_seed(0)
    old = M.sample(model, proc, images, questions, 8, 12)["completion_ids"]
    assert (old >= Q.N_TOKENS).sum() > 10
    # and a table grpo.py indexes by token id covers every row of the embedding
    pieces = credit.token_pieces(proc.tokenizer, Q.VOCAB)
    assert len(pieces) == Q.VOCAB and credit.digit_tokens(pieces)[old].shape == old.shape


def test_lora_bf16_checkpointed_sft_then_grpo_with_a_reference_then_evaluate(lookalike, tmp_path):
    """The 3B recipe of the README on the lookalike, flags and all, end to end."""
    from transformers import AutoModelForImageTextToText
    sft_out, grpo_out = tmp_path / "sft", tmp_path / "grpo"
    small = ["--eval-n", "2", "--train-size", "8"]
    r = subprocess.run([sys.executable, "sft.py", "--model", lookalike, "--lora-r", "4", "--dtype",
                        "bfloat16",
                        "--grad-checkpointing", "--max-steps", "2", "--batch-size", "2",
                        "--eval-every", "0",
                        "--save-every", "1", "--out", str(sft_out), *small], capture_output=True,
                        text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: --lr 0.002 is the tiny model's default" in r.stdout           # finding 7
    (ckpt,) = run.list_checkpoints(str(sft_out))  # step 1 (keep 2, 1 periodic)
    assert not list(Path(ckpt).glob("*.safetensors")) and (Path(ckpt) / "trainer_state.pt").exists()
    merged = AutoModelForImageTextToText.from_pretrained(str(sft_out))  # finding 2: merged, plain
    assert not any("lora" in n for n in merged.state_dict())
    r = subprocess.run([sys.executable, "grpo.py", "--init", str(sft_out), "--lora-r", "4",
                        "--dtype", "bfloat16",
                        "--beta", "0.04", "--max-steps", "1", "--prompts", "2", "--group-size", "2",
                        "--lr", "1e-5",
                        "--max-new-tokens", "8", "--eval-every", "0", "--out", str(grpo_out),
                        *small],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]  # finding 1: crashed at step 1
    assert "warning" not in r.stdout
    r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(grpo_out), "--split",
                        "validation",
                        "--n", "2", "--max-new-tokens", "6", "--gallery", ""], capture_output=True,
                        text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_full_bf16_reference_has_zero_kl_before_the_first_update(lookalike, tmp_path):
    out = tmp_path / "grpo"
    r = subprocess.run([sys.executable, "grpo.py", "--init", lookalike, "--dtype", "bfloat16",
                        "--beta", "0.1",
                        "--max-steps", "1", "--prompts", "2", "--group-size", "2",
                        "--max-new-tokens", "6",
                        "--lr", "1e-6", "--eval-every", "0", "--eval-n", "2", "--train-size", "8",
                        "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["kl_ref"] == 0.0                                                   # finding 8


def test_log_probs_keep_no_float32_copy_of_the_logits_for_backward(lookalike, monkeypatch):
    model, proc = M.load(lookalike, dtype=torch.bfloat16)
    prompt = M.build_prompts(proc, *_samples())
    ids, mask = torch.randint(100, 5000, (4, 70)), torch.ones(4, 70)
    result = {}
    for chunk in (M.LOGP_CHUNK, 10 ** 6):           # chunks of 64 positions, and all 70 at once
        monkeypatch.setattr(M, "LOGP_CHUNK", chunk)
        model.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            logp = M.completion_logprobs(model, prompt, ids, mask, repeats=2)      # [4, 70]
        big = [t for t in saved if t.dim() == 3 and t.shape[-1] == Q.VOCAB]
        assert big and all(t.dtype == torch.bfloat16
                           for t in big)  # finding 4: no float32 [N, T, V]
        (logp * mask).sum().backward()
        result[chunk] = logp.detach(), [p.grad.clone() for p in model.parameters()
                                        if p.grad is not None]
    (a, ga), (b, gb) = result.values()
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert all(torch.allclose(x.float(), y.float(), rtol=1e-2, atol=1e-6) for x, y in zip(ga, gb))


def test_bf16_adamw_updates_a_tensor_in_bounded_slices(monkeypatch):
    torch.manual_seed(0)
    w0, g = torch.randn(1000), torch.randn(1000)
    out, update = {}, memory.StochasticAdamW._update
    for slice_ in (10 ** 9, 128):
        monkeypatch.setattr(memory.StochasticAdamW, "SLICE", slice_)
        sizes = []
        monkeypatch.setattr(memory.StochasticAdamW, "_update",
                            staticmethod(lambda p, *a: sizes.append(p.numel())
                                                                        or update(p, *a)))
        p = torch.nn.Parameter(w0.clone())  # float32: the update is exact, so comparable
        opt = memory.StochasticAdamW([p], lr=1e-2)
        for _ in range(3):
            p.grad = g.clone()
            opt.step()
        out[slice_] = p.detach().clone()
        assert max(sizes) <= min(slice_, 1000)                                      # finding 5
    assert torch.equal(out[128], out[10 ** 9])


def test_checkpointing_leaves_a_frozen_vision_tower_out_of_backward():
    grads, tower_grad = {}, {}
    images, questions = _samples()
    for ckpt in (False, True):
        model, proc = pretrain.build()
        memory.apply_memory_plan(model, proc, memory.MemoryFlags(lora_r=4, grad_checkpointing=ckpt))
        model.train()
        def hook(module, args, out):
            tower_grad[ckpt] = getattr(out, "pooler_output", out).requires_grad
        model.model.visual.register_forward_hook(hook)
        prompt = M.build_prompts(proc, images, questions)
        ids, mask = M.tokenize_completions(proc, ["<answer>yes</answer>"] * 2, M.end_ids(model)[0])
        (-(M.completion_logprobs(model, prompt, ids, mask) * mask).sum()).backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert tower_grad == {False: False, True: False}                                # finding 6
    assert grads[True].keys() == grads[False].keys()
    assert all(torch.allclose(grads[True][n], grads[False][n], atol=1e-6) for n in grads[False])


def test_a_merged_save_keeps_a_small_update_in_bf16_and_streams_in_shards(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText
    model, proc = pretrain.build(dtype=torch.bfloat16)
    memory.apply_memory_plan(model, proc, memory.MemoryFlags(lora_r=4))
    name, layer = memory.lora_layers(model)[0]
    with torch.no_grad():  # an update of 1e-5 on every weight: below bf16's resolution (~1e-4 here)
        layer.lora_A["default"].weight.fill_(1.0)
        rank = layer.lora_A["default"].weight.shape[0]
        layer.lora_B["default"].weight.fill_(1e-5 / (layer.scaling["default"] * rank))
    base = layer.base_layer.weight.detach().float().clone()
    memory.save_merged(model, str(tmp_path / "one"))
    w = load_file(str(tmp_path / "one" / "model.safetensors"))[name + ".weight"].float()
    assert (w - base).mean().item() == pytest.approx(1e-5, rel=0.1)  # rounding to nearest: ~0
    memory.save_merged(model, str(tmp_path / "sharded"), shard_bytes=200_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    a = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "one"))
    b = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "sharded"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _gemex_file(tmp, splits, response, n_rows=48):
    """A GEMeX-shaped parquet over `n_rows` rows on images drawn only from `splits`."""
    root = Path(tmp) / "files"
    rows, i = [], 0
    paths = {s: [] for s in splits}
    while sum(map(len, paths.values())) < n_rows // 4:
        p = f"/p10/p1{i:07d}/s5{i:07d}/img{i}.jpg"
        if gemex.split_of(p) in paths:
            paths[gemex.split_of(p)].append(p)
        i += 1
    rng = np.random.default_rng(0)
    for p in sum(paths.values(), []):
        (root / p[1:]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.draw_radiograph(rng, 224, [])[0]).save(root / p[1:])
        rows += [dict(image_path=p, question="Is there a nodule in the left lower lung zone?",
                      question_type="closed_ended_questions", response=response)] * 4
    datasets.Dataset.from_list(rows).to_parquet(str(Path(tmp) / "small.parquet"))
    return ["--data", "gemex", "--data-path", str(Path(tmp) / "small.parquet"), "--image-root",
            str(root)]


SHORT = "<think>The left lower lung zone [120, 130, 200, 190] is clear.</think><answer>no</answer>"


def test_a_small_real_file_without_validation_or_test_images(tmp_path):
    flags = _gemex_file(tmp_path, ("train",), SHORT)  # finding 9: a course's subset
    out = tmp_path / "sft"
    r = subprocess.run([sys.executable, "sft.py", "--max-steps", "1", "--batch-size", "4", "--out",
                        str(out), *flags],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no validation rows: in-training validation skipped" in r.stdout
    r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(out), *flags],
                       capture_output=True, text=True)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "the test split of" in last and "is empty" in last and "--split train" in last
    r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(out), "--split", "train",
                        "--n", "4",
                        "--max-new-tokens", "4", "--gallery", "", *flags], capture_output=True,
                        text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_validation_decodes_as_far_as_the_data_needs(lookalike, tmp_path):
    # GEMeX traces run to ~100 words with boxes: a reasoning of ~300 tokens here. The budget
    # sized from the references must reach in-training validation too (it stopped at 160)
    said = " ".join(["The left lower lung zone [120, 130, 200, 190] is clear."] * 12)
    long = f"<think>{said}</think><answer>no</answer>"
    flags = _gemex_file(tmp_path, ("train", "validation"), long, n_rows=400)
    out = tmp_path / "sft"
    r = subprocess.run([sys.executable, "sft.py", "--model", lookalike, "--lr", "1e-5",
                        "--max-steps", "1",
                        "--batch-size", "2", "--eval-n", "2", "--train-size", "8", "--out",
                        str(out), *flags],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    budget = int(r.stdout.split("generation budget ")[1].split()[0])
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert budget > 300 and line["val_length"] == budget  # finding 3: was 160
