"""pretrain.py -- Stage 0, done for you: the tiny base model, pretrained once, as a VLM is.

Every real run of this recipe starts from a pretrained model that sees, reads, writes a region's
box when asked, and has never seen a ThinkVG trace. The miniature does the same with a tiny
Qwen2.5-VL (the real architecture at 1.8M parameters) pretrained here once and shipped (BASE):
`python sft.py` loads it as `--model Qwen/Qwen2.5-VL-3B-Instruct` loads the real one. This is
the only file that builds the tiny model from its config (build(): the tests' random models too).

What the base learns, on films of its own stream (never an image of the train, validation or
test splits) and never from a ThinkVG trace (no reasoning with boxes followed by an answer):

  seeing     "Describe the findings." -> "A small round opacity in the left lower lung zone."
             "Describe the cardiac silhouette." -> "The cardiac silhouette has a normal outline."
  locating   "Locate the right costophrenic angle." -> "[12, 70, 30, 88]" (absolute pixels, as
             Qwen2.5-VL is pretrained to write them)
  reading    text only: a question with its options and a written reasoning (statements
             about regions, no boxes) -> the answer it implies. Half the time the reasoning is
             a passage in the user's turn ("<statements>\n<question>" -> "B"), half the time
             the assistant's own chain of thought ("<question>" -> "<statements>\nAnswer: B",
             the statements context, the answer the target), as a pretrained LLM reads both.
             The letter lookup (two regions described, four options) gets a share of its own
             and a curriculum (one region described first, then both).

First the vision tower learns what each film shows and where, with heads of its own
(warm_up_tower): from the language loss alone a from-scratch tower learns slowly.

    python pretrain.py                       # ~75 min on 2 CPU cores: writes BASE and its card
    python pretrain.py --films 2000 --tower-steps 50 --steps 200 --warmup-steps 20 --eval-n 50 \
        --out /tmp/base                      # a quick look (a few minutes)
"""
import functools
import json
import os
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers import (GenerationConfig, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import data
import model as M
import reward
import run

BASE = "tiny-qwen2.5-vl-cxr"   # the shipped base: sft.py's default --model
BASE_SYSTEM = "You are a helpful assistant."   # the base's own system prompt (Qwen's default)


# ----------------------------------------------------------------------------- config
@dataclass
class PretrainConfig:
    out: str = BASE  # where the base (weights, tokenizer, processor, README) is written
    films: int = 20000             # the pretraining films, drawn once from a stream of their own
    tower_steps: int = 800         # vision warm-up steps (the tower's own heads), before language
    tower_lr: float = 3e-3         # peak learning rate of the vision warm-up
    steps: int = 12000  # language-model steps (alternately a batch of films and a batch of text)
    batch_size: int = 32           # samples per step
    lr: float = 2e-3               # peak learning rate (the vision tower at a tenth of it)
    warmup_steps: int = 200        # a linear warm-up, times a cosine decay to 10% over the steps
    curriculum: float = 0.5  # share of the steps to go from 1 region named to 2 (half of it at 1)
    lookup_share: float = 0.25     # share of reading samples that are the letter lookup
    single_share: float = 0.3      # share of the other reading samples that are single choice
    multi_share: float = 0.25      # share of the other reading samples that are multi choice
    in_prompt: float = 0.5         # share of reading with the reasoning in the user's turn
    eval_n: int = 400              # held-out samples per task for the card
    seed: int = 0                  # seed for the architecture's init, the films and the order


# --------------------------------------------------------------- the tokenizer and the architecture
# Text: head_dim = 128 / 4 = 32, so mrope_section (temporal, height, width frequency pairs) must
# sum to 16. Vision: 14-px patches, 2x2 merged, so a 112-px film is an 8x8 patch grid, 16 tokens.
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [4, 6, 6]})
VISION = dict(depth=3, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112,
              fullatt_block_indexes=[2])
PIXELS = 112 * 112  # the image processor's budget: every film is seen at 112 x 112


@functools.lru_cache(maxsize=1)
def build_tokenizer(vocab_size=1024):
    """A byte-level BPE trained on the base's own texts (never a ThinkVG trace): digits one token
    each (as Qwen's), the ThinkVG tags and each region name single added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    rng = np.random.default_rng([0, data.STREAMS["pretrain"], 10 ** 9])
    texts = [BASE_SYSTEM, M.SYSTEM_PROMPT, "<think>", "<answer>"]
    for i in range(800):
        findings = data.sample_findings(rng)
        at = {r: k for k, r in findings}
        texts += [report(findings), data.describe(data.REGIONS[i % 10], None, at),
                  *reading(rng, i, 0.5)]
        texts.append(data.format_box([int(v) for v in rng.integers(0, 112, 4)]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=M.SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_tokens(M.TAGS)
    tok.add_tokens([AddedToken(w, normalized=False) for r in data.REGIONS for w in (" " + r, r)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", padding_side="left")


def build(seed=0, dtype=torch.float32):
    """A random-init tiny Qwen2.5-VL and its processor, offline (the tests' random models too)."""
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in M.SPECIAL}
    text_ids = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                    pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(
        text_config=dict(TEXT, vocab_size=len(tokenizer), **text_ids),
        vision_config=dict(VISION, out_hidden_size=TEXT["hidden_size"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    model.generation_config = GenerationConfig(**text_ids)
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                               min_pixels=PIXELS, max_pixels=PIXELS)
    return model, M.ImageOnlyProcessor(image_processor, tokenizer, chat_template=M.CHAT_TEMPLATE)


# --------------------------------------------------------------------- what a base knows: its tasks
def draw_films(n, seed, offset=0, frame=112):
    """n films of the base's own stream: (image, {region: box}, [(finding, region), ...])."""
    out = []
    for i in range(offset, offset + n):
        rng = np.random.default_rng([seed, data.STREAMS["pretrain"], i])
        findings = data.sample_findings(rng)
        pixels, boxes = data.draw_radiograph(rng, frame, findings)
        out.append((Image.fromarray(pixels), boxes, findings))
    return out


def report(findings):
    """What a film shows, as a radiology report's findings line ('No abnormality.' if nothing)."""
    said = [f"{data.FINDINGS[k][1][0].upper()}{data.FINDINGS[k][1][1:]} in the {r}."
            for k, r in findings]
    return " ".join(said) or "No abnormality."


def image_task(rng, film):
    """(request, answer) about a film: seeing (the report, one region) or locating (a box)."""
    _, boxes, findings = film
    at = {r: k for k, r in findings}
    region = data.REGIONS[rng.integers(len(data.REGIONS))]
    if findings and rng.random() < 0.5:  # half the regions asked about are abnormal
        region = findings[rng.integers(len(findings))][1]
    task = rng.choice(["report", "region", "locate"], p=[0.3, 0.4, 0.3])
    if task == "report":
        return "Describe the findings.", report(findings)
    if task == "region":
        return f"Describe the {region}.", data.describe(region, None, at)
    return f"Locate the {region}.", data.format_box(boxes[region])


def reading(rng, index, one_statement):
    """A reading exercise, text only -> (question, reasoning, answer): the reasoning is a ThinkVG
    reasoning WITHOUT its boxes and tags, as a chain of thought ("... Answer: B"); the target is
    the answer only. one_statement: the chance that "Which region contains the X?" is reasoned
    with only the region that holds it (the curriculum's first step)."""
    qtype, variant, findings = data._header(rng, index)
    at = {r: k for k, r in findings}
    question, statements, answer = data.ask(rng, qtype, variant, findings,
                                            lambda r: data.describe(r, None, at))
    if question.startswith("Which region contains") and rng.random() < one_statement:
        statements = statements[:1]                           # the answer's region only
    order = rng.permutation(len(statements))
    return question, " ".join(statements[i] for i in order) + "\nAnswer:", " " + answer


def as_passage(question, reasoning, answer):
    """The same exercise as reading comprehension: the reasoning in the user's turn before the
    question, the answer as the whole reply -> (request, written: none, answer)."""
    return reasoning.removesuffix("\nAnswer:") + "\n" + question, "", answer.strip()


def reading_index(rng, single_share, multi_share):
    """The index of a reading exercise: its question type is index % 4 (data._header); the
    yes/no and open questions share what single and multi choice leave."""
    rest = (1 - single_share - multi_share) / 2
    kind = rng.choice(4, p=[rest, rest, single_share, multi_share])
    return 4 * int(rng.integers(10 ** 9)) + int(kind)


def lookup(rng, one_statement):
    """A letter lookup ("Which region contains the X?", four options, two regions described),
    drawn from the single-choice type until it comes: learnt after a long plateau."""
    while True:
        exercise = reading(rng, 4 * int(rng.integers(10 ** 9)) + 2, one_statement)
        if exercise[0].startswith("Which region contains"):
            return exercise


def chat_texts(processor, requests, with_image, written=None):
    """The chat prompts, as text: the base's system prompt, the request (after an image when
    with_image), the assistant's turn begun by `written` (a reasoning read, never a target)."""
    image = [{"type": "image"}] if with_image else []
    return [processor.apply_chat_template(
        [{"role": "system", "content": BASE_SYSTEM},
         {"role": "user", "content": image + [{"type": "text", "text": q}]}],
        add_generation_prompt=True, tokenize=False) + (written[i] if written else "")
        for i, q in enumerate(requests)]


def chat(processor, images, requests, answers, device, written=None):
    """chat_texts' prompts (a film each, or text only) and the answers -> (prompt BatchFeature,
    answer ids [B, T], mask [B, T]: the answer and its end of turn)."""
    texts = chat_texts(processor, requests, bool(images), written)
    prompt = processor(images=[[im] for im in images] if images else None, text=texts,
                       return_tensors="pt", padding=True).to(device)
    ids, mask = M.tokenize_completions(processor, answers,
                                       processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return prompt, ids.to(device), mask.to(device)


def answer_nll(model, batch):
    """Token-mean cross-entropy on the answer tokens and the end of turn."""
    prompt, ids, mask = batch
    return -(M.completion_logprobs(model, prompt, ids, mask) * mask).sum() / mask.sum()


# ----------------------------------------------------------------------------- the vision warm-up
def tower_targets(boxes, findings, grid, frame):
    """Targets of one film, one row per image token (a grid x grid raster): [regions covering
    the token (10) | which of those are abnormal (10) | findings there (6)] -> [grid*grid, 26]."""
    R, kinds = len(data.REGIONS), list(data.FINDINGS)
    cell, y = frame / grid, torch.zeros(grid * grid, 2 * R + len(kinds))
    for k, region in enumerate(data.REGIONS):
        x1, y1, x2, y2 = boxes[region]
        for t in range(grid * grid):
            cx0, cy0 = (t % grid) * cell, (t // grid) * cell
            wide = max(0, min(x2, cx0 + cell) - max(x1, cx0))
            overlap = wide * max(0, min(y2, cy0 + cell) - max(y1, cy0))
            if overlap > cell * cell / 4:
                y[t, k] = 1.0
                if region in findings:
                    y[t, R + k] = y[t, 2 * R + kinds.index(findings[region])] = 1.0
    return y


def patch_order(grid, m):
    """Qwen2.5-VL's tower (and pixel_values) groups patches by merge unit, m x m each, units in
    raster order: for each of its rows, the raster index of its patch (targets in tower order)."""
    pgrid, rows = grid * m, torch.empty(grid * grid * m * m, dtype=torch.long)
    for r in range(pgrid):
        for c in range(pgrid):
            rows[(r // m * grid + c // m) * m * m + (r % m) * m + c % m] = r * pgrid + c
    return rows


def warm_up_tower(model, processor, pool, cfg, device, frame=112, batch=32):
    """Teach the vision tower WHAT each film shows and WHERE before any text is involved. Every
    image token learns, through one linear head, the regions covering it and the film's report
    (which regions are abnormal, with what): a 4-layer decoder then reads a region's state in a
    few hundred steps, where sparse local features took thousands. Deep supervision (the block
    before the last says, per patch, which regions cover it and what is there) makes pooling a
    finding into every token fast to learn. The tower has no absolute position embedding (2-D
    rotary only), so naming a region is learned from the anatomy around each patch."""
    ip, tower, R = processor.image_processor, model.model.visual, len(data.REGIONS)
    m, grid = ip.merge_size, frame // (ip.patch_size * ip.merge_size)    # grid x grid image tokens
    pgrid, rows = grid * m, patch_order(grid, m)
    local, report_t = [], []
    for _, boxes, findings in pool:
        at = {r: k for k, r in findings}
        local.append(tower_targets(boxes, at, pgrid, frame)[rows])  # [pgrid*pgrid, 26] per patch
        t = tower_targets(boxes, at, grid, frame)  # [grid*grid, 26] per token
        t[:, R:] = t[:, R:].amax(0, keepdim=True)  # abnormal regions + findings: per film
        report_t.append(t)
    local, report_t = torch.stack(local).to(device), torch.stack(report_t).to(device)
    seen = {}
    hook = tower.blocks[-2].register_forward_hook(lambda mod, args, out: seen.update(h=out))
    heads = torch.nn.ModuleList([torch.nn.Linear(model.config.vision_config.hidden_size,
                                                 local.shape[-1]),
                                 torch.nn.Linear(model.config.text_config.hidden_size,
                                                 report_t.shape[-1])]).to(device)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=cfg.tower_lr)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    g = torch.Generator().manual_seed(cfg.seed)
    for step in tqdm(range(cfg.tower_steps), desc="vision warm-up"):
        for group in opt.param_groups:
            group["lr"] = cfg.tower_lr * run.cosine(step / cfg.tower_steps)
        idx = torch.randint(0, len(pool), (batch,), generator=g)
        pix = ip(images=[pool[i][0] for i in idx], return_tensors="pt").to(device)
        out = tower(pix["pixel_values"], grid_thw=pix["image_grid_thw"])
        # [B, grid*grid, D]
        feats = getattr(out, "pooler_output", out).reshape(batch, grid * grid, -1)
        patches = seen["h"].reshape(batch, pgrid * pgrid, -1)  # [B, pgrid*pgrid, width]
        # a region is abnormal on ~8% of films: positives weigh 3x
        three = torch.tensor(3.0, device=device)
        loss = bce(heads[0](patches), local[idx]) + bce(heads[1](feats), report_t[idx],
                                                          pos_weight=three)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    hook.remove()


# -------------------------------------------------------------------- the card: what the base knows
@torch.no_grad()
def card(model, processor, seed, n, device):
    """Held-out measurements (films and questions the base never trained on), each the share of
    samples whose whole answer the base writes greedily: seeing, locating, reading per template."""
    model.eval()
    rng, out = np.random.default_rng([seed, data.STREAMS["pretrain"], 10 ** 9 + 1]), {}
    held = draw_films(n, seed + 1, 0)  # another seed: unseen films

    def greedy(images, requests, budget, written=None):
        texts = chat_texts(processor, requests, bool(images), written)
        answers = []
        for i in range(0, len(texts), 100):
            prompt = processor(images=[[im] for im in images[i:i + 100]] if images else None,
                               text=texts[i:i + 100], return_tensors="pt", padding=True).to(device)
            answers += M.decode(model, processor, prompt, max_new_tokens=budget,
                                greedy=True)["texts"]
        return answers
    images = [f[0] for f in held]
    said = greedy(images, ["Describe the findings."] * n, 60)
    out["report exact"] = float(np.mean([s.strip() == report(f[2]) for s, f in zip(said, held)]))
    regions = [data.REGIONS[i % 10] for i in range(n)]
    said = greedy(images, [f"Describe the {r}." for r in regions], 40)
    out["region described exactly"] = float(np.mean([
        s.strip() == data.describe(r, None, {q: k for k, q in f[2]})
        for s, r, f in zip(said, regions, held)]))
    said = greedy(images, [f"Locate the {r}." for r in regions], 24)
    ious = [reward.iou(reward.parse(f"<think>x {s}</think>").boxes[0][1], f[1][r])
            if reward.parse(f"<think>x {s}</think>").boxes else 0.0
            for s, r, f in zip(said, regions, held)]
    out["box IoU"] = float(np.mean(ious))
    out["box IoU > 0.75"] = float(np.mean([v > 0.75 for v in ious]))
    # Zero-shot on the ThinkVG prompt (the task's system prompt, a film, a question): the base has
    # never seen a trace, so it should not write one (expected ~0; stage 1 teaches the format).
    questions = [reading(rng, i, 0.0)[0] for i in range(n)]
    prompt = M.build_prompts(processor, images, questions)
    said = M.decode(model, processor, prompt.to(device), max_new_tokens=64, greedy=True)["texts"]
    out["ThinkVG format, zero-shot"] = float(np.mean([reward.parse(s).well_formed for s in said]))
    templates = {}
    for i in range(4 * n):
        q, r, a = reading(rng, i, 0.0)
        templates.setdefault(_template(q), []).append((q, r, a))
    for name, qra in sorted(templates.items()):
        for where, exercises in (("its own reasoning", qra),
                                 ("in the prompt", [as_passage(*x) for x in qra])):
            said = greedy([], [q for q, _, _ in exercises], 12, [r for _, r, _ in exercises])
            out[f"reading {where}: {name}"] = float(np.mean([
                s.strip() == a.strip() for s, (_, _, a) in zip(said, exercises)]))
    model.train()
    return out


def _template(question):
    """A reading exercise's template, named by the question's first words."""
    q = question
    for name in ("Which region contains", "What abnormality is seen", "Which of these regions",
                 "Where is the", "Is the cardiac silhouette", "Is there"):
        if q.startswith(name):
            return name + (" (options)" if name == "What abnormality is seen" and " A. " in q
                           else "")
    return "other"


# ----------------------------------------------------------------------------- main
def main(cfg):
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device, t0 = torch.device("cpu"), time.time()
    made = run.provenance()             # the commit it starts from, before anything is committed
    model, processor = build(cfg.seed)
    model.train()
    print(f"tiny Qwen2.5-VL: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(processor.tokenizer)} tokens; drawing {cfg.films:,} films")
    pool = draw_films(cfg.films, cfg.seed)
    warm_up_tower(model, processor, pool, cfg, device)
    groups = [{"params": [p for n, p in model.named_parameters() if (".visual." in f".{n}") == v],
               "lr_scale": 0.1 if v else 1.0} for v in (True, False)]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    rng, log = np.random.default_rng([cfg.seed, data.STREAMS["pretrain"], 10 ** 9 + 2]), []
    bar = tqdm(range(cfg.steps), desc="pretrain")
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * run.cosine(step / cfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        if step % 2 == 0:  # films: seeing and locating
            picked = [pool[i] for i in rng.integers(0, len(pool), cfg.batch_size)]
            qa = [image_task(rng, f) for f in picked]
            batch = chat(processor, [f[0] for f in picked], [q for q, _ in qa], [a for _, a in qa],
                         device)
        else:  # text: reading, with the curriculum
            # the curriculum: one region named in every lookup for the first half of it, then
            # linearly fewer, then two regions always
            one = min(1.0, max(0.0, 2.0 - 2.0 * step / max(1.0, cfg.curriculum * cfg.steps)))
            qra = [lookup(rng, one) if rng.random() < cfg.lookup_share else
                   reading(rng, reading_index(rng, cfg.single_share, cfg.multi_share), one)
                   for _ in range(cfg.batch_size)]
            qra = [as_passage(*x) if rng.random() < cfg.in_prompt else x for x in qra]
            batch = chat(processor, [], [q for q, _, _ in qra], [a for _, _, a in qra], device,
                         [r for _, r, _ in qra])
        loss = answer_nll(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.append(loss.item())
        if step % 100 == 99:
            bar.set_postfix(films=f"{np.mean(log[-100::2]):.3f}",
                            text=f"{np.mean(log[-99::2]):.3f}")
    minutes = (time.time() - t0) / 60
    measured = card(model, processor, cfg.seed, cfg.eval_n, device)
    for k, v in measured.items():
        print(f"  {k:<48} {v:.3f}")
    run.save(model, processor, cfg.out)
    record = {"config": asdict(cfg), "minutes": round(minutes, 1), "card": measured, "made": made,
              "parameters": f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"}
    json.dump(record, open(os.path.join(cfg.out, "pretrain.json"), "w"), indent=2)
    write_card(cfg.out, record)
    print(f"wrote {cfg.out} after {minutes:.1f} min")


def write_card(out, record):
    """The base's README: how it was made and what it knows (its held-out card)."""
    measured, made = record["card"], record["made"]
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in measured.items())
    open(os.path.join(out, "README.md"), "w").write(f"""# {BASE}: the tiny pretrained base

A Qwen2.5-VL (transformers' `Qwen2_5_VLForConditionalGeneration`, the real architecture) at
{record.get("parameters", "~1.8M")} parameters, pretrained by `python pretrain.py` as a VLM is
pretrained: it sees (describes a chest film and each region of it), writes a region's box when asked
(absolute pixels), and reads (answers a question from a written reasoning, the option-letter lookup
included). It has never seen a ThinkVG trace nor an image of the train, validation or test
splits. `python sft.py` starts from it, as `--model Qwen/Qwen2.5-VL-3B-Instruct` starts from
the real one. Load it like any checkpoint: `model.load("{BASE}")` or `from_pretrained`.

Made by `python pretrain.py` at commit {made["commit"]} on {made["machine"]} ({made["threads"]}
threads), {made["date"]}, in {record["minutes"]} minutes.

What it knows, held out (new films and questions, greedy, the whole answer exact unless said):

| measurement | value |
| --- | --- |
{rows}

"reading ...: X" is the share of reading exercises of template X answered right from a written
reasoning, given in the prompt or written in the assistant's own turn; "Which region contains"
describes two regions and has four lettered options.
""")


if __name__ == "__main__":
    main(run.parse_config(PretrainConfig, __doc__))
