"""sft.py -- Stage 1: supervised fine-tuning on ThinkVG traces (the cold start).

The model learns to produce `<think>... region [x1, y1, x2, y2] ...</think><answer>...</answer>`
by teacher forcing: cross-entropy on the response tokens and the end-of-turn token after them
(the system prompt, question and image tokens are context, never targets), AdamW with linear
warm-up and cosine decay. Only the language model learns: the vision tower stays the base's, as
real VLM recipes often keep their ViT, because at this stage's rate a trained tower forgets what
the base sees (NOTES.md; `--freeze-vision false` trains it too).

It starts from a pretrained model, as every real run does: by default the tiny base shipped in
this repository (tiny-qwen2.5-vl-cxr, made by pretrain.py: it sees, reads, writes a region's box
when asked, and has never seen a trace), or a real Qwen2.5-VL with --model. The regime is the
cold start (DeepSeek-R1's recipe, and the GEMeX-ThinkVG paper's "one eighth"): reasoning traces
are scarce, labelled questions are many. This stage sees the traces of ONE EIGHTH of the
training images (--train-size 1000 of 8000); grpo.py then practises on all 8000 questions,
scored against their labels. `--train-size 8000` is the upper bound: a trace for every image.

    python sft.py                          # the tiny base, synthetic data, CPU (README: timings)
    python sft.py --train-size 8000 --out runs/sft_all     # every trace: the upper bound
    python sft.py --model runs/sft --max-steps 3800 --lr 5e-4 --warmup-steps 50 --out runs/sft_more
                                           # the control: GRPO's minutes spent on more SFT instead
    python sft.py --model Qwen/Qwen2.5-VL-3B-Instruct --device cuda --batch-size 4 --lr 1e-5 \
        --data gemex --data-path train.parquet --image-root mimic-cxr-jpg/files --dtype bfloat16
    torchrun --nproc_per_node=2 sft.py     # DistributedDataParallel: a process per GPU (CPU: gloo)

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
import memory
import model as M
import reward
import run

# ----------------------------------------------------------------------------- config
# the default: the traces of one eighth of the 8,000 synthetic training images
COLD_START_TRACES = 1000

# Inherited flags: --data, --data-path, --image-root (data.DataFlags) and --dtype, --max-pixels,
# --grad-checkpointing, --lora-* (memory.MemoryFlags), whose --freeze-vision is re-declared below.
@dataclass
class SFTConfig(memory.MemoryFlags, data.DataFlags):
    model: str = "tiny-qwen2.5-vl-cxr"  # the pretrained model: the tiny base, a Hub id or a folder
    freeze_vision: bool = True   # keep the base's vision tower: only the language model learns
    out: str = "runs/sft"        # output directory for metrics, config and the final checkpoint
    max_steps: int = 800         # optimizer steps: ~13 epochs of the 1000 default traces
    batch_size: int = 16         # samples per forward/backward
    grad_accum: int = 1          # forward/backwards per optimizer step (batch = grad_accum x size)
    lr: float = 2e-3             # peak learning rate (the tiny base; a 3B: ~1e-5, LoRA ~1e-4)
    warmup_steps: int = 100      # linear warm-up steps before cosine decay to 10% of lr
    weight_decay: float = 0.01   # AdamW decoupled weight decay
    grad_clip: float = 1.0       # clip the global gradient norm to this
    train_size: int = 0          # training traces (0: 1000 synthetic, the cold start; all of gemex)
    eval_every: int = 250        # greedy validation every this many steps (0: only at the end)
    eval_n: int = 64             # validation samples per evaluation
    seed: int = 0                # seed for the data order (and LoRA's init)
    device: str = "auto"         # 'auto' (CUDA if available), 'cpu' or 'cuda'
    save_every: int = 500        # steps between resumable checkpoints in OUT/checkpoints (0: never)
    keep: int = 2                # how many periodic checkpoints to keep
    resume: bool = False  # continue from the newest checkpoint in --out (same flags otherwise)
    max_bad_steps: int = 3       # stop after this many non-finite losses in a row (each is skipped)
    trace: str = "thinkvg"       # targets: 'thinkvg' (grounded reasoning, then answer) or 'answer'


def check(cfg):
    """Flag values that cannot work, named, before anything is loaded."""
    for ok, msg in ((cfg.max_steps >= 1 and cfg.batch_size >= 1 and cfg.grad_accum >= 1,
                     "--max-steps, --batch-size and --grad-accum must be >= 1"),
                    (cfg.lr > 0, "--lr must be > 0"),
                    (cfg.warmup_steps >= 0 and cfg.weight_decay >= 0 and cfg.grad_clip > 0,
                     "--warmup-steps and --weight-decay must be >= 0, --grad-clip > 0"),
                    (0 <= cfg.train_size
                     and (cfg.data != "synthetic" or cfg.train_size <= data.DataConfig.n_train),
                     f"--train-size must be in 0..{data.DataConfig.n_train}"),
                    (cfg.trace in ("thinkvg", "answer"), "--trace must be thinkvg or answer"),
                    *data.DataFlags.problems(cfg), *memory.MemoryFlags.problems(cfg),
                    (cfg.data != "synthetic"   # a real file's length is checked once loaded
                     or cfg.batch_size * cfg.grad_accum <= (cfg.train_size or COLD_START_TRACES),
                     "--batch-size x --grad-accum must not exceed --train-size"),
                    (cfg.eval_every >= 0 and 1 <= cfg.eval_n
                     and (cfg.data != "synthetic" or cfg.eval_n <= data.DataConfig.n_val),
                     f"--eval-every must be >= 0 and --eval-n in 1..{data.DataConfig.n_val}"),
                    (cfg.save_every >= 0 and cfg.keep >= 1 and cfg.max_bad_steps >= 1,
                     "--save-every must be >= 0, --keep and --max-bad-steps >= 1")):
        if not ok:
            raise SystemExit(f"sft.py: {msg}")


# ----------------------------------------------------------------------------- helpers
def lr_at(step, cfg):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * run.cosine((step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))


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
        batches += [chunk[k: k + batch_size]
                    for k in range(0, len(chunk) - batch_size + 1, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def param_groups(model, cfg):
    """Matrices get weight decay, vectors (norms, biases) none; frozen weights no AdamW state
    (--freeze-vision, LoRA)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = ({"params": [p for p in trained if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def sft_batch(processor, rows, end_id, device):
    """Rows (a dict of lists from datasets) -> prompt BatchFeature, target ids [B, T], mask [B, T].
    The mask is 1 on exactly the response tokens and the end-of-turn token after them."""
    prompt = M.build_prompts(processor, rows["image"], rows["question"]).to(device)
    ids, mask = M.tokenize_completions(processor, rows["response"], end_id)
    return prompt, ids.to(device), mask.to(device)


def token_mean_backward(net, batches, amp=torch.float32):
    """Backward of the token-mean cross-entropy over ALL `batches` (gradient accumulation): each
    batch adds its share, -sum(log p) / (response tokens of all the batches), so the gradient is
    the one a single batch of all those rows would give (under DDP, of every rank's rows: the
    count is the mean over ranks, and DDP averages the gradients). Returns the loss (a float)."""
    n_tokens = run.ddp_mean(sum(float(mask.sum()) for _, _, mask in batches))
    loss = 0.0
    for j, (prompt, ids, mask) in enumerate(batches):
        if isinstance(net, torch.nn.parallel.DistributedDataParallel):   # all-reduce once,
            net.require_backward_grad_sync = j == len(batches) - 1        # after the last
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
    rank, world, device = run.ddp_init(device)  # (0, 1, device) without torchrun
    master = rank == 0
    print(f"device {device}, autocast {amp}" + (f", rank {rank} of {world}" if world > 1 else ""))
    torch.manual_seed(cfg.seed)
    ckpt, state = run.open_run(cfg.out, cfg.resume)
    if master:
        json.dump(asdict(cfg), open(os.path.join(cfg.out, "run_config.json"), "w"), indent=2)
    # LoRA resumes from the frozen base + the adapters in the checkpoint's state (bit-exact);
    # full fine-tuning from the checkpoint's weights
    model, processor = M.load(cfg.model if cfg.lora_r else (ckpt or cfg.model), device,
                              memory.weights_dtype(cfg.dtype))
    memory.apply_memory_plan(model, processor, cfg)
    run.warn_tiny_lr("sft.py", cfg.lr, SFTConfig.lr, model)
    if state and cfg.lora_r:
        memory.load_adapters(model, state["adapters"])
    model.train()
    side = M.image_frame(processor, data.GEMEX_FRAME)   # gemex boxes: 224 px -> the model's side
    # forward/backward go through net
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    end_id = M.end_ids(model)[0]
    train = data.load("train",
                      cfg.train_size or (COLD_START_TRACES if cfg.data == "synthetic" else None),
                      cfg, side)
    val = data.load("validation", cfg.eval_n, cfg, side)[:]   # [:]: a dict of columns
    if not val["question"]:
        print("sft.py: no validation rows: in-training validation skipped (evaluate.py --split "
              "picks another)")
    budget = M.completion_budget(processor, train["response"])  # validation decodes whole traces
    if len(train) < cfg.batch_size * cfg.grad_accum:   # a small real file
        raise SystemExit(f"sft.py: {len(train)} training rows, fewer than --batch-size x "
                         f"--grad-accum ({cfg.batch_size} x {cfg.grad_accum})")
    # the no-reasoning baseline: the same samples, the target cut to <answer>...</answer>
    if cfg.trace == "answer":
        train = train.map(lambda r: {"response": f"<answer>{reward.parse(r).answer}</answer>"},
                          input_columns="response")
    print(f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters; {len(train)} "
          f"training samples")

    opt = memory.adamw(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.95))
    # characters: a proxy for tokens
    lengths = [len(q) + len(r) for q, r in zip(train["question"], train["response"])]
    start, epoch, order, nonfinite = 0, 0, [], 0
    # everything the next step depends on: weights (loaded above), optimizer, data position, RNG
    if state:
        opt.load_state_dict(state["optimizer"])
        start, epoch, order = state["step"], state["epoch"], state["order"]
        run.set_rng_state(state["rng"])
    log = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if master else None
    stop = run.StopOnCtrlC()
    bar, t0 = tqdm(range(start, cfg.max_steps), desc="sft", initial=start, total=cfg.max_steps,
                   disable=not master), time.time()
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
            g["lr"] = lr
        # under DDP this also averages the gradients over ranks
        loss = token_mean_backward(net, batches, amp)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        loss = run.ddp_mean(loss)  # a float, the mean over ranks (so all ranks agree on skipping)
        finite = math.isfinite(loss) and bool(torch.isfinite(grad_norm))
        if finite:                       # a NaN/inf update would poison every weight: skip it
            opt.step()
        opt.zero_grad(set_to_none=True)
        nonfinite = 0 if finite else nonfinite + 1

        # ---- logging (rank 0)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        rec = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(),
               "skipped": int(not finite), "elapsed_s": round(time.time() - t0, 1)}
        last = step + 1 == cfg.max_steps
        if master and val["question"] and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0)
                                           or last):
            means, example = evaluate.greedy_means(model, processor, val, budget)
            rec.update({f"val_{k}": v for k, v in means.items()})
            said = " ".join(f"{k} {v:.2f}" for k, v in means.items())
            tqdm.write(f"step {step + 1}: loss {loss:.3f} | val {said}\n  e.g. {example[:160]}")
        if master:
            log.write(json.dumps(rec) + "\n")
            log.flush()

        # ---- checkpoints: periodic and on Ctrl-C; stop on repeated non-finite updates
        if run.after_step("sft.py", cfg, step + 1, nonfinite, stop, model, processor, lambda: {
                "optimizer": opt.state_dict(), "epoch": epoch, "order": order,
                "rng": run.rng_state(), "adapters": memory.adapter_state(model)}):
            return

    run.ddp_check_in_sync(model)
    if master:
        run.save(model, processor, cfg.out, into=True)
        print(f"saved {cfg.out} after {time.time() - t0:.0f} s{run.peak_memory(device)}")


if __name__ == "__main__":
    main(run.parse_config(SFTConfig, __doc__))
