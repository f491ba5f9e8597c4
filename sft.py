"""sft.py -- Stage 1: supervised fine-tuning on ThinkVG traces (the cold start).

The model learns to produce `<think>... region [x1, y1, x2, y2] ...</think><answer>...</answer>`
by teacher forcing: cross-entropy on the response tokens only (the system prompt, question and
image tokens are context, never targets), AdamW with linear warm-up and cosine decay.

The regime is the cold start (DeepSeek-R1's recipe, and the GEMeX-ThinkVG paper's "one eighth"):
reasoning traces are scarce, labelled questions are many. By default this stage sees the traces
of ONE EIGHTH of the training images (--train-size 1000 of 8000); grpo.py then practises on all
8000 questions, scored against their labels. `--train-size 8000 --max-steps 1500` is the upper
bound: a trace for every image. The tiny model, trained from scratch, first warms up twice (real
checkpoints skip both): its vision tower learns what each film shows and where (stage 0,
warm_up_tower), then its decoder learns to read an answer off a written reasoning, text only
(stage 0b, warm_up_reading: beyond the paper, `--reading-steps 0` turns it off).

    python sft.py                          # tiny model, synthetic data, CPU: see README for timings
    python sft.py --train-size 8000 --max-steps 1500 --out runs/sft_all   # every trace: the upper bound
    python sft.py --model runs/sft --max-steps 2900 --lr 5e-4 --warmup-steps 50 --out runs/sft_more
                                           # the control: GRPO's minutes spent on more SFT instead
    python sft.py --model Qwen/Qwen2.5-VL-3B-Instruct --device cuda --batch-size 4 --lr 1e-5 \
        --data gemex --data-path train.parquet --image-root mimic-cxr-jpg/files --dtype bfloat16
    torchrun --nproc_per_node=2 sft.py     # DistributedDataParallel: one process per GPU (gloo on CPU)

Writes to --out: metrics.jsonl (one JSON object per log line), run_config.json (this run's
flags; config.json is the model's, written by save_pretrained) and the final model + processor,
loadable with `model.load(OUT)` or plain `from_pretrained(OUT)`.
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import data
import evaluate
import model as M
import reward
import run

# ----------------------------------------------------------------------------- config
COLD_START_TRACES = 1000   # the default: the traces of one eighth of the 8,000 synthetic training images

# Inherited flags: --data, --data-path, --image-root (data.DataFlags) and --dtype, --max-pixels,
# --freeze-vision, --grad-checkpointing, --lora-* (model.MemoryFlags).
@dataclass
class SFTConfig(run.MemoryFlags, data.DataFlags):
    model: str = "tiny"          # 'tiny' (built offline) or a Qwen2(.5)-VL Hub id / checkpoint directory
    out: str = "runs/sft"        # output directory for metrics, config and the final checkpoint
    max_steps: int = 1000        # optimizer steps: 16 epochs of the 1000 default traces
    batch_size: int = 16         # samples per forward/backward
    grad_accum: int = 1          # forward/backwards per optimizer step: a batch of grad_accum x batch_size on a small card
    lr: float = 2e-3             # peak learning rate (tiny model from scratch; ~1e-5 for a pretrained 3B)
    vision_lr_scale: float = 0.1 # the vision tower's lr is lr times this (at the full lr it forgets what it sees)
    warmup_steps: int = 100      # linear warm-up steps before cosine decay to 10% of lr
    weight_decay: float = 0.01   # AdamW decoupled weight decay
    grad_clip: float = 1.0       # clip the global gradient norm to this
    train_size: int = 0          # training traces (0: 1000 of the 8000 synthetic images, one eighth: the cold start; every usable --data gemex row)
    eval_every: int = 250        # greedy validation every this many steps (0: only at the end)
    eval_n: int = 64             # validation samples per evaluation
    seed: int = 0                # seed for init, data order and sampling
    device: str = "auto"         # 'auto' (CUDA if available), 'cpu' or 'cuda'
    save_every: int = 500        # write a resumable checkpoint to OUT/checkpoints every this many steps (0: never)
    keep: int = 2                # how many periodic checkpoints to keep
    resume: bool = False         # continue from the newest checkpoint in --out (same flags otherwise)
    max_bad_steps: int = 3       # stop after this many non-finite losses/gradients in a row (each update is skipped)
    tower_steps: int = 800       # vision warm-up steps before SFT (tiny model, synthetic data only; 0: none): warm_up_tower
    tower_lr: float = 3e-3       # peak learning rate of the vision warm-up (cosine decay to 10%)
    reading_steps: int = 500     # text-only reading warm-up steps before SFT (tiny model, synthetic data only; 0: none): warm_up_reading
    trace: str = "thinkvg"       # targets: 'thinkvg' (grounded reasoning, then the answer) or 'answer' (the answer alone)


def check(cfg):
    """Flag values that cannot work, named, before anything is loaded."""
    for ok, msg in ((cfg.max_steps >= 1 and cfg.batch_size >= 1 and cfg.grad_accum >= 1,
                     "--max-steps, --batch-size and --grad-accum must be >= 1"),
                    (cfg.lr > 0 and cfg.vision_lr_scale >= 0, "--lr must be > 0 and --vision-lr-scale >= 0"),
                    (cfg.warmup_steps >= 0 and cfg.weight_decay >= 0 and cfg.grad_clip > 0,
                     "--warmup-steps and --weight-decay must be >= 0, --grad-clip > 0"),
                    (0 <= cfg.train_size and (cfg.data != "synthetic" or cfg.train_size <= data.DataConfig.n_train),
                     f"--train-size must be in 0..{data.DataConfig.n_train}"),
                    (cfg.trace in ("thinkvg", "answer"), "--trace must be thinkvg or answer"),
                    (cfg.tower_steps >= 0 and cfg.tower_lr > 0, "--tower-steps must be >= 0 and --tower-lr > 0"),
                    (cfg.reading_steps >= 0, "--reading-steps must be >= 0"),
                    *data.DataFlags.problems(cfg), *run.MemoryFlags.problems(cfg),
                    (cfg.batch_size * cfg.grad_accum <= (cfg.train_size or COLD_START_TRACES),
                     "--batch-size x --grad-accum must not exceed --train-size"),
                    (cfg.eval_every >= 0 and 1 <= cfg.eval_n and (cfg.data != "synthetic" or cfg.eval_n <= data.DataConfig.n_val),
                     f"--eval-every must be >= 0 and --eval-n in 1..{data.DataConfig.n_val}"),
                    (cfg.save_every >= 0 and cfg.keep >= 1 and cfg.max_bad_steps >= 1,
                     "--save-every must be >= 0, --keep and --max-bad-steps >= 1")):
        if not ok:
            raise SystemExit(f"sft.py: {msg}")


# ----------------------------------------------------------------------------- helpers
def cosine(progress):
    """The decay factor at `progress` in [0, 1]: from 1 down to 0.1 along half a cosine."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def lr_at(step, cfg):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * cosine((step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))


def batch_order(lengths, batch_size, seed, group=16):
    """One epoch of batches (lists of row indices), shuffled but length-grouped: take `group`
    batches' worth of random rows, sort them by length, cut into batches, shuffle the batches.
    Multi-choice traces are twice the mean length, so random batches are ~1/3 padding; grouped
    ones are nearly dense, which buys ~1.4x more samples per CPU-minute."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    batches = []
    for i in range(0, len(perm) - batch_size + 1, batch_size * group):
        chunk = sorted(perm[i: i + batch_size * group], key=lambda j: lengths[j])
        batches += [chunk[k: k + batch_size] for k in range(0, len(chunk) - batch_size + 1, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def param_groups(model, cfg):
    """{vision tower, language model} x {matrices: weight decay, vectors: none}, each with an
    `lr_scale`. The vision tower learns 10x slower: at the full lr a from-scratch ViT's features
    churn faster than the decoder learns to read them, and the decoder settles for answering from
    the text alone (measured: closed questions at chance; on a cardiomegaly-only task, chance with
    the full lr but 0.9 accuracy in 400 steps with the tower frozen or the lr 4x lower)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:          # --freeze-vision: no optimizer state for frozen weights
            continue
        vision = ".visual." in f".{name}"
        groups.setdefault((vision, p.dim() >= 2), {
            "params": [], "lr_scale": cfg.vision_lr_scale if vision else 1.0,
            "weight_decay": cfg.weight_decay if p.dim() >= 2 else 0.0})["params"].append(p)
    return list(groups.values())


def tower_targets(boxes, findings, grid, frame):
    """Targets of one image for the vision warm-up, one row per image token (a grid x grid raster):
    [regions covering the token (10) | which of those are abnormal (10) | findings there (6)] -> [grid*grid, 26]."""
    R, kinds = len(data.REGIONS), list(data.FINDINGS)
    cell, y = frame / grid, torch.zeros(grid * grid, 2 * R + len(kinds))
    for k, region in enumerate(data.REGIONS):
        x1, y1, x2, y2 = boxes[region]
        for t in range(grid * grid):
            cx0, cy0 = (t % grid) * cell, (t // grid) * cell
            overlap = max(0, min(x2, cx0 + cell) - max(x1, cx0)) * max(0, min(y2, cy0 + cell) - max(y1, cy0))
            if overlap > cell * cell / 4:
                y[t, k] = 1.0
                if region in findings:
                    y[t, R + k] = y[t, 2 * R + kinds.index(findings[region])] = 1.0
    return y


def patch_order(grid, m):
    """Inside Qwen2.5-VL's tower (and in the processor's pixel_values) patches are grouped by merge
    unit, m x m patches each, the units in raster order. Returns, for each of those rows, the
    raster index (row * grid*m + column) of its patch, so raster targets can be put in tower order."""
    pgrid, rows = grid * m, torch.empty(grid * grid * m * m, dtype=torch.long)
    for r in range(pgrid):
        for c in range(pgrid):
            rows[(r // m * grid + c // m) * m * m + (r % m) * m + c % m] = r * pgrid + c
    return rows


def warm_up_tower(model, processor, cfg, device, frame, batch=32):
    """Stage 0 for the from-scratch tiny model: teach the vision tower WHAT each image shows and
    WHERE, before any text is involved (real VLMs pretrain their tower the same way).

    What the decoder can read decides the targets. Given per-token features that say "a finding
    here" (sparse, local), a 4-layer decoder learns only slowly to route from a region's name to
    that region's tokens; given a per-image REPORT in every image token (which regions are
    abnormal, which findings are on the film), it learns the task in a few hundred steps
    (README, "Stage 0"). So every image token is trained to carry the regions that cover it
    (for the boxes) + the report (for the answers), through one linear head shared by all
    tokens. A report is global: the tower must pool from a finding's patches into every token,
    and it learns that pooling much faster with deep supervision: the block before the last
    must already say, per 14-px patch, which regions cover it and whether (and with what) it
    is abnormal; the last block then only has to spread it.
    Qwen2.5-VL's tower has no absolute position embedding (2-D rotary only, relative), so
    naming a region is learned from the anatomy around each patch.
    Real checkpoints skip this: their towers were pretrained on billions of images.
    """
    ip, tower, R = processor.image_processor, model.model.visual, len(data.REGIONS)
    m, grid = ip.merge_size, frame // (ip.patch_size * ip.merge_size)    # grid x grid image tokens
    pgrid = grid * m                                                    # pgrid x pgrid patches
    assert model.config.vision_config.window_size >= frame, "warm_up_tower assumes one attention window"
    rows = patch_order(grid, m)
    images, local, report, n_images = [], [], [], min(3000, cfg.tower_steps * batch)   # 3,000 images: ~8 s to draw
    for im, boxes, findings in data.tower_samples(n_images, cfg.seed, frame):
        images.append(im)
        local.append(tower_targets(boxes, findings, pgrid, frame)[rows])  # [pgrid*pgrid, 26] per patch
        t = tower_targets(boxes, findings, grid, frame)                   # [grid*grid, 26] per token
        t[:, R:] = t[:, R:].amax(0, keepdim=True)                         # abnormal regions + findings: per image
        report.append(t)
    local, report = torch.stack(local).to(device), torch.stack(report).to(device)
    seen = {}
    hook = tower.blocks[-2].register_forward_hook(lambda mod, args, out: seen.update(h=out))
    width = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleList([torch.nn.Linear(width, local.shape[-1]),     # on the patches of blocks[-2]
                                 torch.nn.Linear(model.config.text_config.hidden_size, report.shape[-1])]).to(device)
    opt = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=cfg.tower_lr)
    bce, g = torch.nn.functional.binary_cross_entropy_with_logits, torch.Generator().manual_seed(cfg.seed)
    pos_weight = torch.tensor(3.0, device=device)
    for step in tqdm(range(cfg.tower_steps), desc="vision warm-up"):
        for group in opt.param_groups:
            group["lr"] = cfg.tower_lr * cosine(step / cfg.tower_steps)
        idx = torch.randint(0, n_images, (batch,), generator=g)
        pix = ip(images=[images[i] for i in idx], return_tensors="pt").to(device)
        out = tower(pix["pixel_values"], grid_thw=pix["image_grid_thw"])
        feats = getattr(out, "pooler_output", out).reshape(batch, grid * grid, -1)    # [B, grid*grid, D]
        patches = seen["h"].reshape(batch, pgrid * pgrid, -1)                         # [B, pgrid*pgrid, width]
        # a region is abnormal on ~8% of films: weighting positives 3x made the report exact on
        # 0.73 of fresh films instead of 0.69 (README, stage 0)
        loss = bce(heads[0](patches), local[idx]) + bce(heads[1](feats), report[idx], pos_weight=pos_weight)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    hook.remove()
    found = (heads[1](feats)[..., R:2 * R].mean(1) > 0) == (report[idx, 0, R:2 * R] > 0)     # [B, R]
    print(f"vision warm-up: {cfg.tower_steps} steps, loss {loss.item():.3f}, "
          f"images whose abnormal regions the report names exactly {found.all(-1).float().mean():.2f} (last batch)")


# ----------------------------------------------------------------------------- beyond the paper: reading
def reading_batch(processor, rows, end_id, device):
    """(question, response) text pairs, no image -> ids [B, P+T] (left-padded chat prompt, then the
    response and its end token), attention [B, P+T], and a mask [B, T] over the completion that
    is 1 on exactly the answer: what follows <answer>, its </answer> and the end-of-turn token."""
    tok = processor.tokenizer
    prompts = [processor.apply_chat_template([{"role": "system", "content": M.SYSTEM_PROMPT},
               {"role": "user", "content": [{"type": "text", "text": q}]}], add_generation_prompt=True, tokenize=False)
               for q, _ in rows]
    p = processor(text=prompts, return_tensors="pt", padding=True)                  # [B, P]
    cut = [r.rindex("<answer>") + len("<answer>") for _, r in rows]                  # the reasoning | the answer
    parts = [(tok(r[:k], add_special_tokens=False)["input_ids"], tok(r[k:], add_special_tokens=False)["input_ids"] + [end_id])
             for (_, r), k in zip(rows, cut)]
    T = max(len(a) + len(b) for a, b in parts)
    ids, valid, answer = torch.full((len(rows), T), tok.pad_token_id), torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T)
    for i, (a, b) in enumerate(parts):
        ids[i, :len(a) + len(b)], valid[i, :len(a) + len(b)], answer[i, len(a):len(a) + len(b)] = torch.tensor(a + b), 1, 1
    return (torch.cat([p["input_ids"], ids], 1).to(device), torch.cat([p["attention_mask"], valid], 1).to(device),
            answer.to(device))


def warm_up_reading(model, processor, cfg, device, frame, batch=32):
    """Stage 0b for the from-scratch tiny model (--reading-steps): teach the decoder to READ a
    reasoning before it sees any trace. Given a question, its options and a written reasoning,
    write the answer that reasoning implies (single choice: find the option it names, write that
    option's letter). Text only, no image, loss on the answer tokens only, fresh samples from a
    stream of their own (data.reading_samples): nothing here says what a film shows or where.
    Why: after SFT on 1,000 traces the reasoning names the right option on ~3/4 of single-choice
    questions but the letter after it is right at chance (NOTES.md): 250 single-choice traces
    are memorised, not read, and one reward per sampled letter does not teach the lookup either.
    Measured over three seeds: the whole pipeline's accuracy +0.115 (README, "Results").
    A pretrained LLM reads already; real checkpoints skip this."""
    end_id = M.end_ids(model)[0]
    texts = list(data.reading_samples(min(8000, cfg.reading_steps * batch) + 256, cfg.seed, frame))
    def answer_logits(ids, attention, T):                                                # [B, T, V]
        return model(input_ids=ids, attention_mask=attention, mm_token_type_ids=torch.zeros_like(ids),
                     logits_to_keep=T + 1, use_cache=False).logits[:, :-1].float()
    params = [p for n, p in model.named_parameters() if ".visual." not in f".{n}" and p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    g, train = torch.Generator().manual_seed(cfg.seed), texts[:-256]
    for step in tqdm(range(cfg.reading_steps), desc="reading warm-up"):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 50) * cosine(step / cfg.reading_steps)
        ids, attention, ans = reading_batch(processor, [train[i] for i in torch.randint(0, len(train), (batch,), generator=g)], end_id, device)
        logits = answer_logits(ids, attention, ans.shape[1])
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, -ans.shape[1]:], reduction="none")  # [B, T]
        loss = (nll * ans).sum() / ans.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():                   # held out: every answer token the argmax, given the reasoning
        ids, attention, ans = reading_batch(processor, texts[-256:], end_id, device)
        wrong = ((answer_logits(ids, attention, ans.shape[1]).argmax(-1) != ids[:, -ans.shape[1]:]) & (ans > 0)).any(1)
    print(f"reading warm-up: {cfg.reading_steps} steps, loss {loss.item():.3f}, "
          f"held-out answers read right {1 - wrong.float().mean():.2f}")


def sft_batch(processor, rows, end_id, device):
    """Rows (a dict of lists from datasets) -> prompt BatchFeature, target ids [B, T], mask [B, T].
    The mask is 1 on exactly the response tokens and the end-of-turn token after them."""
    prompt = M.build_prompts(processor, rows["image"], rows["question"]).to(device)
    ids, mask = M.tokenize_completions(processor, rows["response"], end_id)
    return prompt, ids.to(device), mask.to(device)


def token_mean_backward(net, batches, amp=torch.float32):
    """Backward of the token-mean cross-entropy over ALL `batches` (gradient accumulation): each
    batch adds its share, -sum(log p) / (response tokens of all the batches), so the gradient is
    the one a single batch of all those rows would give. Returns the loss (a float)."""
    n_tokens = sum(float(mask.sum()) for _, _, mask in batches)
    loss = 0.0
    for j, (prompt, ids, mask) in enumerate(batches):
        if isinstance(net, torch.nn.parallel.DistributedDataParallel):   # all-reduce once, after the last
            net.require_backward_grad_sync = j == len(batches) - 1
        with torch.autocast(ids.device.type, dtype=amp, enabled=amp != torch.float32):
            logp = M.completion_logprobs(net, prompt, ids, mask)          # [B, T]
        part = -(logp * mask).sum() / n_tokens
        part.backward()
        loss += part.item()
    return loss


# ----------------------------------------------------------------------------- main
def main(cfg):
    check(cfg)
    device, amp = run.pick_device(cfg.device)
    rank, world, device = run.ddp_init(device)                      # (0, 1, device) without torchrun
    master = rank == 0
    print(f"device {device}, autocast {amp}" + (f", rank {rank} of {world}" if world > 1 else ""))
    torch.manual_seed(cfg.seed)
    ckpt, state = run.open_run(cfg.out, cfg.resume)
    if master:
        json.dump(asdict(cfg), open(os.path.join(cfg.out, "run_config.json"), "w"), indent=2)
    # LoRA resumes from the frozen base + the adapters in the checkpoint's state (bit-exact);
    # full fine-tuning from the checkpoint's weights
    model, processor = M.load(cfg.model if cfg.lora_r else ckpt or cfg.model, device, run.weights_dtype(cfg.dtype), seed=cfg.seed)
    run.apply_memory_plan(model, processor, cfg)
    run.warn_tiny_lr("sft.py", cfg.lr, SFTConfig.lr, model)
    if state and cfg.lora_r:
        run.load_adapters(model, state["adapters"])
    model.train()
    frame = M.image_frame(processor, data.GEMEX_FRAME)           # gemex boxes move 224 -> the frame the model sees
    scratch = not ckpt and not cfg.lora_r and cfg.model == "tiny" and cfg.data == "synthetic"
    if scratch and cfg.tower_steps:
        warm_up_tower(model, processor, cfg, device, frame)      # stage 0; a real checkpoint's tower is pretrained
    if scratch and cfg.reading_steps:
        warm_up_reading(model, processor, cfg, device, frame)    # stage 0b, beyond the paper: the decoder learns to read
    if not scratch and not ckpt and (cfg.tower_steps or cfg.reading_steps):
        print("vision warm-up skipped, and the reading warm-up: both are for --model tiny on --data synthetic")
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model   # forward/backward go through net
    end_id = M.end_ids(model)[0]
    train = data.load("train", cfg.train_size or (COLD_START_TRACES if cfg.data == "synthetic" else None), cfg, frame)
    val = data.load("validation", cfg.eval_n, cfg, frame)[:]
    if not val["question"]:
        print("sft.py: no validation rows: in-training validation skipped (evaluate.py --split picks another)")
    budget = M.completion_budget(processor, train["response"])       # validation decodes whole traces
    if len(train) < cfg.batch_size * cfg.grad_accum:   # a small real file
        raise SystemExit(f"sft.py: {len(train)} training rows, fewer than --batch-size x --grad-accum "
                         f"({cfg.batch_size} x {cfg.grad_accum})")
    if cfg.trace == "answer":   # the no-reasoning baseline: the same samples, the target cut to <answer>...</answer>
        train = train.map(lambda r: {"response": f"<answer>{reward.parse(r).answer}</answer>"}, input_columns="response")
    print(f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters; {len(train)} training samples")

    opt = run.adamw(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.95))
    lengths = [len(q) + len(r) for q, r in zip(train["question"], train["response"])]  # characters: a proxy
    start, epoch, order, bad = 0, 0, [], 0
    if state:   # everything the next step depends on: weights (loaded above), optimizer, data position, RNG
        opt.load_state_dict(state["optimizer"])
        start, epoch, order = state["step"], state["epoch"], state["order"]
        run.set_rng_state(state["rng"])
    log = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if master else None
    stop = run.StopOnCtrlC()
    bar, t0 = tqdm(range(start, cfg.max_steps), desc="sft", initial=start, total=cfg.max_steps, disable=not master), time.time()
    for step in bar:
        # ---- data: length-grouped batches from a seeded shuffle, a new one each epoch; every rank
        # holds the same order and takes its own grad_accum batches of the world x grad_accum popped
        if len(order) < world * cfg.grad_accum:
            order, epoch = batch_order(lengths, cfg.batch_size, cfg.seed + epoch), epoch + 1
        popped = [order.pop() for _ in range(world * cfg.grad_accum)]
        batches = [sft_batch(processor, train[b], end_id, device) for b in popped[rank::world]]

        # ---- the algorithm: token-mean cross-entropy on response tokens only
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        loss = token_mean_backward(net, batches, amp)   # under DDP this also averages the gradients over ranks
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        loss = run.ddp_mean(loss)          # a float, the mean over ranks (so all ranks agree on skipping)
        finite = math.isfinite(loss) and bool(torch.isfinite(grad_norm))
        if finite:                       # a NaN/inf update would poison every weight: skip it
            opt.step()
        opt.zero_grad(set_to_none=True)
        bad = 0 if finite else bad + 1

        # ---- logging (rank 0)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        rec = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
               "skipped": int(not finite), "elapsed_s": round(time.time() - t0, 1)}
        last = step + 1 == cfg.max_steps
        if master and val["question"] and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
            means, example = evaluate.greedy_means(model, processor, val, budget)
            rec.update({f"val_{k}": v for k, v in means.items()})
            tqdm.write(f"step {step + 1}: loss {loss:.3f} | val " +
                       " ".join(f"{k} {v:.2f}" for k, v in means.items()) + f"\n  e.g. {example[:160]}")
        if master:
            log.write(json.dumps(rec) + "\n")
            log.flush()

        # ---- checkpoints: periodic and on Ctrl-C; stop on repeated non-finite updates
        if run.after_step("sft.py", cfg, step + 1, bad, stop, model, processor, lambda: {
                "optimizer": opt.state_dict(), "epoch": epoch, "order": order, "rng": run.rng_state(),
                "adapters": run.adapter_state(model)}):
            return

    run.ddp_check_in_sync(model)
    if master:
        run.save(model, processor, cfg.out, into=True)
        print(f"saved {cfg.out} after {time.time() - t0:.0f} s{run.peak_memory(device)}")


if __name__ == "__main__":
    main(run.parse_config(SFTConfig, __doc__))
