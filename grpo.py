"""grpo.py -- Stage 2: GRPO from scratch, practising on every labelled question (the cold start's RL).

Start from the SFT model and let it practise: for each question sample a GROUP of G answers,
score each with verifiable rewards (format, answer, grounding IoU: reward.py), and push up the
log-probability of the answers that beat their own group's average. No value network, no
judge: the group is the baseline (DeepSeekMath, arXiv 2402.03300, Sec. 4.1).

The regime is the cold start: sft.py saw the reasoning traces of one eighth of the training
images; here the model practises on ALL 8000 training questions. A question's reference
response is only used to score completions (its answer and its boxes are the labels), never as
a target, so RL needs labels, not traces (GEMeX: labels for 1.6M questions, checked traces for
one eighth of them). The plain GRPO of the paper is one flag set away:
    python grpo.py --credit sequence --adv-norm group --loss-agg seq --out runs/grpo_plain

    python grpo.py                                   # from runs/sft to runs/grpo, CPU: see README
    python evaluate.py --checkpoint runs/sft runs/grpo
    torchrun --nproc_per_node=2 grpo.py              # DDP: each rank rolls out its own B prompts

One step, top to bottom in main():
  1. rollout    B prompts x G completions: each prompt prefilled once, G samples (model.sample)
  2. reward     r_i = sum_k w_k r_ik / sum_k w_k per completion                (reward.score)
  3. advantage  A_i = (r_i - mean_group(r)) / (std_group(r) + eps)           (or Dr. GRPO / batch)
                per token with --credit span / coord (the default): a box coordinate's digits get
                its own pixel error relative to the group's, every other token the text rewards'
  4. old logp   log pi_old(y_t) once, before any update                     (only needed if mu > 1)
  5. update     mu passes, each one AdamW step over the whole rollout (micro-batched):
                  rho_t = pi(y_t) / pi_old(y_t)
                  l_t   = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta k3_t
                  loss  = aggregate(l_t over unmasked tokens)      (per sequence / token / constant)

Writes --out/metrics.jsonl (one line per step, every diagnostic), run_config.json, and the final
model + processor with save_pretrained, loadable by evaluate.py.
"""
import bisect
import itertools
import json
import os
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

import data
import evaluate
import model as M
import reward
import rollouts
import run

# ----------------------------------------------------------------------------- config
# Inherited flags: --data, --data-path, --image-root (data.DataFlags) and --dtype, --max-pixels,
# --freeze-vision, --grad-checkpointing, --lora-* (model.MemoryFlags).
@dataclass
class GRPOConfig(run.MemoryFlags, data.DataFlags):
    init: str = "runs/sft"         # the SFT checkpoint to start from (and the frozen reference when beta > 0)
    out: str = "runs/grpo"         # output directory for metrics, config and the final checkpoint
    max_steps: int = 500           # GRPO steps (one rollout each): ~8 min on 2 CPU cores (0.9 s a step)
    prompts: int = 8               # B: prompts per step
    group_size: int = 8            # G: completions sampled per prompt (>= 2: the group is the baseline)
    temperature: float = 0.7       # sampling temperature of the rollouts (and of the log-probs that score them)
    top_p: float = 1.0             # nucleus sampling: refused below 1 (the loss scores the whole softmax)
    max_new_tokens: int = 0        # rollout length budget (0: sized from the data, 1.25x the references' 99th percentile, >= 160)
    mu: int = 1                    # optimisation passes over each rollout (mu > 1 reuses it: the ratio matters)
    micro_batch: int = 32          # sequences per forward/backward (does not change the result, only memory)
    lr: float = 1e-4               # AdamW learning rate (constant after warm-up; with sequence credit 1e-4 drifts away from SFT)
    warmup_steps: int = 10         # linear learning-rate warm-up
    weight_decay: float = 0.0      # AdamW decoupled weight decay
    grad_clip: float = 1.0         # clip the global gradient norm to this
    eps_low: float = 0.2           # clip rho below at 1 - eps_low
    eps_high: float = 0.28         # clip rho above at 1 + eps_high (DAPO's clip-higher keeps exploring)
    beta: float = 0.3              # k3 KL penalty weight against the frozen init (0: no reference model loaded)
    adv_norm: str = "batch"        # advantage scale: 'group' std (GRPO), 'batch' std, or 'none' (Dr. GRPO)
    credit: str = "coord"          # 'sequence': one advantage for all tokens (GRPO); 'span': box digits get the box rewards', the rest the text rewards'; 'coord': each coordinate's digits its own error's
    loss_agg: str = "token"        # 'seq' mean per sequence (GRPO), 'token' mean over batch (DAPO), 'constant' (Dr. GRPO)
    drop_truncated: bool = False   # give completions that hit max_new_tokens no gradient
    w_format: float = reward.DEFAULT_WEIGHTS["format"]        # reward weight: well-formed <think>/<answer> with a box
    w_answer: float = reward.DEFAULT_WEIGHTS["answer"]        # reward weight: exact answer check
    w_grounding: float = reward.DEFAULT_WEIGHTS["grounding"]  # reward weight: the paper's rule (box count equal and mean IoU > 0.75)
    w_iou: float = reward.DEFAULT_WEIGHTS["iou"]              # reward weight: dense matched IoU
    train_size: int = 0            # training questions (0: every one: 8000 synthetic, 7/8 of them unseen by sft.py)
    types: str = ""                # practise only these question types, comma-separated ('' = all four)
    eval_every: int = 50           # greedy validation every this many steps (0: only at the end)
    eval_n: int = 64               # validation samples per evaluation
    show_every: int = 50           # write a page of the rollout (rollouts.py) every this many steps (0: never)
    seed: int = 0                  # seed for prompt order and sampling
    device: str = "auto"           # 'auto' (CUDA if available), 'cpu' or 'cuda'
    save_every: int = 50           # write a resumable checkpoint to OUT/checkpoints every this many steps (0: never)
    keep: int = 2                  # how many periodic checkpoints to keep
    resume: bool = False           # continue from the newest checkpoint in --out (same flags otherwise)
    max_bad_steps: int = 3         # stop after this many non-finite losses/gradients in a row (each update is skipped)


def check(cfg):
    """Flag values that cannot work, named, before anything is loaded."""
    bad = [(cfg.group_size >= 2, "--group-size must be >= 2: a group of one has no baseline"),
           (cfg.prompts >= 1 and cfg.max_steps >= 1 and cfg.mu >= 1 and cfg.micro_batch >= 1,
            "--prompts, --max-steps, --mu and --micro-batch must be >= 1"),
           (cfg.lr > 0, "--lr must be > 0"), (cfg.beta >= 0, "--beta must be >= 0"),
           (0 <= cfg.eps_low < 1 and cfg.eps_high >= 0, "--eps-low must be in [0, 1) and --eps-high >= 0"),
           (cfg.temperature > 0, "--temperature must be > 0"),
           (cfg.top_p == 1, "--top-p below 1 would train off-policy: the rollouts would come from the "
            "nucleus, the loss scores the whole softmax; lower --temperature instead"),
           (cfg.adv_norm in ("group", "batch", "none"), "--adv-norm must be group, batch or none"),
           (cfg.loss_agg in ("seq", "token", "constant"), "--loss-agg must be seq, token or constant"),
           (cfg.credit in ("sequence", "span", "coord"), "--credit must be sequence, span or coord"),
           (all(t in data.QUESTION_TYPES for t in cfg.types.split(",")) if cfg.types else True,
            f"--types must be comma-separated names from {', '.join(data.QUESTION_TYPES)}"),
           (min(weights := [getattr(cfg, f"w_{k}") for k in reward.REWARDS]) >= 0 and sum(weights) > 0,
            "reward weights must be >= 0, not all 0"),
           (cfg.max_new_tokens >= 0 and cfg.warmup_steps >= 1 and cfg.grad_clip > 0,
            "--max-new-tokens must be >= 0, --warmup-steps >= 1, --grad-clip > 0"),
           ((cfg.train_size == 0 or cfg.prompts <= cfg.train_size) and
            (cfg.data != "synthetic" or cfg.train_size <= data.DataConfig.n_train),
            f"--train-size must be 0 (all) or in --prompts..{data.DataConfig.n_train}"),
           *data.DataFlags.problems(cfg), *run.MemoryFlags.problems(cfg),
           (cfg.eval_every >= 0 and 1 <= cfg.eval_n and (cfg.data != "synthetic" or cfg.eval_n <= data.DataConfig.n_val),
            f"--eval-every must be >= 0 and --eval-n in 1..{data.DataConfig.n_val}"),
           (cfg.save_every >= 0 and cfg.show_every >= 0 and cfg.keep >= 1 and cfg.max_bad_steps >= 1,
            "--save-every and --show-every must be >= 0, --keep and --max-bad-steps >= 1")]
    for ok, msg in bad:
        if not ok:
            raise SystemExit(f"grpo.py: {msg}")


# ----------------------------------------------------------------------------- the algorithm (the paper's GRPO)
def advantages(rewards, group_size, norm="group", eps=1e-4):
    """Group-relative advantages. rewards [B*G] (group i in rows i*G..i*G+G-1) -> [B*G].

    A_i = r_i - mean(group); then divide by the group's std (GRPO, eq. in Sec. 4.1.2), by the
    whole batch's std (a batch-level scale: easy and hard prompts weigh the same per reward
    point; under DDP the batch is every rank's), or by nothing (Dr. GRPO, arXiv 2503.20783: std
    scaling over-weights near-unanimous groups). A group of G equal rewards has A = 0.
    """
    r = rewards.view(-1, group_size)                                  # [B, G]
    a = r - r.mean(1, keepdim=True)                                    # [B, G]
    if norm == "group":
        a = a / (r.std(1, keepdim=True) + eps)
    elif norm == "batch":
        a = a / (run.ddp_std(rewards) + eps)
    return a.reshape(-1)                                               # [B*G]


def policy_loss(logp, old_logp, adv, mask, cfg, norm, ref_logp=None):
    """The clipped surrogate (PPO, arXiv 1707.06347 eq. 7) with GRPO's per-token advantage and
    an optional KL penalty, k3 = pi_ref/pi - log(pi_ref/pi) - 1 per sampled token (Schulman's
    estimator, as in the paper's GRPO and TRL). Its VALUE is an unbiased, positive estimate of
    KL(pi || pi_ref), which kl_ref logs; its GRADIENT is not that KL's: over tokens sampled from
    pi, E[grad k3] = E[(1 - pi_ref/pi) grad log pi] = grad KL(pi_ref || pi), the reverse
    direction (arXiv 2510.01555). So beta pulls pi to cover what pi_ref likes. Kept as TRL has it.

    logp, old_logp, ref_logp, mask [n, T]; adv [n] (or [n, T]: --credit span / coord). Returns (loss,
    stats) where loss is this micro-batch's SHARE of the rollout's loss: `norm` is computed over
    the whole rollout (total tokens, total sequences, ...), so summing micro-batch losses gives
    the same gradient whatever the micro-batch size.
    """
    ratio = torch.exp(logp - old_logp)                                  # [n, T]  rho_t
    a = adv if adv.dim() == 2 else adv.unsqueeze(1)                     # [n, T] per token, or [n, 1] per sequence
    surrogate = torch.min(ratio * a, torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high) * a)
    per_token = -surrogate                                              # [n, T]
    if cfg.beta > 0:
        d = ref_logp - logp
        per_token = per_token + cfg.beta * (torch.exp(d) - d - 1)       # k3 >= 0
    if cfg.loss_agg == "seq":        # GRPO: each sequence's token mean, then a mean over sequences
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / norm
    else:                            # 'token': norm = tokens in the rollout; 'constant': G*B*max_new_tokens
        loss = (per_token * mask).sum() / norm
    with torch.no_grad():
        n = mask.sum()
        stats = {"clip_low": (((ratio < 1 - cfg.eps_low) & (a < 0)).float() * mask).sum() / n,
                 "clip_high": (((ratio > 1 + cfg.eps_high) & (a > 0)).float() * mask).sum() / n,
                 "kl_old": ((torch.exp(old_logp - logp) - (old_logp - logp) - 1) * mask).sum() / n}
        if cfg.beta > 0:
            stats["kl_ref"] = ((torch.exp(d) - d - 1) * mask).sum() / n
    return loss, stats


def loss_normaliser(mask, cfg):
    """The denominator of the rollout's loss, shared by all its micro-batches (see policy_loss)."""
    if cfg.loss_agg == "seq":
        return float(mask.shape[0])
    if cfg.loss_agg == "token":   # the mean over ranks (DDP then averages gradients: a token mean
        return max(run.ddp_mean(mask.sum()), 1.0)   # over all ranks); >= 1: --drop-truncated
    return float(mask.shape[0] * cfg.max_new_tokens)


def accumulate_gradients(policy, roll, adv, old, ref_logp, cfg, amp=torch.float32):
    """One optimisation pass over the rollout: forward/backward each micro-batch, so that .grad
    ends up holding the gradient of the WHOLE rollout's loss (whatever cfg.micro_batch is).
    old / ref_logp [N, T] or None (None for old means mu = 1: pi_old is the current policy).
    Returns (the rollout's loss, token-weighted means of the diagnostics)."""
    mask, device = roll["completion_mask"], roll["completion_ids"].device
    norm = loss_normaliser(mask, cfg)
    total, sums, n_tok = 0.0, {}, 0.0
    last = (roll["completion_ids"].shape[0] - 1) // cfg.micro_batch * cfg.micro_batch
    for s, prompt, repeats in micro_batches(roll, cfg.micro_batch):   # s = (rows, columns)
        if isinstance(policy, torch.nn.parallel.DistributedDataParallel):
            policy.require_backward_grad_sync = s[0].start == last   # DDP: all-reduce once, after the last one
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            logp, ent = M.completion_logprobs(policy, prompt, roll["completion_ids"][s], mask[s], entropy=True,
                                              temperature=cfg.temperature, repeats=repeats,
                                              support=roll["support"])   # [n, T] each
        # with mu = 1, pi_old IS the current policy: rho = 1, yet d rho = rho * d log pi, not 0
        old_s = old[s] if old is not None else logp.detach()
        loss, st = policy_loss(logp, old_s, adv[s] if adv.dim() == 2 else adv[s[0]], mask[s], cfg, norm,
                               ref_logp[s] if ref_logp is not None else None)
        loss.backward()
        total += loss.item()
        w = float(mask[s].sum())
        st["entropy"] = (ent * mask[s]).sum() / max(w, 1.0)
        for k, v in st.items():
            sums[k] = sums.get(k, 0.0) + float(v) * w
        n_tok += w
    return total, {k: v / max(n_tok, 1.0) for k, v in sums.items()}


# ----------------------------------------------------------------------------- beyond the paper: token-level credit
# The paper's GRPO gives every token of a completion the same advantage. Here the rewards are
# decided by different tokens: the answer by a letter, where a box lies by its digits, how many
# boxes there are by which boxes get written and where the reasoning stops. One advantage for all
# of them tells a box digit it was good because the letter was right. --credit span and coord
# (the default) give each reward's advantage to the tokens that decide it (reward.TEXT_REWARDS,
# reward.BOX_REWARDS); --credit sequence is the paper's.
def token_advantages(cfg, scores, roll, refs, pieces, is_digit, weights, group_size):
    """The one entry point from main(): [N, T] advantages for --credit span or coord."""
    ids, lengths = roll["completion_ids"], roll["completion_mask"].sum(1).long().tolist()
    if cfg.credit == "span":
        return span_advantages(scores, ids, is_digit, weights, group_size, cfg.adv_norm)
    return coord_advantages(scores, roll["texts"], refs, ids, lengths, pieces, weights, group_size, cfg.adv_norm)


def token_pieces(tokenizer, vocab_size):
    """The text of every token id the model can output, [V] strings: '' for special tokens and
    for the ids a real checkpoint's embedding has past the tokenizer (Qwen2.5: 151,936 rows,
    151,665 tokens). Joined, a completion's pieces are its decoded text, so they place each
    token at its characters."""
    pieces = tokenizer.batch_decode([[i] for i in range(min(len(tokenizer), vocab_size))],
                                    skip_special_tokens=True)
    return pieces + [""] * (vocab_size - len(pieces))


def digit_tokens(pieces):
    """[V] bool: the token ids that are one digit. Qwen's tokenizer and the tiny one spell
    numbers digit by digit, and in a ThinkVG trace every digit is a coordinate."""
    return torch.tensor([len(p) == 1 and p in "0123456789" for p in pieces])


def reward_advantages(scores, keys, weights, group_size, norm):
    """The group-relative advantage [N] of the weighted sum of some reward components."""
    r = torch.tensor([sum(weights[k] * s[k] for k in keys) for s in scores])
    return advantages(r, group_size, norm)


def span_advantages(scores, ids, is_digit, weights, group_size, norm="group"):
    """--credit span: the digits get the box rewards' advantage (grounding + IoU), every other
    token (region names, findings, the answer) the text rewards' (format + answer). [N, T].
    scores: reward.score dicts [N]; ids [N, T] completion ids; is_digit [V] from digit_tokens."""
    a_box = reward_advantages(scores, reward.BOX_REWARDS, weights, group_size, norm)     # [N]
    a_text = reward_advantages(scores, reward.TEXT_REWARDS, weights, group_size, norm)   # [N]
    digit = is_digit[ids.cpu()]                                                          # [N, T]
    return torch.where(digit, a_box.unsqueeze(1), a_text.unsqueeze(1)).to(ids.device)   # [N, T]


def coord_advantages(scores, texts, refs, ids, lengths, pieces, weights, group_size, norm="group"):
    """--credit coord: each reward to the tokens that decide it. [N, T].

      text  (format, answer)  every token but a box's numbers: the text rewards' advantage
      where (each coordinate) the digits of a coordinate of a box the reward paired with a
                              reference box: how much closer to the reference this completion
                              wrote it than its group wrote the same coordinate of the same box
      count (how many boxes)  every token of a box the reward could NOT pair (a hallucination),
                              and </think> when the reasoning stopped at or before the
                              reference's count (stopping early is how a box goes missing)

    where: a coordinate's "reward" is minus its error as a fraction of the reference box's side,
    e = |pred - ref| / side, so errors on boxes of any size compare; its advantage is
    (w_grounding + w_iou)(mean_group(e) - e) / scale, scale per --adv-norm as for the rewards:
    std_group(e) + 1 px ('group'), the batch std of e + 1 px ('batch'), 1 ('none'). A coordinate
    that no other completion of the group paired with the same reference box gets 0.
    count: the box rewards as if every paired box were exact (reward.box_rewards with the
    paired count as the IoU sum): only the number of boxes, paired or not, moves it, and its
    group-relative advantage is what a hallucinated or missing box cost against the group.
    Boxes are paired by the reward's own optimal IoU matching (reward.box_layout), never by the
    words before them. texts [N] decoded completions, refs [B] reference responses, lengths [N]
    completion lengths in tokens, pieces [V] from token_pieces.
    """
    G, (N, T) = group_size, ids.shape
    a_text = reward_advantages(scores, reward.TEXT_REWARDS, weights, G, norm)            # [N]
    layouts = [reward.box_layout(t, refs[i // G]) for i, t in enumerate(texts)]
    count = [sum(weights[k] * v for k, v in zip(reward.BOX_REWARDS, reward.box_rewards(
        sum(b.ref is not None for b in L.boxes), len(L.boxes), len(L.ref)))) for L in layouts]
    a_count = advantages(torch.tensor(count), G, norm)                                 # [N]
    adv = a_text.unsqueeze(1).repeat(1, T)                                               # [N, T]
    where = {}                     # (prompt, reference box, coordinate) -> [(row, tokens, e, side)]
    for i, L in enumerate(layouts):
        row = [pieces[t] for t in ids[i, :lengths[i]].tolist()]
        if "".join(row) != texts[i]:         # tokens and text disagree: no box credit in this row
            continue
        ends = list(itertools.accumulate(map(len, row)))                         # token t: its characters
        starts = [e - len(p) for e, p in zip(ends, row)]                         # starts[t]:ends[t]
        span = lambda s, e: slice(bisect.bisect_right(ends, s), bisect.bisect_left(starts, e))  # noqa: E731
        for b in L.boxes:
            for c, (s, e) in enumerate(b.numbers):
                adv[i, span(s, e)] = 0.0                                         # no text credit
                if b.ref is not None:
                    side = max(L.ref[b.ref][2 + c % 2] - L.ref[b.ref][c % 2], 1.0)   # width or height
                    where.setdefault((i // G, b.ref, c), []).append((i, span(s, e), b.errors[c] / side, side))
            if b.ref is None:
                adv[i, span(*b.span)] += a_count[i]
        if L.think_end and len(L.boxes) <= len(L.ref):
            adv[i, span(*L.think_end)] += a_count[i]
    shared = [w for w in where.values() if len(w) > 1]      # coordinates the group can compare
    e_batch = torch.tensor([e for w in shared for _, _, e, _ in w], dtype=torch.float64)
    std_batch = float(run.ddp_std(e_batch)) if norm == "batch" else 0.0
    w_box = sum(weights[k] for k in reward.BOX_REWARDS)
    for w in shared:
        e = torch.tensor([x[2] for x in w], dtype=torch.float64)   # float64: a tie is exactly 0
        for i, tokens, own, side in w:
            scale = {"group": float(e.std()) + 1 / side, "batch": std_batch + 1 / side}.get(norm, 1.0)
            adv[i, tokens] = w_box * (float(e.mean()) - own) / scale
    return adv.to(ids.device)


# ----------------------------------------------------------------------------- plumbing
def micro_batches(rollout, size):
    """The rollout cut for memory: yields (s, prompt, repeats) where s = (rows, columns) indexes
    every [N, T] tensor: `size` rows, and only the columns up to their longest completion (one long
    completion would otherwise pad the whole rollout to its length). prompt: the distinct prompts
    those rows continue, repeats: how many of the rows continue each one (a group may straddle two
    micro-batches: its prompt is then prefilled in both). pixel_values are per patch: cut by patch."""
    p, G, N = rollout["prompt"], rollout["group_size"], rollout["completion_ids"].shape[0]
    lengths = rollout["completion_mask"].sum(1)                        # [N]
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
def logprobs(model, rollout, size, temperature):
    """Completion log-probs of the whole rollout at the sampling temperature, micro-batched,
    without a graph: [N, T] (0 past each micro-batch's longest completion)."""
    ids, mask, T = rollout["completion_ids"], rollout["completion_mask"], rollout["completion_ids"].shape[1]
    return torch.cat([torch.nn.functional.pad(
        M.completion_logprobs(model, prompt, ids[s], mask[s], temperature=temperature, repeats=repeats,
                              support=rollout["support"]),
        (0, T - s[1].stop)) for s, prompt, repeats in micro_batches(rollout, size)])


# ----------------------------------------------------------------------------- main
def main(cfg):
    check(cfg)
    device, amp = run.pick_device(cfg.device)
    rank, world, device = run.ddp_init(device)                      # (0, 1, device) without torchrun
    master = rank == 0
    print(f"device {device}, autocast {amp}" + (f", rank {rank} of {world}" if world > 1 else ""))
    random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)                            # ranks sample different completions
    ckpt, state = run.open_run(cfg.out, cfg.resume)
    if master:
        json.dump(asdict(cfg), open(os.path.join(cfg.out, "run_config.json"), "w"), indent=2)
    # LoRA resumes from the init + the adapters in the checkpoint's state (bit-exact);
    # full fine-tuning from the checkpoint's weights
    policy, processor = M.load(cfg.init if cfg.lora_r else ckpt or cfg.init, device, run.weights_dtype(cfg.dtype))
    run.apply_memory_plan(policy, processor, cfg)
    run.warn_tiny_lr("grpo.py", cfg.lr, GRPOConfig.lr, policy)
    if state and cfg.lora_r:
        run.load_adapters(policy, state["adapters"])
    policy.train()
    net = torch.nn.parallel.DistributedDataParallel(policy) if world > 1 else policy   # the update goes through net
    ref = None
    if cfg.beta > 0 and not cfg.lora_r:   # the reference is the frozen init; at beta = 0 it is never loaded
        # in the policy's dtype and through the same path of completion_logprobs, so that
        # kl_ref is exactly 0 before the first update (a bf16 reference of a float32 policy was not)
        ref, _ = M.load(cfg.init, device, run.weights_dtype(cfg.dtype))
        if cfg.grad_checkpointing:
            ref.activation_checkpointing_enable({"use_reentrant": False})
        ref.eval().requires_grad_(False)

    def reference(roll):   # log pi_ref [N, T]; under LoRA the frozen init IS the policy with its adapters off
        if cfg.lora_r:
            with run.adapters_off(policy):
                return logprobs(policy, roll, cfg.micro_batch, cfg.temperature)
        return logprobs(ref, roll, cfg.micro_batch, cfg.temperature)

    frame = M.image_frame(processor, data.GEMEX_FRAME)           # gemex boxes move 224 -> the frame the model sees
    train = data.load("train", cfg.train_size or None, cfg, frame)
    if cfg.types:                  # a curriculum: RL where SFT left headroom (evaluation still sees all types)
        keep = set(cfg.types.split(","))
        train = train.filter(lambda q: q in keep, input_columns="question_type")
    if len(train) < cfg.prompts:   # a small real file, or a --types filter
        raise SystemExit(f"grpo.py: {len(train)} training prompts" + (f" of --types {cfg.types}" if cfg.types else "")
                         + f", fewer than --prompts {cfg.prompts}")
    val = data.load("validation", cfg.eval_n, cfg, frame)[:]
    if not val["question"]:
        print("grpo.py: no validation rows: in-training validation skipped (evaluate.py --split picks another)")
    if not cfg.max_new_tokens:
        cfg.max_new_tokens = M.completion_budget(processor, train["response"])
    weights = {k: getattr(cfg, f"w_{k}") for k in reward.REWARDS}
    opt = run.adamw([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    B, G = cfg.prompts, cfg.group_size
    vocab = policy.get_output_embeddings().weight.shape[0]         # the model's, not the tokenizer's
    pieces = token_pieces(processor.tokenizer, vocab)                                         # [V]
    is_digit = digit_tokens(pieces) if cfg.credit == "span" else None                        # [V]
    print(f"{cfg.init}: {sum(p.numel() for p in policy.parameters()):,} parameters; {B} prompts x {G} "
          f"completions per step; reward weights {weights}")
    start, order, bad = 0, [], 0
    if state:   # everything the next step depends on: weights (loaded above), optimizer, prompt order, RNG
        opt.load_state_dict(state["optimizer"])
        start, order = state["step"], state["order"]
        run.set_rng_state(state["rng"])
    log = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if master else None
    stop, t_start, timings = run.StopOnCtrlC(), time.time(), []
    bar = tqdm(range(start, cfg.max_steps), desc="grpo", initial=start, total=cfg.max_steps, disable=not master)
    for step in bar:
        t0 = time.time()
        if len(order) < B * world:     # a fresh seeded permutation of the prompts each epoch, the same on every rank
            order += torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + step)).tolist()
        rows, order = train[order[rank * B:(rank + 1) * B]], order[B * world:]   # each rank: its own B prompts

        # ---- 1. rollout: G samples per prompt from the current policy (= pi_old)
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            roll = M.sample(policy, processor, rows["image"], rows["question"], G, cfg.max_new_tokens,
                            cfg.temperature)
        mask = roll["completion_mask"]                                            # [N, T], N = B*G
        lengths = mask.sum(1)                                                     # [N], before any dropping
        if cfg.drop_truncated:
            mask = mask * (~roll["truncated"]).float().unsqueeze(1)
        roll["completion_mask"] = mask
        t1 = time.time()

        # ---- 2. reward: each completion against its prompt's reference response
        scores = [reward.score(text, rows["response"][i // G], rows["question_type"][i // G], weights,
                               frame=rows["image"][i // G].size) for i, text in enumerate(roll["texts"])]
        rewards = torch.tensor([s["total"] for s in scores], device=device)      # [N]

        # ---- 3. advantage: relative to the group
        if cfg.credit == "sequence":    # [N]: one advantage per completion (the paper's GRPO)
            adv = advantages(rewards, G, cfg.adv_norm)
        else:                           # [N, T]: each reward credited to the tokens that decide it (beyond the paper)
            adv = token_advantages(cfg, scores, roll, rows["response"], pieces, is_digit, weights, G)
        t2 = time.time()

        # ---- 4. log-probs of the rollout under pi_old (and pi_ref), before any update
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            old = logprobs(policy, roll, cfg.micro_batch, cfg.temperature) if cfg.mu > 1 else None   # [N, T]
            ref_logp = reference(roll) if cfg.beta > 0 else None                                  # [N, T]
        t3 = time.time()

        # ---- 5. mu passes, one optimizer step each; micro-batches accumulate the whole rollout's gradient
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        for _ in range(cfg.mu):
            loss, stats = accumulate_gradients(net, roll, adv, old, ref_logp, cfg, amp)
            loss = run.ddp_mean(loss)       # the same on every rank, so all ranks agree on skipping
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
            finite = bool(np.isfinite(loss) and torch.isfinite(grad_norm))
            if finite:                   # a NaN/inf update would poison every weight: skip it
                opt.step()
            opt.zero_grad(set_to_none=True)
            bad = 0 if finite else bad + 1
        t4 = time.time()

        # ---- diagnostics (every step) and a periodic look at samples and held-out greedy scores
        groups = rewards.view(B, G)
        split = {"time_generate": t1 - t0, "time_score": t2 - t1, "time_reference": t3 - t2, "time_train": t4 - t3}
        timings.append(list(split.values()))
        rec = {"step": step + 1, "loss": loss, "lr": lr, "skipped": int(not finite),
               **{f"reward_{k}": float(np.mean([s[k] for s in scores])) for k in reward.REWARDS},
               "reward": float(rewards.mean()), "reward_std": float(rewards.std()),
               "zero_std_groups": float((groups.std(1) < 1e-6).float().mean()),
               "length_mean": float(lengths.float().mean()), "length_max": int(lengths.max()),
               "truncated": float(roll["truncated"].float().mean()),
               **stats,
               "grad_norm": float(grad_norm),
               **split, "elapsed_s": round(time.time() - t_start, 1)}
        bar.set_postfix(reward=f"{rec['reward']:.3f}", answer=f"{rec['reward_answer']:.2f}",
                        iou=f"{rec['reward_iou']:.2f}", len=f"{rec['length_mean']:.0f}")
        if master and cfg.show_every and (step + 1) % cfg.show_every == 0:   # what GRPO sees: rollouts.py
            page = rollouts.write_step(os.path.join(cfg.out, "rollouts"), step + 1, rollouts.step_record(
                step + 1, cfg.credit, roll, rows, scores, adv, lengths, pieces), cfg.show_every)
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
        if run.after_step("grpo.py", cfg, step + 1, bad, stop, policy, processor,
                        lambda: {"optimizer": opt.state_dict(), "order": order, "rng": run.rng_state(),
                                 "adapters": run.adapter_state(policy)}):
            return

    run.ddp_check_in_sync(policy)
    if master and len(timings) > 1:   # the benchmark line (README, "Speed"): compare settings by its ratios
        t = np.mean(timings[1:], 0)   # step 1 warms up the allocator: not counted
        print(f"seconds per step over steps {start + 2}-{cfg.max_steps}: {t.sum():.2f} = generate {t[0]:.2f} "
              f"+ score {t[1]:.2f} + reference {t[2]:.2f} + train {t[3]:.2f}")
    if master:
        run.save(policy, processor, cfg.out, into=True)
        print(f"saved {cfg.out} after {time.time() - t_start:.0f} s{run.peak_memory(device)}")


if __name__ == "__main__":
    main(run.parse_config(GRPOConfig, __doc__))
