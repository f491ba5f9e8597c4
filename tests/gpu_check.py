"""One CUDA GPU, no network: measure the README's card table instead of estimating it.

Builds random-init Qwen2.5-VL-3B (then 7B, while time allows) from the hub's configs
(tests/qwen_lookalike.py) in bf16 on the GPU and runs the scripts' own functions on 224-px films
(64 image tokens, as a GEMeX film): an SFT step and a GRPO step (rollout B = 8 prompts x G = 8,
every completion running to the budget T, as a random model's do), for LoRA r = 16 and for full
bf16, T 160 and 256, micro-batch 8 and 4, with and without gradient checkpointing, beta > 0.
Prints a markdown table of peak torch.cuda.max_memory_allocated and seconds per phase, the
merged save's peak, whether shared-prefill and per-row log-probs agree in bf16 with left
padding, and how many sampled ids a sampler that bans only the vision tokens (the old one) drew
from the vocabulary tail. A cell that runs out of memory says OOM.

    python tests/gpu_check.py --out gpu.md        # one GPU: ~4-7 minutes on an H100
    python tests/gpu_check.py --toy               # the same code on CPU at toy widths (a dry run)
"""
import argparse
import gc
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import grpo  # noqa: E402
import memory  # noqa: E402
import model as M  # noqa: E402
import reward  # noqa: E402
import sft  # noqa: E402
import qwen_lookalike as Q  # noqa: E402

GIB = 2 ** 30


class Meter:
    """Peak GPU memory and seconds of one phase (on the CPU: seconds only)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.time()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.time() - self.t0
        self.peak = torch.cuda.max_memory_allocated() / GIB if self.cuda else float("nan")


def cell(fn, device):
    """Run fn under a Meter: (peak GiB, seconds, fn's result) or ('OOM', ...)."""
    try:
        with Meter(device) as m:
            out = fn()
        return m.peak, m.seconds, out
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return "OOM", float("nan"), None


def batch(n, frame):
    rows = [data.make_sample("train", i, frame=frame) for i in range(n)]
    return {k: [r[k] for r in rows] for k in rows[0]}


def measure(size, device, budgets, rows_out, notes):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    frame = 112 if size == "toy" else 224
    B = G = 2 if size == "toy" else 8            # the dry run: the same code on a CPU-sized rollout
    with tempfile.TemporaryDirectory() as tmp:
        Q.write_tokenizer(tmp)
        processor = M.ImageOnlyProcessor.from_pretrained(tmp)
    processor.tokenizer.padding_side = "left"
    rows = batch(B, frame)
    # a long trace: ~100 words, as GEMeX's
    trace = rows["response"][0][:-len("</think><answer>no</answer>")]
    sft_rows = dict(rows, response=[(trace + " ") * 6 + "</think><answer>no</answer>"] * B)

    def add(mode, what, peak, seconds):
        rows_out.append((size, mode, what, peak, seconds))
        p = peak if isinstance(peak, str) else "n/a" if peak != peak else f"{peak:.1f}"
        print(f"| {size} | {mode} | {what} | {p} | {seconds:.1f} |", flush=True)

    # -- the vocabulary tail, with the old sampler (vision tokens banned, nothing else)
    model = Q.build_model(size, device, dtype, tail_scale=1.0)
    vision = torch.tensor(processor.tokenizer.convert_tokens_to_ids(M.VISION_TOKENS))
    keep = M.text_support
    M.text_support = lambda m, t: ~torch.isin(torch.arange(Q.VOCAB), vision)
    torch.manual_seed(0)
    old = M.sample(model, processor, rows["image"], rows["question"], G, 64, 0.7)["completion_ids"]
    M.text_support = keep
    notes.append(f"{size}: the old sampler drew {int((old >= Q.N_TOKENS).sum())} ids past the "
                 f"tokenizer in {old.numel():,} sampled tokens (a random model: ~271/151,936 of "
                 f"them)")

    # -- shared-prefill vs per-row log-probs, bf16, left padding (the prompts differ in length)
    roll = M.sample(model, processor, rows["image"], rows["question"], 2, 32, 0.7)
    with torch.no_grad():
        shared = M.completion_logprobs(model, roll["prompt"], roll["completion_ids"],
                                       roll["completion_mask"], repeats=2, support=roll["support"])
        model.activation_checkpointing_enable({"use_reentrant": False})  # -> the per-row path
        per_row = M.completion_logprobs(model, roll["prompt"], roll["completion_ids"],
                                        roll["completion_mask"], repeats=2, support=roll["support"])
        model.activation_checkpointing_disable()
    m = roll["completion_mask"] > 0
    notes.append(f"{size}: shared-prefill vs per-row log-probs in {dtype}: max |diff| "
                 f"{(shared - per_row)[m].abs().max():.3f} nats, mean "
                 f"{(shared - per_row)[m].abs().mean():.4f}, finite "
                 f"{bool(torch.isfinite(shared[m]).all())}, "
                 f"{bool(torch.isfinite(per_row[m]).all())}")
    rollouts = {}
    for T in budgets:  # one rollout per budget, shared by every cell
        torch.manual_seed(0)
        peak, sec, rollouts[T] = cell(lambda: M.sample(model, processor, rows["image"],
                                                       rows["question"], G, T, 0.7),
                                      device)
        add("any", f"GRPO generate, B {B} x G {G}, T {T}", peak, sec)
    del model
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None

    for mode in ("LoRA r=16", "full bf16"):
        model = Q.build_model(size, device, dtype, tail_scale=1.0)
        lora = mode.startswith("LoRA")
        memory.apply_memory_plan(model, processor,
                              memory.MemoryFlags(lora_r=16 if lora else 0, dtype="bfloat16"))
        model.train()
        ref = (None if lora
               else Q.build_model(size, device, dtype, tail_scale=1.0).eval().requires_grad_(False))
        opt = memory.adamw([p for p in model.parameters() if p.requires_grad], 1e-5, (0.9, 0.99))
        end = M.end_ids(model)[0]
        for ckpt in (False, True):
            if ckpt:
                plan = memory.MemoryFlags(grad_checkpointing=True)
                memory.apply_memory_plan(model, processor, plan)
            tag = ", checkpointing" if ckpt else ""

            def sft_step():
                b = sft.sft_batch(processor, {k: v[:min(4, B)] for k, v in sft_rows.items()}, end,
                                  device)
                sft.token_mean_backward(model, [b])
                opt.step()
                opt.zero_grad(set_to_none=True)
            peak, sec, _ = cell(sft_step, device)
            add(mode, f"SFT step, batch {min(4, B)} x "
                      f"~{len(processor.tokenizer(sft_rows['response'][0])['input_ids'])} "
                      f"tokens{tag}", peak, sec)
            for T in budgets:
                roll = rollouts[T]
                if roll is None:
                    continue
                for mb in (8, 4) if size != "toy" else (4, 2):
                    cfg = grpo.GRPOConfig(beta=0.04, micro_batch=mb, max_new_tokens=T)

                    def grpo_step():
                        scores = [reward.score(t, rows["response"][i // G],
                                               rows["question_type"][i // G])
                                  for i, t in enumerate(roll["texts"])]
                        adv = grpo.advantages(torch.tensor([s["total"] for s in scores],
                                                           device=device) +
                                              torch.rand(B * G, device=device) * 0.01, G, "batch")
                        if lora:
                            with memory.adapters_off(model):
                                ref_logp = grpo.logprobs(model, roll, mb, 0.7)
                        else:
                            ref_logp = grpo.logprobs(ref, roll, mb, 0.7)
                        grpo.accumulate_gradients(model, roll, adv, None, ref_logp, cfg)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    peak, sec, _ = cell(grpo_step, device)
                    add(mode, f"GRPO step (reference + update), T {T}, micro-batch {mb}{tag}", peak,
                        sec)
            if ckpt:
                model.activation_checkpointing_disable()
        if lora:
            with tempfile.TemporaryDirectory() as tmp:
                peak, sec, _ = cell(lambda: memory.save_merged(model, tmp), device)
            add(mode, "merged save (streamed, on the CPU)", peak, sec)
        del model, ref, opt
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="toy widths on the CPU: the dry run")
    ap.add_argument("--sizes", default="3b,7b",
                    help="model sizes, in order (7B is skipped past --budget-s / 2)")
    ap.add_argument("--budget-s", type=float, default=420,
                    help="stop starting new sizes after this many seconds")
    ap.add_argument("--out", default="", help="also write the table to this markdown file")
    a = ap.parse_args()
    device = torch.device("cpu" if a.toy else "cuda")
    sizes = ["toy"] if a.toy else a.sizes.split(",")
    budgets = (16, 24) if a.toy else (160, 256)
    name = "CPU" if a.toy else torch.cuda.get_device_name()
    print(f"device {name}, torch {torch.__version__}\n\n| model | mode | what | peak GiB | seconds "
          f"|\n| --- | --- | --- | --- | --- |")
    t0, rows, notes = time.time(), [], []
    for size in sizes:
        if size != sizes[0] and time.time() - t0 > a.budget_s / 2:
            notes.append(f"{size}: skipped, {time.time() - t0:.0f} s spent")
            continue
        measure(size, device, budgets, rows, notes)
    print("\n" + "\n".join(f"- {n}" for n in notes) + f"\n- total {time.time() - t0:.0f} s")
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"device {name}\n\n| model | mode | what | peak GiB | seconds |\n| --- | --- | "
                    f"--- | --- | --- |\n")
            for size, mode, what, peak, sec in rows:
                p = peak if isinstance(peak, str) else "n/a" if peak != peak else f"{peak:.1f}"
                f.write(f"| {size} | {mode} | {what} | {p} | {sec:.1f} |\n")
            f.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")


if __name__ == "__main__":
    main()
