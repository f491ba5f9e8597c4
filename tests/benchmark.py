"""Benchmarks that print figures (not timed tests): run them on a quiet machine, compare ratios.

    python tests/benchmark.py grpo-vs-trl --init runs/sft  # grpo.py's step vs TRL's GRPOTrainer
    python tests/benchmark.py model --model runs/sft       # a checkpoint's step and sampling costs

grpo-vs-trl runs grpo.py and TRL's GRPOTrainer on the same checkpoint, prompts, batch (8 prompts x
8 completions), budget (160 new tokens), temperature (0.7), reward (reward.score), beta 0,
token-mean loss and every weight trained, each in its own process, interleaved A B A B so
drifting machine load hits both alike. Each run's seconds per step exclude its first step
(allocator warm-up). It prints every run, the mean completion length of each side (a faster step
over shorter completions is not faster) and the median ratio grpo.py / TRL.
TRL is not a dependency of this project:
    pip install trl==1.16.0      # the version measured in the README
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import data  # noqa: E402
import model as M  # noqa: E402
import run  # noqa: E402
import reward  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- one side per process
def run_grpo(a, out):
    """grpo.py itself, with its own per-step timer (steps 2..N) -> (s/step, mean length, note)."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "grpo.py"), "--init", a.init, "--out",
                        out,
                        "--max-steps", str(a.steps), "--prompts", str(a.prompts), "--group-size",
                        str(a.group_size),
                        "--max-new-tokens", str(a.max_new_tokens), "--temperature", "0.7", "--beta",
                        "0", "--freeze-vision", "false",     # TRL trains every weight
                        "--loss-agg", "token", "--eval-every", "0", "--eval-n", "1", "--show-every",
                        "0",
                        "--save-every", "0", "--seed", str(a.seed)], capture_output=True, text=True,
                        cwd=HERE)
    if r.returncode:
        raise SystemExit(f"grpo.py failed:\n{r.stderr[-2000:]}")
    line = next(x for x in r.stdout.splitlines() if x.startswith("seconds per step"))
    lengths = [json.loads(x)["length_mean"] for x in open(os.path.join(out, "metrics.jsonl"))][1:]
    seconds = float(line.split(": ")[1].split(" = ")[0])
    return seconds, sum(lengths) / len(lengths), line.split(" = ")[1]


def run_trl(a, out):
    """TRL's GRPOTrainer with grpo.py's settings under TRL's names (README: From grpo.py to TRL)"""
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from datasets import Dataset

    torch.manual_seed(a.seed)
    policy, processor = M.load(a.init)
    frame = M.image_frame(processor, data.GEMEX_FRAME)
    train = data.load("train", None, data.DataFlags(), frame)
    # the prompts grpo.py draws in its first epoch (its seeded permutation), in the same order
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(a.seed)).tolist()
    rows = train[order[:a.prompts * a.steps]]
    ds = Dataset.from_dict({
        "prompt": [[{"role": "system", "content": [{"type": "text", "text": M.SYSTEM_PROMPT}]},
                    {"role": "user",
                     "content": [{"type": "image", "text": None}, {"type": "text", "text": q}]}]
                   for q in rows["question"]],
        "image": rows["image"], "response": rows["response"],
        "question_type": rows["question_type"]})

    def total_reward(prompts, completions, response, question_type, **kw):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [reward.score(t, r, q)["total"] for t, r, q in zip(texts, response, question_type)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.lengths = [], []

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    cfg = GRPOConfig(output_dir=out, max_steps=a.steps,
                     per_device_train_batch_size=a.prompts * a.group_size,
                     num_generations=a.group_size, max_completion_length=a.max_new_tokens,
                     temperature=0.7,
                     top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", num_iterations=1,
                     learning_rate=1e-4,
                     lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, epsilon=0.2,
                     epsilon_high=0.28,
                     scale_rewards="batch", logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True,
                     bf16=False, seed=a.seed, remove_unused_columns=False, dataloader_num_workers=0,
                     shuffle_dataset=False, gradient_checkpointing=False,
                       # TRL's defaults differ from grpo.py's
                     disable_tqdm=True)
    clock = Clock()
    trainer = GRPOTrainer(model=policy, reward_funcs=total_reward, args=cfg, train_dataset=ds,
                          processing_class=processor, callbacks=[clock])
    trainer.train()
    times, lengths = clock.times[1:], clock.lengths[1:]
    return sum(times) / len(times), sum(lengths) / max(len(lengths), 1), ""


def grpo_vs_trl(a):
    """A B A B ...: each run in a fresh process; prints each, then the median ratio."""
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: pip install trl==1.16.0 (not a dependency of this "
                         "project)")
    print(f"{a.init}: {a.prompts} prompts x {a.group_size} completions, {a.max_new_tokens} new "
          f"tokens max, {a.steps} steps a run (the first not counted), torch threads "
          f"{torch.get_num_threads()}, trl {trl.__version__}")
    ratios = []
    for pair in range(a.pairs):
        got = {}
        for side in ("grpo", "trl"):
            with tempfile.TemporaryDirectory() as tmp:
                r = subprocess.run([sys.executable, __file__, "one", side, "--init", a.init,
                                    "--out", tmp,
                                    *[f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                                      if k in ("steps", "prompts", "group_size", "max_new_tokens",
                                               "seed")]],
                                   capture_output=True, text=True, cwd=HERE)
            if r.returncode:
                raise SystemExit(f"{side} failed:\n{r.stderr[-3000:]}")
            got[side] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"pair {pair + 1} {side:4s}: {got[side]['s_per_step']:.2f} s/step, mean "
                  f"completion length {got[side]['length']:.1f} tokens {got[side]['split']}",
                  flush=True)
        ratios.append(got["grpo"]["s_per_step"] / got["trl"]["s_per_step"])
        print(f"pair {pair + 1} ratio grpo.py / TRL: {ratios[-1]:.2f}", flush=True)
    print(f"median ratio grpo.py / TRL over {a.pairs} interleaved pairs: "
          f"{statistics.median(ratios):.2f} (each: {', '.join(f'{r:.2f}' for r in ratios)})")


# ----------------------------------------------------------------------------- model costs
def model_costs(a):
    """Parameters, forward+backward at --batch-size on reference traces, and one rollout of
    n_prompts x G completions: the costs that size a training run on a given card."""
    device, amp = run.pick_device(a.device)
    model, processor = M.load(a.model, device)
    rows = [data.make_sample("train", i) for i in range(a.batch_size)]
    images, questions = [r["image"] for r in rows], [r["question"] for r in rows]
    print(f"{a.model} on {device} (autocast {amp}): {sum(p.numel() for p in model.parameters()):,} "
          f"parameters")
    prompt = M.build_prompts(processor, images, questions).to(device)
    ids, mask = M.tokenize_completions(processor, [r["response"] for r in rows],
                                       M.end_ids(model)[0])
    ids, mask = ids.to(device), mask.to(device)
    times = []
    for _ in range(a.repeats + 1):  # the first pass warms up allocators: not counted
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            loss = -(M.completion_logprobs(model, prompt, ids, mask) * mask).sum() / mask.sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    print(f"  forward+backward, batch {a.batch_size}: {min(times[1:]):.3f} s (best of {a.repeats})")
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            out = M.sample(model, processor, images[:a.prompts], questions[:a.prompts],
                           a.group_size, a.max_new_tokens, temperature=0.7)
        times.append(time.perf_counter() - t)
    print(f"  rollout {a.prompts} x {a.group_size} completions, {a.max_new_tokens} new tokens max "
          f"(mean length {out['completion_mask'].sum(1).mean():.0f}): {min(times):.3f} s (best of "
          f"{a.repeats})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["grpo-vs-trl", "model", "one"])
    ap.add_argument("side", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--init", default="runs/sft",
                    help="grpo-vs-trl: the checkpoint both sides start from")
    ap.add_argument("--model", default="tiny-qwen2.5-vl-cxr",
                    help="model: the tiny base, a Hub id or a checkpoint directory")
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=int, default=3, help="grpo-vs-trl: interleaved pairs of runs")
    ap.add_argument("--steps", type=int, default=6,
                    help="grpo-vs-trl: steps a run (the first is not counted)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=160,
                    help="generation budget per completion")
    ap.add_argument("--seed", type=int, default=0, help="seed of both sides")
    ap.add_argument("--batch-size", type=int, default=16,
                    help="model: sequences per forward+backward")
    ap.add_argument("--repeats", type=int, default=3, help="model: timed repeats (best is printed)")
    ap.add_argument("--device", default="auto",
                    help="model: 'auto' (CUDA if available), 'cpu' or 'cuda'")
    a = ap.parse_args()
    if a.what == "one":
        s, length, split = (run_grpo if a.side == "grpo" else run_trl)(a, a.out)
        print(json.dumps({"s_per_step": s, "length": length, "split": split}))
    elif a.what == "grpo-vs-trl":
        grpo_vs_trl(a)
    else:
        model_costs(a)
