"""The tiny Qwen2.5-VL, the checkpoint path, and the two operations the trainers rely on."""
import json

import pytest
import torch

import data
import pretrain
import memory
import model as M
import run


@pytest.fixture(scope="module")
def tiny():
    return pretrain.build()


@pytest.fixture(scope="module")
def batch():
    rows = [data.make_sample("train", i) for i in range(4)]
    return [r["image"] for r in rows], [r["question"] for r in rows], [r["response"] for r in rows]


def test_tiny_is_a_real_qwen2_5_vl(tiny):
    model, processor = tiny
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 < n < 5e6, n
    tok = processor.tokenizer
    # digits are single tokens, the tags are single tokens that survive decoding
    assert tok.tokenize("[60, 120]").count("1") == 1 and "<think>" in tok.tokenize("<think>x")
    ids = tok("<think>a</think><|im_end|>")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>a</think>"
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_image_tokens_equal_vision_features(tiny, batch):
    model, processor = tiny
    prompt = M.build_prompts(processor, *batch[:2])
    feats = model.get_image_features(prompt["pixel_values"], prompt["image_grid_thw"]).pooler_output
    n_tokens = (prompt["input_ids"] == processor.image_token_id).sum(1)           # per prompt
    # 112 px -> 8x8 -> 2x2 merged
    assert [f.shape[0] for f in feats] == n_tokens.tolist() == [16] * 4


def test_completion_mask_keeps_the_first_end_token_even_when_pad_is_eos():
    E = 9  # end token, also used as padding after it
    ids = torch.tensor([[5, 6, E, E, E], [5, E, 7, 8, E], [5, 6, 7, 8, 4]])
    expect = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).float()
    assert torch.equal(M.completion_mask(ids, [E]), expect)
    assert torch.equal(M.completion_mask(ids, [E, 4]),
                       torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1.]]))


def test_logprobs_equal_a_hand_written_forward(tiny, batch):
    model, processor = tiny
    images, questions, responses = batch
    prompt = M.build_prompts(processor, images, questions)
    ids, mask = M.tokenize_completions(processor, responses, M.end_ids(model)[0])
    with torch.no_grad():
        got = M.completion_logprobs(model, prompt, ids, mask)                          # [N, T]
        full = torch.cat([prompt["input_ids"], ids], 1)
        logits = model(input_ids=full,
                       attention_mask=torch.cat([prompt["attention_mask"], mask.long()], 1),
                       mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"],
                                                    torch.zeros_like(ids)], 1),
                       pixel_values=prompt["pixel_values"],
                       image_grid_thw=prompt["image_grid_thw"]).logits
    P = prompt["input_ids"].shape[1]
    for i in range(len(responses)):
        for t in range(int(mask[i].sum())):   # token t of the completion is predicted at P + t - 1
            want = torch.log_softmax(logits[i, P + t - 1], -1)[ids[i, t]]
            assert got[i, t].item() == pytest.approx(want.item(), abs=1e-5)


def test_mm_token_type_ids_change_the_logits(tiny, batch):
    """Why every forward passes mm_token_type_ids: without them M-RoPE silently falls back to 1-D"""
    model, processor = tiny
    prompt = M.build_prompts(processor, *batch[:2])
    with torch.no_grad():
        kw = dict(input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"],
                  pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"])
        with_3d = model(**kw, mm_token_type_ids=prompt["mm_token_type_ids"]).logits
        without = model(**kw).logits
    assert (with_3d - without).abs().max() > 1e-3


def test_a_sampled_rollout_has_the_group_layout_shapes_and_masks(tiny, batch):
    model, processor = tiny
    images, questions, _ = batch
    torch.manual_seed(0)
    out = M.sample(model, processor, images[:2], questions[:2], group_size=3, max_new_tokens=12,
                   temperature=0.7)
    ids, mask, prompt = out["completion_ids"], out["completion_mask"], out["prompt"]
    assert prompt["input_ids"].shape[0] == 2 and out["group_size"] == 3  # each prompt once
    assert ids.shape[0] == 6
    assert len(out["texts"]) == 6
    assert mask.shape == ids.shape
    assert ids.shape[1] <= 12
    end, pad = M.end_ids(model), processor.tokenizer.pad_token_id
    for i in range(6):
        n = int(mask[i].sum())
        assert torch.equal(mask[i], (torch.arange(ids.shape[1]) < n).float())         # 1s, then 0s
        if out["truncated"][i]:
            assert n == ids.shape[1] == 12
        else:
            assert ids[i, n - 1] in end and (ids[i, n:] == pad).all()  # ends once, then padding
    # the layout: rows 0-2 continue prompt 0 and rows 3-5 prompt 1 (greedy groups repeat their
    # prompt's answer)
    g = M.sample(model, processor, images[:2], questions[:2], group_size=3, max_new_tokens=12,
                 greedy=True)["completion_ids"]
    for b in range(2):
        alone = M.sample(model, processor, images[b:b + 1], questions[b:b + 1], max_new_tokens=12,
                         greedy=True)
        for r in range(3 * b, 3 * b + 3):
            assert torch.equal(g[r, :alone["completion_ids"].shape[1]], alone["completion_ids"][0])


def test_the_decode_loop_is_generate_and_the_scoring_forward_sees_what_it_saw(tiny, batch):
    model, processor = tiny
    images, questions, _ = batch
    prompt = M.build_prompts(processor, images, questions)
    gen = model.generate(**prompt, max_new_tokens=12, do_sample=False, output_logits=True,
                         return_dict_in_generate=True,
                         pad_token_id=processor.tokenizer.pad_token_id)
    g_ids = gen.sequences[:, prompt["input_ids"].shape[1]:]
    g_mask = M.completion_mask(g_ids, M.end_ids(model))
    ours = M.sample(model, processor, images, questions, max_new_tokens=12, greedy=True)
    assert torch.equal(ours["completion_ids"] * ours["completion_mask"].long(),
                       (g_ids * g_mask.long())[:, :ours["completion_ids"].shape[1]])
    # the scoring pass must see what generation saw: same 3-D positions, same logits
    logp = torch.stack([torch.log_softmax(x.float(), -1) for x in gen.logits], 1)
    want = logp.gather(-1, g_ids[..., None])[..., 0]
    with torch.no_grad():
        got = M.completion_logprobs(model, prompt, g_ids, g_mask)
    assert torch.allclose(got * g_mask, want * g_mask, atol=1e-4)


@pytest.mark.parametrize("vision_trained", [True, False])
def test_shared_prompt_scoring_equals_the_per_row_forward(batch, vision_trained):
    # each prompt prefilled once and its cache repeated for its G completions: the same log-probs
    # AND the same gradient (into the prompt pass and the vision tower) as G full copies
    model, processor = pretrain.build()
    model.model.visual.requires_grad_(vision_trained)
    images, questions, _ = batch
    torch.manual_seed(0)
    out = M.sample(model, processor, images[:2], questions[:2], group_size=3, max_new_tokens=10,
                   temperature=1.0)
    # any split of the 6 rows
    ids, mask, repeats = out["completion_ids"], out["completion_mask"], [2, 4]
    grads, logps = [], []
    for prompt, r in ((out["prompt"], repeats), (M.expand_prompt(out["prompt"], repeats), 1)):
        model.zero_grad()
        logp = M.completion_logprobs(model, prompt, ids, mask, temperature=0.7, repeats=r)
        (-(logp * mask).sum()).backward()
        logps.append(logp.detach() * mask)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.allclose(logps[0], logps[1], atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and any("visual" in n
                                                      for n in grads[0]) == vision_trained
    # float32 sums in another order: equal to ~1e-7 of the tensor's scale, whatever the CPU
    for n in grads[0]:
        scale = grads[1][n].abs().max()
        assert (grads[0][n] - grads[1][n]).abs().max() <= 1e-5 * scale + 1e-9, n


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    torch.manual_seed(0)
    draws = torch.stack([M._draw(logits, 1.0, 0.75) for _ in range(400)])  # nucleus: 0.5 + 0.3
    assert set(draws[:, 0].tolist()) == {0, 1} and set(draws[:, 1].tolist()) == {2, 3}
    # the top one
    drawn = torch.stack([M._draw(logits, 1.0, 0.4) for _ in range(50)])
    assert set(drawn.flatten().tolist()) <= {0, 3}


def test_scoring_at_the_sampling_temperature_is_the_sampling_distribution(tiny, batch):
    # GRPO samples at a temperature T (0.7 here); the log-probs it scores (ratio, KL, entropy)
    # must be those of the distribution generate() drew from: log_softmax(logits / T)
    model, processor = tiny
    prompt = M.build_prompts(processor, *batch[:2])
    torch.manual_seed(0)
    gen = model.generate(**prompt, max_new_tokens=10, do_sample=True, temperature=0.7, top_k=0,
                         top_p=1.0, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=processor.tokenizer.pad_token_id)
    ids = gen.sequences[:, prompt["input_ids"].shape[1]:]
    mask = M.completion_mask(ids, M.end_ids(model))
    logp = torch.stack([torch.log_softmax(s.float(), -1) for s in gen.scores], 1)
    want = logp.gather(-1, ids[..., None])[..., 0]
    with torch.no_grad():
        got = M.completion_logprobs(model, prompt, ids, mask, temperature=0.7)
        at_one = M.completion_logprobs(model, prompt, ids, mask)
    assert torch.allclose(got * mask, want * mask, atol=1e-4)
    assert not torch.allclose(at_one * mask, want * mask, atol=1e-2)  # T = 1 scores another policy


def test_sampler_ignores_the_checkpoints_generation_config(batch, tmp_path):
    # Qwen2.5-VL checkpoints ship repetition_penalty 1.05, top_k 1, top_p 0.001: generate() would
    # fill every knob we do not pass from them. The sampler sets every knob, so the rollout is the
    # same.
    images, questions, _ = batch
    model, processor = pretrain.build()
    torch.manual_seed(0)
    clean = M.sample(model, processor, images[:2], questions[:2], group_size=3, max_new_tokens=12,
                     temperature=0.7)
    model.generation_config.update(do_sample=True, repetition_penalty=1.05, top_k=1, top_p=0.001,
                                   no_repeat_ngram_size=2, min_new_tokens=12, temperature=0.1)
    run.save(model, processor, str(tmp_path))
    loaded, processor = M.load(str(tmp_path))
    assert loaded.generation_config.repetition_penalty == 1.05  # the checkpoint carries it
    torch.manual_seed(0)
    dirty = M.sample(loaded, processor, images[:2], questions[:2], group_size=3, max_new_tokens=12,
                     temperature=0.7)
    assert torch.equal(clean["completion_ids"], dirty["completion_ids"])
    # and the knobs really do act when generate() is left to the checkpoint's config
    torch.manual_seed(0)
    raw = loaded.generate(**M.expand_prompt(dirty["prompt"], 3), max_new_tokens=12, do_sample=True,
                          pad_token_id=processor.tokenizer.pad_token_id)
    assert not torch.equal(raw[:, dirty["prompt"]["input_ids"].shape[1]:], clean["completion_ids"])


def test_sampling_never_emits_a_vision_placeholder(batch):
    # make <|image_pad|> the likeliest next token everywhere: unsuppressed, a completion would hold
    # image tokens without image features, and scoring it would fail (the CI failure of session 9)
    model, processor = pretrain.build()
    pad = processor.image_token_id
    with torch.no_grad():
        model.get_output_embeddings().weight[pad] *= 200.0
    images, questions, _ = batch
    torch.manual_seed(0)
    out = M.sample(model, processor, images[:2], questions[:2], group_size=2, max_new_tokens=8)
    vision = processor.tokenizer.convert_tokens_to_ids(M.VISION_TOKENS)
    assert pad in vision and not torch.isin(out["completion_ids"], torch.tensor(vision)).any()
    with torch.no_grad():
        M.completion_logprobs(model, out["prompt"], out["completion_ids"], out["completion_mask"],
                              repeats=2)


def test_save_then_load_through_the_checkpoint_path(tiny, batch, tmp_path):
    model, processor = tiny
    run.save(model, processor, str(tmp_path))
    cfg = json.load(open(tmp_path / "processor_config.json"))
    assert cfg["processor_class"] == "Qwen2_5_VLProcessor" and "video_processor" in cfg
    model2, processor2 = M.load(str(tmp_path))                      # the real-checkpoint branch
    images, questions, responses = batch
    p1 = M.build_prompts(processor, images, questions)
    p2 = M.build_prompts(processor2, images, questions)
    assert torch.equal(p1["input_ids"], p2["input_ids"])
    assert torch.equal(p1["pixel_values"], p2["pixel_values"])
    ids, mask = M.tokenize_completions(processor, responses, M.end_ids(model)[0])
    with torch.no_grad():
        a = M.completion_logprobs(model, p1, ids, mask)
        b = M.completion_logprobs(model2, p2, ids, mask)
    assert torch.equal(a, b)


def test_qwen2_vl_checkpoints_load_too(tiny, batch, tmp_path):
    """The older Qwen2-VL architecture goes through the same load() and helpers."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    ref, processor = tiny
    c = ref.config
    config = Qwen2VLConfig(
        text_config=dict(pretrain.TEXT, vocab_size=c.text_config.vocab_size,
                         eos_token_id=c.text_config.eos_token_id,
                         pad_token_id=c.text_config.pad_token_id,
                         bos_token_id=c.text_config.bos_token_id),
        vision_config=dict(depth=1, embed_dim=64, hidden_size=pretrain.TEXT["hidden_size"],
                           num_heads=2, patch_size=14),
        image_token_id=c.image_token_id, video_token_id=c.video_token_id,
        vision_start_token_id=c.vision_start_token_id, vision_end_token_id=c.vision_end_token_id)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = c.text_config.eos_token_id
    run.save(model, processor, str(tmp_path))
    loaded, proc = M.load(str(tmp_path))
    assert type(loaded).__name__ == "Qwen2VLForConditionalGeneration"
    out = M.sample(loaded, proc, batch[0][:1], batch[1][:1], group_size=2, max_new_tokens=4)
    with torch.no_grad():
        lp = M.completion_logprobs(loaded, out["prompt"], out["completion_ids"],
                                   out["completion_mask"], repeats=2)
    assert lp.shape == out["completion_ids"].shape and torch.isfinite(lp).all()


def test_bad_checkpoint_names_the_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SystemExit, match="gpt2"):
        M.load(str(tmp_path))


def test_memory_plan_flags_change_memory_not_maths():
    """--max-pixels shrinks the frame (and the tokens); --freeze-vision leaves the tower out of the
    optimizer; --grad-checkpointing recomputes activations yet gives the same gradients."""
    from dataclasses import replace
    import sft
    plan = lambda **k: replace(memory.MemoryFlags(), **k)  # noqa: E731
    model, processor = pretrain.build()
    assert M.image_frame(processor, 224) == 112  # tiny: 224-px GEMeX boxes land in 112
    memory.apply_memory_plan(model, processor, plan(max_pixels=56 * 56))
    assert M.image_frame(processor, 224) == 56
    s = data.make_sample("test", 0)
    small = s["image"].resize((56, 56))
    ids = M.build_prompts(processor, [small], ["q"])["input_ids"]
    assert int((ids == processor.image_token_id).sum()) == 4
    # a 112 image would be resized: refused
    with pytest.raises(AssertionError, match="another frame"):
        M.build_prompts(processor, [s["image"]], ["q"])

    model, processor = pretrain.build()
    memory.apply_memory_plan(model, processor, plan(freeze_vision=True))
    groups = sft.param_groups(model, sft.SFTConfig())
    trained = {id(p) for g in groups for p in g["params"]}
    assert not trained & {id(p) for p in model.model.visual.parameters()} and trained

    def grads(checkpointing):
        torch.manual_seed(0)
        m, p = pretrain.build()
        memory.apply_memory_plan(m, p, plan(grad_checkpointing=checkpointing))
        m.train()
        prompt = M.build_prompts(p, [s["image"]], [s["question"]])
        ids, mask = M.tokenize_completions(p, [s["response"]], M.end_ids(m)[0])
        (-(M.completion_logprobs(m, prompt, ids, mask) * mask).sum()).backward()
        return torch.cat([q.grad.flatten() for q in m.parameters()])
    assert torch.allclose(grads(False), grads(True), atol=1e-5)


def test_a_processor_with_a_larger_budget_still_reads_the_synthetic_set():
    """A real Qwen2.5-VL processor sees GEMeX films at 224 px, but the synthetic set is drawn at
    112: it must load as drawn, and its images reach the model unresized (boxes keep their
    frame)."""
    from transformers.image_utils import SizeDict
    _, processor = pretrain.build()
    # Qwen's defaults
    processor.image_processor.size = SizeDict(shortest_edge=56 * 56, longest_edge=28 * 28 * 1280)
    frame = M.image_frame(processor, data.GEMEX_FRAME)
    assert frame == 224
    rows = data.load("validation", 2, data.DataFlags(data="synthetic"), frame=frame)[:]
    assert rows["image"][0].size == (112, 112)
    prompt = M.build_prompts(processor, rows["image"], rows["question"])
    assert prompt["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]


def test_sample_generates_in_eval_mode_and_restores_the_mode():
    model, processor = pretrain.build()
    s = data.make_sample("test", 0)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    for mode in (True, False):
        model.train(mode)
        M.sample(model, processor, [s["image"]], [s["question"]], max_new_tokens=2, greedy=True)
        assert model.training == mode
    hook.remove()
    assert seen and not any(seen)          # every generation forward ran in eval mode


def test_parse_config_flags(monkeypatch):
    """Flags come from the dataclass: dashes for underscores, bools bare or spelled out, bad values
    refused."""
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        max_steps: int = 5      # steps
        resume: bool = False    # continue
        name: str = "x"         # a name

    def parse(*argv):
        monkeypatch.setattr("sys.argv", ["prog", *argv])
        return run.parse_config(Cfg)
    assert parse() == Cfg()
    assert parse("--max-steps", "7", "--resume") == Cfg(max_steps=7, resume=True)
    assert parse("--resume", "false", "--name", "y") == Cfg(resume=False, name="y")
    assert parse("--resume", "1").resume is True
    with pytest.raises(SystemExit):
        parse("--resume", "maybe")


# ---------------------------------------------------------------------------- LoRA and bf16 weights
LORA = memory.MemoryFlags(lora_r=4, lora_alpha=8.0)


def _lora_trained(batch, steps=3):
    """The tiny model with LoRA adapters after a few SFT steps -> (model, processor, weights)"""
    model, processor = pretrain.build()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    memory.apply_memory_plan(model, processor, LORA)
    images, questions, responses = batch
    prompt = M.build_prompts(processor, images, questions)
    ids, mask = M.tokenize_completions(processor, responses, M.end_ids(model)[0])
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = memory.adamw(trained, lr=1e-2, betas=(0.9, 0.99))
    for _ in range(steps):
        (-(M.completion_logprobs(model, prompt, ids, mask) * mask).sum() / mask.sum()).backward()
        opt.step()
        opt.zero_grad()
    return model, processor, base, (prompt, ids, mask)


def test_lora_trains_the_adapters_and_not_the_base(batch, tmp_path):
    from safetensors.torch import load_file
    model, _, base, _ = _lora_trained(batch)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert not any(".visual." in n for n in trained)  # the vision tower is frozen unless asked
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trained)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters()
               if "lora_B" in n)  # B starts at 0 and moved
    memory.save_merged(model, str(tmp_path))
    merged = load_file(str(tmp_path / "model.safetensors"))
    assert set(merged) == set(base) - {"lm_head.weight"}  # tied to the embedding: not written
    for name, t in merged.items():  # merged weights differ only where adapted
        adapted = any(name == f"{n}.weight" for n, _ in memory.lora_layers(model))
        assert torch.equal(t, base[name]) != adapted, name
    for name, p in model.named_parameters():  # the frozen base never moved
        if "lora_" not in name:
            assert torch.equal(p, base[name.replace(".base_layer.", ".")]), name


def test_lora_with_adapters_off_is_the_base_model_exactly(batch):
    model, _, base, (prompt, ids, mask) = _lora_trained(batch)
    plain, _ = pretrain.build()
    with torch.no_grad():
        want = M.completion_logprobs(plain, prompt, ids, mask)
        with memory.adapters_off(model):
            got = M.completion_logprobs(model, prompt, ids, mask)
        on = M.completion_logprobs(model, prompt, ids, mask)
    assert torch.equal(got, want)
    assert not torch.allclose(on, want, atol=1e-3)  # and on, the adapters do act


def test_a_merged_lora_save_loads_in_plain_transformers(batch, tmp_path):
    from transformers import AutoModelForImageTextToText
    model, processor, _, (prompt, ids, mask) = _lora_trained(batch)
    run.save(model, processor, str(tmp_path))
    loaded = AutoModelForImageTextToText.from_pretrained(str(tmp_path))
    assert not any("lora" in n for n in loaded.state_dict())
    with torch.no_grad():
        a = M.completion_logprobs(model, prompt, ids, mask)
        b = M.completion_logprobs(loaded, prompt, ids, mask)
    assert torch.allclose(a * mask, b * mask, atol=1e-4)


def test_bf16_adamw_moves_the_weights_as_float32_does_at_lr_1e_6():
    # weights of magnitude ~0.02 have a bf16 resolution of 1.2e-4: round-to-nearest drops an AdamW
    # step of ~1e-6 every time; stochastic rounding keeps it in expectation
    torch.manual_seed(0)
    w0 = (0.02 + 0.005 * torch.rand(8192)) * torch.sign(torch.randn(8192))
    direction = torch.sign(torch.randn(8192))
    moved = {}
    for name in ("float32", "bf16 nearest", "bf16 stochastic"):
        p = torch.nn.Parameter(w0.clone() if name == "float32" else w0.to(torch.bfloat16))
        start = p.detach().float().clone()
        opt = (torch.optim.AdamW([p], lr=1e-6, weight_decay=0.0) if name != "bf16 stochastic"
               else memory.adamw([p], 1e-6, (0.9, 0.999)))
        assert isinstance(opt, memory.StochasticAdamW) == (name == "bf16 stochastic")
        g = torch.Generator().manual_seed(1)
        for _ in range(100):
            p.grad = (direction * (1 + 0.1 * torch.randn(8192, generator=g))).to(p.dtype)
            opt.step()
        # mean step along the gradient
        moved[name] = float(((start - p.detach().float()) * direction).mean())
    assert moved["float32"] == pytest.approx(1e-4, rel=0.05)  # ~lr per step for 100 steps
    assert moved["bf16 nearest"] < 0.1 * moved["float32"]                   # the pitfall this fixes
    assert moved["bf16 stochastic"] == pytest.approx(moved["float32"], rel=0.10)
