"""grpo.py -- Stage 2: GRPO from scratch, practising on every labelled question.

Start from the SFT model and let it practise: for each question sample a GROUP of G answers,
score each with verifiable rewards (format, answer, grounding IoU: reward.py), and push up the
log-probability of the answers that beat their own group's average. No value network, no judge:
the group is the baseline (DeepSeekMath, arXiv 2402.03300, Sec. 4.1).

The regime is the cold start: sft.py saw the reasoning traces of one eighth of the training
images; here the model practises on ALL 8000 training questions. A question's reference response
only scores completions (its answer and its boxes are the labels), never a target: RL needs
labels, not traces (GEMeX: labels for 1.6M questions, checked traces for one eighth of them).

    python grpo.py                                   # from runs/sft to runs/grpo (README: times)
    python grpo.py --credit sequence --adv-norm group --loss-agg seq --eps-high 0.2
                                                     # the paper's GRPO (DeepSeekMath's values)
    python evaluate.py --checkpoint runs/sft runs/grpo
    torchrun --nproc_per_node=2 grpo.py              # DDP: each rank rolls out its own B prompts

One step, top to bottom in main() (mu: passes over one rollout; k3: Schulman's estimator of the
KL to pi_ref, per_token_loss):
  1. rollout    B prompts x G completions from the current policy pi_old (model.sample)
  2. reward     r_i = sum_k w_k r_ik / sum_k w_k per completion (reward.score)
  3. advantage  A_i = (r_i - mean_group(r)) / (std_group(r) + eps)   (or batch std, or none);
                per token with --credit span / coord (credit.py, the default)
  4. old logp   log pi_old(y_t) once, before any update (needed only when mu > 1), and
                log pi_ref(y_t) of the frozen SFT model (when beta > 0)
  5. update     mu passes, each one AdamW step over the whole rollout (micro-batched):
                  rho_t = pi(y_t) / pi_old(y_t)
                  l_t   = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta k3_t
                  loss  = l_t aggregated over unmasked tokens (per sequence, token or constant)

Writes --out/metrics.jsonl (one line per step), run_config.json, a page of the rollout every
--show-every steps (rollouts.py), and the final model + processor, loadable by evaluate.py.
"""
import json
import os
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

import credit
import data
import evaluate
import memory
import model as M
import reward
import rollouts
import run

W = reward.DEFAULT_WEIGHTS


# ----------------------------------------------------------------- config
# Inherited flags: --data, --data-path, --image-root (data.DataFlags) and --dtype, --max-pixels,
# --grad-checkpointing, --lora-* (memory.MemoryFlags), whose --freeze-vision is re-declared below.
@dataclass
class GRPOConfig(memory.MemoryFlags, data.DataFlags):
    init: str = "runs/sft"         # the SFT checkpoint to start from (and pi_ref when beta > 0)
    freeze_vision: bool = True     # keep the tower sft.py kept: only the language model learns
    out: str = "runs/grpo"         # output directory: metrics, config, pages, final checkpoint
    max_steps: int = 450           # GRPO steps, one rollout each (inside 15 min on 2 CPU cores)
    prompts: int = 8               # B: prompts per step
    group_size: int = 8            # G: completions per prompt (>= 2: the group is the baseline)
    temperature: float = 1.0       # sampling temperature (the log-probs are taken at it too)
    top_p: float = 1.0             # nucleus sampling: refused below 1 (the loss scores the softmax)
    max_new_tokens: int = 0        # completion budget (0: 1.25 x the references' 99th pct, >= 160)
    mu: int = 1                    # passes over each rollout (mu > 1 reuses it: rho matters)
    micro_batch: int = 32          # sequences per forward/backward: memory, not the result
    lr: float = 1e-4               # AdamW learning rate (constant after the warm-up)
    warmup_steps: int = 10         # linear learning-rate warm-up
    weight_decay: float = 0.0      # AdamW decoupled weight decay
    grad_clip: float = 1.0         # clip the global gradient norm to this
    eps_low: float = 0.2           # clip rho below at 1 - eps_low
    eps_high: float = 0.28         # clip rho above at 1 + eps_high (DAPO's clip-higher)
    beta: float = 0.04             # weight of the k3 penalty to pi_ref (0: no pi_ref loaded)
    adv_norm: str = "batch"        # advantage scale: 'group' std (GRPO), 'batch' std, 'none'
    credit: str = "coord"          # 'sequence' (GRPO), 'span' or 'coord' (credit.py)
    loss_agg: str = "token"        # 'seq' (GRPO), 'token' (DAPO) or 'constant' (Dr. GRPO)
    drop_truncated: bool = False   # give completions that hit max_new_tokens no gradient
    w_format: float = W["format"]        # reward weight: one <think> then one <answer>, a box
    w_answer: float = W["answer"]        # reward weight: the answer's check
    w_grounding: float = W["grounding"]  # reward weight: the paper's rule (count, IoU > 0.75)
    w_iou: float = W["iou"]              # reward weight: dense matched IoU
    train_size: int = 0            # training questions (0: all 8000, 7/8 unseen by sft.py)
    types: str = ""                # practise only these question types, comma-separated
    eval_every: int = 50           # greedy validation every this many steps (0: at the end)
    eval_n: int = 64               # validation samples per evaluation
    show_every: int = 50           # write a page of the rollout every this many steps (0: no)
    seed: int = 0                  # seed for prompt order and sampling
    device: str = "auto"           # 'auto' (CUDA if available), 'cpu' or 'cuda'
    save_every: int = 50           # resumable checkpoint every this many steps (0: never)
    keep: int = 2                  # how many periodic checkpoints to keep
    resume: bool = False           # continue from the newest checkpoint in --out
    max_bad_steps: int = 3         # stop after this many non-finite updates in a row


def check(cfg):
    """Flag values that cannot work, named, before anything is loaded."""
    n_train, n_val = data.DataConfig.n_train, data.DataConfig.n_val
    rules = [(cfg.group_size >= 2, "--group-size must be >= 2: a group of one has no baseline"),
           (min(cfg.prompts, cfg.max_steps, cfg.mu, cfg.micro_batch) >= 1,
            "--prompts, --max-steps, --mu and --micro-batch must be >= 1"),
           (cfg.lr > 0, "--lr must be > 0"), (cfg.beta >= 0, "--beta must be >= 0"),
           (0 <= cfg.eps_low < 1 and cfg.eps_high >= 0,
            "--eps-low must be in [0, 1) and --eps-high >= 0"),
           (cfg.temperature > 0, "--temperature must be > 0"),
           (cfg.top_p == 1, "--top-p below 1 would train off-policy: the rollouts would come from "
            "the nucleus, the loss scores the whole softmax; lower --temperature instead"),
           (cfg.adv_norm in ("group", "batch", "none"), "--adv-norm must be group, batch or none"),
           (cfg.loss_agg in ("seq", "token", "constant"),
            "--loss-agg must be seq, token or constant"),
           (cfg.credit in ("sequence", "span", "coord"),
            "--credit must be sequence, span or coord"),
           (all(t in data.QUESTION_TYPES for t in cfg.types.split(",")) if cfg.types else True,
            f"--types must be comma-separated names from {', '.join(data.QUESTION_TYPES)}"),
           (min(given := [getattr(cfg, f"w_{k}") for k in reward.REWARDS]) >= 0 and sum(given) > 0,
            "reward weights must be >= 0, not all 0"),
           (cfg.max_new_tokens >= 0 and cfg.warmup_steps >= 1 and cfg.grad_clip > 0,
            "--max-new-tokens must be >= 0, --warmup-steps >= 1, --grad-clip > 0"),
           ((cfg.train_size == 0 or cfg.prompts <= cfg.train_size) and
            (cfg.data != "synthetic" or cfg.train_size <= n_train),
            f"--train-size must be 0 (all) or in --prompts..{n_train}"),
           *data.DataFlags.problems(cfg), *memory.MemoryFlags.problems(cfg),
           (cfg.eval_every >= 0 and 1 <= cfg.eval_n and
            (cfg.data != "synthetic" or cfg.eval_n <= n_val),
            f"--eval-every must be >= 0 and --eval-n in 1..{n_val}"),
           (min(cfg.save_every, cfg.show_every) >= 0 and cfg.keep >= 1 and cfg.max_bad_steps >= 1,
            "--save-every and --show-every must be >= 0, --keep and --max-bad-steps >= 1")]
    for ok, msg in rules:
        if not ok:
            raise SystemExit(f"grpo.py: {msg}")


# ----------------------------------------------------------------- the algorithm (the paper's GRPO)
def advantages(rewards, group_size, adv_norm="group", eps=1e-4):
    """Group-relative advantages. rewards [B*G] (group i in rows i*G..i*G+G-1) -> [B*G].

    A_i = r_i - mean(group); then divide by the group's std (GRPO, eq. in Sec. 4.1.2), by the
    whole batch's std (a batch-level scale: easy and hard prompts weigh the same per reward
    point; under DDP the batch is every rank's), or by nothing (Dr. GRPO, arXiv 2503.20783: std
    scaling over-weights near-unanimous groups). A group of G equal rewards has A = 0.
    """
    r = rewards.view(-1, group_size)                                  # [B, G]
    a = r - r.mean(1, keepdim=True)                                    # [B, G]
    if adv_norm == "group":
        a = a / (r.std(1, keepdim=True) + eps)
    elif adv_norm == "batch":
        a = a / (run.ddp_std(rewards) + eps)
    return a.reshape(-1)                                               # [B*G]


def per_token_loss(logp, old_logp, ref_logp, adv, cfg):
    """The clipped surrogate (PPO, arXiv 1707.06347 eq. 7) with GRPO's advantage, plus beta k3.
    logp, old_logp, ref_logp [n, T]; adv [n, T] (or [n, 1]: one per sequence) -> [n, T].

    k3 = pi_ref/pi - log(pi_ref/pi) - 1 per sampled token (Schulman's estimator, as in the
    paper's GRPO and TRL). Its VALUE is an unbiased, positive estimate of KL(pi || pi_ref), which
    kl_ref logs; its GRADIENT is not that KL's: over tokens sampled from pi, E[grad k3] =
    E[(1 - pi_ref/pi) grad log pi] = grad KL(pi_ref || pi), the reverse direction (arXiv
    2510.01555), which pulls pi to cover what pi_ref likes. Kept as TRL has it.
    """
    rho = torch.exp(logp - old_logp)                                                  # [n, T]
    loss = -torch.min(rho * adv, torch.clamp(rho, 1 - cfg.eps_low, 1 + cfg.eps_high) * adv)
    if cfg.beta > 0:
        log_ratio = ref_logp - logp                                            # log pi_ref / pi
        loss = loss + cfg.beta * (torch.exp(log_ratio) - log_ratio - 1)        # k3 >= 0
    return loss                                                                       # [n, T]


def aggregate(loss, mask, cfg, denominator):
    """This micro-batch's SHARE of the rollout's loss: `denominator` counts the WHOLE rollout
    (loss_denominator), so micro-batch losses add up to the same gradient at any --micro-batch.
    'seq' (GRPO): each sequence's token mean, then the mean over sequences; 'token' (DAPO): every
    token of the rollout counts once; 'constant' (Dr. GRPO): a sum over B*G*max_new_tokens."""
    if cfg.loss_agg == "seq":
        return ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / denominator
    return (loss * mask).sum() / denominator


def loss_denominator(mask, cfg):
    """The rollout's denominator for aggregate(), shared by all its micro-batches."""
    if cfg.loss_agg == "seq":
        return float(mask.shape[0])
    if cfg.loss_agg == "token":   # the mean over ranks: DDP then averages gradients into a token
        return max(run.ddp_mean(mask.sum()), 1.0)   # mean over all ranks; >= 1: --drop-truncated
    return float(mask.shape[0] * cfg.max_new_tokens)


@torch.no_grad()
def diagnostics(logp, old_logp, ref_logp, adv, mask, cfg):
    """Per-token means of what a healthy run keeps small: clipped shares, KL to pi_old, pi_ref."""
    n, rho = mask.sum(), torch.exp(logp - old_logp)
    out = {"clip_low": (((rho < 1 - cfg.eps_low) & (adv < 0)).float() * mask).sum() / n,
           "clip_high": (((rho > 1 + cfg.eps_high) & (adv > 0)).float() * mask).sum() / n,
           "kl_old": ((torch.exp(old_logp - logp) - (old_logp - logp) - 1) * mask).sum() / n}
    if cfg.beta > 0:
        log_ratio = ref_logp - logp
        out["kl_ref"] = ((torch.exp(log_ratio) - log_ratio - 1) * mask).sum() / n
    return out


def accumulate_gradients(net, roll, adv, old, ref_logp, cfg, amp=torch.float32):
    """One optimisation pass over the rollout: forward/backward each micro-batch, so that .grad
    ends up holding the gradient of the WHOLE rollout's loss (whatever cfg.micro_batch is).
    adv [N] or [N, T]; old / ref_logp [N, T] or None (old None: mu = 1, pi_old is the policy).
    net: the policy, or its DDP wrapper. micro_batches is defined at the end ("plumbing").
    Returns (the rollout's loss, token-weighted means of the diagnostics)."""
    mask, device = roll["completion_mask"], roll["completion_ids"].device
    denominator = loss_denominator(mask, cfg)
    total, sums, seen = 0.0, {}, 0.0
    last = (roll["completion_ids"].shape[0] - 1) // cfg.micro_batch * cfg.micro_batch
    for s, prompt, repeats in micro_batches(roll, cfg.micro_batch):   # s = (rows, columns)
        if isinstance(net, torch.nn.parallel.DistributedDataParallel):
            net.require_backward_grad_sync = s[0].start == last   # all-reduce after the last
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            logp, ent = M.completion_logprobs(net, prompt, roll["completion_ids"][s], mask[s],
                                              entropy=True, temperature=cfg.temperature,
                                              repeats=repeats, support=roll["support"])  # [n, T]
        # with mu = 1, pi_old IS the current policy: rho = 1, yet d rho = rho d log pi, not 0
        old_s = old[s] if old is not None else logp.detach()
        ref_s = ref_logp[s] if ref_logp is not None else None
        adv_s = adv[s] if adv.dim() == 2 else adv[s[0]].unsqueeze(1)           # [n, T] or [n, 1]
        loss = aggregate(per_token_loss(logp, old_s, ref_s, adv_s, cfg), mask[s], cfg, denominator)
        loss.backward()
        total += loss.item()
        tokens = float(mask[s].sum())
        stats = diagnostics(logp, old_s, ref_s, adv_s, mask[s], cfg)
        stats["entropy"] = (ent * mask[s]).sum() / max(tokens, 1.0)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + float(v) * tokens
        seen += tokens
    return total, {k: v / max(seen, 1.0) for k, v in sums.items()}


# ----------------------------------------------------------------- main
def load_models(cfg, ckpt, state, device):
    """The policy (from --init, or a checkpoint when resuming), its processor, and pi_ref: a
    frozen copy of --init when beta > 0 (None at beta = 0, and under LoRA, where pi_ref is the
    policy with its adapters off)."""
    # LoRA resumes from the init + the adapters in the checkpoint's state (bit-exact); full
    # fine-tuning from the checkpoint's weights
    dtype = memory.weights_dtype(cfg.dtype)
    policy, processor = M.load(cfg.init if cfg.lora_r else (ckpt or cfg.init), device, dtype)
    memory.apply_memory_plan(policy, processor, cfg)
    run.warn_tiny_lr("grpo.py", cfg.lr, GRPOConfig.lr, policy)
    if state and cfg.lora_r:
        memory.load_adapters(policy, state["adapters"])
    policy.train()
    ref_model = None
    if cfg.beta > 0 and not cfg.lora_r:
        # in the policy's dtype and through the same path of completion_logprobs, so that
        # kl_ref is exactly 0 before the first update (a bf16 pi_ref of a float32 policy was not)
        ref_model, _ = M.load(cfg.init, device, dtype)
        if cfg.grad_checkpointing:
            ref_model.activation_checkpointing_enable({"use_reentrant": False})
        ref_model.eval().requires_grad_(False)
    return policy, processor, ref_model


def main(cfg):
    check(cfg)
    device, amp = run.pick_device(cfg.device)
    rank, world, device = run.ddp_init(device)              # (0, 1, device) without torchrun
    master = rank == 0
    print(f"device {device}, autocast {amp}" + (f", rank {rank} of {world}" if world > 1 else ""))
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)                      # ranks sample different completions
    ckpt, state = run.open_run(cfg.out, cfg.resume)
    if master:
        json.dump(asdict(cfg), open(os.path.join(cfg.out, "run_config.json"), "w"), indent=2)
    policy, processor, ref_model = load_models(cfg, ckpt, state, device)
    net = torch.nn.parallel.DistributedDataParallel(policy) if world > 1 else policy   # updates

    def ref_logprobs(roll):   # log pi_ref [N, T]; under LoRA pi_ref IS the policy, adapters off
        if cfg.lora_r:
            with memory.adapters_off(policy):
                return logprobs(policy, roll, cfg.micro_batch, cfg.temperature)
        return logprobs(ref_model, roll, cfg.micro_batch, cfg.temperature)

    side = M.image_frame(processor, data.GEMEX_FRAME)   # gemex boxes: 224 px -> the model's side
    train = data.load("train", cfg.train_size or None, cfg, side)
    if cfg.types:                  # RL where SFT left headroom (evaluation still sees all types)
        keep = set(cfg.types.split(","))
        train = train.filter(lambda q: q in keep, input_columns="question_type")
    if len(train) < cfg.prompts:   # a small real file, or a --types filter
        of = f" of --types {cfg.types}" if cfg.types else ""
        raise SystemExit(f"grpo.py: {len(train)} training prompts{of}, "
                         f"fewer than --prompts {cfg.prompts}")
    val = data.load("validation", cfg.eval_n, cfg, side)[:]   # [:]: a dict of columns
    if not val["question"]:
        print("grpo.py: no validation rows: in-training validation skipped "
              "(evaluate.py --split picks another)")
    if not cfg.max_new_tokens:
        cfg.max_new_tokens = M.completion_budget(processor, train["response"])
    weights = {k: getattr(cfg, f"w_{k}") for k in reward.REWARDS}
    trained = [p for p in policy.parameters() if p.requires_grad]
    opt = memory.adamw(trained, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    B, G = cfg.prompts, cfg.group_size
    vocab = policy.get_output_embeddings().weight.shape[0]     # the model's, not the tokenizer's
    pieces = credit.token_pieces(processor.tokenizer, vocab)                            # [V]
    is_digit = credit.digit_tokens(pieces) if cfg.credit == "span" else None           # [V]
    print(f"{cfg.init}: {sum(p.numel() for p in policy.parameters()):,} parameters; {B} prompts x "
          f"{G} completions per step; reward weights {weights}")
    start, order, nonfinite = 0, [], 0   # nonfinite: updates skipped in a row
    if state:   # all the next step depends on: weights (loaded above), optimizer, order, RNG
        opt.load_state_dict(state["optimizer"])
        start, order = state["step"], state["order"]
        run.set_rng_state(state["rng"])
    log = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if master else None
    stop, t_start, timings = run.StopOnCtrlC(), time.time(), []
    bar = tqdm(range(start, cfg.max_steps), desc="grpo", initial=start, total=cfg.max_steps,
               disable=not master)
    for step in bar:
        t0 = time.time()
        if len(order) < B * world:     # a fresh seeded permutation each epoch, on every rank
            shuffle = torch.Generator().manual_seed(cfg.seed + step)
            order += torch.randperm(len(train), generator=shuffle).tolist()
        rows, order = train[order[rank * B:(rank + 1) * B]], order[B * world:]   # this rank's B

        # ---- 1. rollout: G samples per prompt from the current policy (= pi_old)
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            roll = M.sample(policy, processor, rows["image"], rows["question"], G,
                            cfg.max_new_tokens, cfg.temperature)
        mask = roll["completion_mask"]                                            # [N, T], N = B*G
        lengths = mask.sum(1)                                                # [N], before dropping
        if cfg.drop_truncated:
            mask = mask * (~roll["truncated"]).float().unsqueeze(1)
        roll["completion_mask"] = mask
        t1 = time.time()

        # ---- 2. reward: each completion against its prompt's reference response
        scores = [reward.score(text, rows["response"][i // G], rows["question_type"][i // G],
                               weights, image_size=rows["image"][i // G].size)
                  for i, text in enumerate(roll["texts"])]
        rewards = torch.tensor([s["total"] for s in scores], device=device)      # [N]

        # ---- 3. advantage: relative to the group
        if cfg.credit == "sequence":    # [N]: one advantage per completion (the paper's GRPO)
            adv = advantages(rewards, G, cfg.adv_norm)
        else:                           # [N, T]: each reward to the tokens deciding it (credit.py)
            adv = credit.token_advantages(advantages, cfg, scores, roll, rows["response"], pieces,
                                          is_digit, weights)
        t2 = time.time()

        # ---- 4. log-probs of the rollout under pi_old (and pi_ref), before any update
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            old = logprobs(policy, roll, cfg.micro_batch, cfg.temperature) if cfg.mu > 1 else None
            ref_logp = ref_logprobs(roll) if cfg.beta > 0 else None                      # [N, T]
        t3 = time.time()

        # ---- 5. mu passes, one optimizer step each; micro-batches add up the rollout's gradient
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        for _ in range(cfg.mu):
            loss, stats = accumulate_gradients(net, roll, adv, old, ref_logp, cfg, amp)
            loss = run.ddp_mean(loss)       # the same on every rank: all ranks agree on skipping
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            finite = bool(np.isfinite(loss) and torch.isfinite(grad_norm))
            if finite:                   # a NaN/inf update would poison every weight: skip it
                opt.step()
            opt.zero_grad(set_to_none=True)
            nonfinite = 0 if finite else nonfinite + 1
        t4 = time.time()

        # ---- diagnostics (every step), a page of the rollout and held-out greedy scores
        groups = rewards.view(B, G)
        timing = {"time_generate": t1 - t0, "time_score": t2 - t1, "time_ref": t3 - t2,
                  "time_train": t4 - t3}
        timings.append(list(timing.values()))
        rec = {"step": step + 1, "loss": loss, "lr": lr, "skipped": int(not finite),
               **{f"reward_{k}": float(np.mean([s[k] for s in scores])) for k in reward.REWARDS},
               "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
               "zero_std_groups": float((groups.std(1) < 1e-6).float().mean()),
               "length_mean": float(lengths.float().mean()), "length_max": int(lengths.max()),
               "truncated": float(roll["truncated"].float().mean()), **stats,
               "grad_norm": float(grad_norm), **timing,
               "elapsed_s": round(time.time() - t_start, 1)}
        bar.set_postfix(reward=f"{rec['reward']:.3f}", answer=f"{rec['reward_answer']:.2f}",
                        iou=f"{rec['reward_iou']:.2f}", len=f"{rec['length_mean']:.0f}")
        if master and cfg.show_every and (step + 1) % cfg.show_every == 0:   # what GRPO sees
            record = rollouts.step_record(step + 1, cfg.credit, roll, rows, scores, adv, lengths,
                                          pieces)
            page = rollouts.write_step(os.path.join(cfg.out, "rollouts"), step + 1, record,
                                       cfg.show_every)
            tqdm.write(f"step {step + 1}: {page}")
        if master and val["question"] and (
                (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.max_steps):
            means, example = evaluate.greedy_means(policy, processor, val, cfg.max_new_tokens)
            rec.update({f"val_{k}": v for k, v in means.items()})
            tqdm.write(f"step {step + 1}: reward {rec['reward']:.3f} | val " +
                       " ".join(f"{k} {v:.2f}" for k, v in means.items()))
        if master:             # rank 0's rollout stands for all (the loss is the mean over ranks)
            log.write(json.dumps(rec) + "\n")
            log.flush()

        # ---- checkpoints: periodic and on Ctrl-C; stop on repeated non-finite updates
        if run.after_step("grpo.py", cfg, step + 1, nonfinite, stop, policy, processor,
                          lambda: {"optimizer": opt.state_dict(), "order": order,
                                   "rng": run.rng_state(),
                                   "adapters": memory.adapter_state(policy)}):
            return

    run.ddp_check_in_sync(policy)
    if master and len(timings) > 1:   # the benchmark line (tests/benchmark.py): compare ratios
        t = np.mean(timings[1:], 0)   # step 1 warms up the allocator: not counted
        print(f"seconds per step over steps {start + 2}-{cfg.max_steps}: {t.sum():.2f} = generate "
              f"{t[0]:.2f} + score {t[1]:.2f} + ref {t[2]:.2f} + train {t[3]:.2f}")
    if master:
        run.save(policy, processor, cfg.out, into=True)
        print(f"saved {cfg.out} after {time.time() - t_start:.0f} s{run.peak_memory(device)}")


# ----------------------------------------------------------------- plumbing: micro-batches
def micro_batches(roll, size):
    """The rollout cut for memory: yields (s, prompt, repeats) where s = (rows, columns) indexes
    every [N, T] tensor: `size` rows, and only the columns up to their longest completion (one
    long completion would otherwise pad the whole rollout). prompt: the distinct prompts those
    rows continue, repeats: how many rows continue each one (a group may straddle two
    micro-batches: its prompt is then prefilled in both). pixel_values are cut by patch."""
    p, G, N = roll["prompt"], roll["group_size"], roll["completion_ids"].shape[0]
    lengths = roll["completion_mask"].sum(1)                        # [N]
    patches = p["image_grid_thw"].prod(-1)                             # [B] patches per prompt
    starts = torch.cat([patches.new_zeros(1), patches.cumsum(0)])
    for i in range(0, N, size):
        j = min(i + size, N)
        b0, b1 = i // G, (j - 1) // G + 1                               # prompts of rows i..j-1
        prompt = {k: v[b0:b1] for k, v in p.items() if k != "pixel_values"}
        prompt["pixel_values"] = p["pixel_values"][starts[b0]: starts[b1]]
        s = (slice(i, j), slice(0, max(1, int(lengths[i:j].max()))))
        yield s, prompt, [min(j, (b + 1) * G) - max(i, b * G) for b in range(b0, b1)]


@torch.no_grad()
def logprobs(model, roll, size, temperature):
    """Completion log-probs of the whole rollout at the sampling temperature, micro-batched,
    without a graph: [N, T] (0 past each micro-batch's longest completion)."""
    ids, mask = roll["completion_ids"], roll["completion_mask"]
    return torch.cat([torch.nn.functional.pad(
        M.completion_logprobs(model, prompt, ids[s], mask[s], temperature=temperature,
                              repeats=repeats, support=roll["support"]),
        (0, ids.shape[1] - s[1].stop)) for s, prompt, repeats in micro_batches(roll, size)])


if __name__ == "__main__":
    main(run.parse_config(GRPOConfig, __doc__))
