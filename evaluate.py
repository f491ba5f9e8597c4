"""evaluate.py -- how good is a checkpoint, and is B really better than A?

    python evaluate.py --checkpoint runs/sft
    python evaluate.py --checkpoint runs/sft runs/grpo --json results.json
    python evaluate.py --checkpoint runs/sft_s0 runs/sft_s1 runs/sft_s2 \
                       --against runs/grpo_s0 runs/grpo_s1 runs/grpo_s2      # over seeds

Greedy decoding on the same held-out samples for every checkpoint, scored by reward.py. One
table of metrics, then -- with two or more checkpoints -- the paired difference of each metric
against the first checkpoint with a 95% paired-bootstrap interval: the samples are the same, so
we resample samples (not checkpoints) and the interval says whether a gain of a few points on a
thousand questions is more than noise for THAT pair of runs. Whether a training change helps is
another question: another seed of the same pipeline lands elsewhere, often by more than the
sample noise. With --against, checkpoint i is paired with against i (the same seed of two
pipelines): each seed's paired difference, then their mean over seeds with a t interval over the
per-seed differences (seed_interval), which carries the spread between seeds. A PNG gallery
shows what the numbers mean.

Metrics (each a mean over samples):
  format_rate     well-formed <think>/<answer> with at least one valid box
  accuracy        exact answer check for the question type (also per type)
  mean_iou        dense IoU: optimal matched IoU / max(#predicted, #reference boxes)
  iou50_rate      fraction with dense IoU >= 0.5
  grounding_rate  the paper's rule: same number of boxes and mean matched IoU > 0.75
  consistency_rate  the answer is the one the completion's OWN reasoning implies (right or wrong):
                  the regions it grounds and what it says about them decide the question
                  (implied_answer); reasoning that never describes the asked region counts as
                  unsupported. Defined by the synthetic question templates (not for --data gemex).
  count_rate      as many boxes as the reference (half of the paper's grounding rule)
  n_boxes         boxes per completion (the reference's mean is printed under the table)
  mean_length     completion length in tokens, end-of-turn token included
"""
import json
import os
import re
import textwrap
from dataclasses import dataclass

import matplotlib
matplotlib.use("Agg")              # files only: no display needed (CI, a server over ssh)
import matplotlib.pyplot as plt   # noqa: E402
import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import model as M
import reward
import rollouts
import run

METRICS = ["format_rate", "accuracy", "mean_iou", "iou50_rate", "grounding_rate",
           "consistency_rate", "count_rate", "n_boxes", "mean_length"]
UNBOUNDED = ("n_boxes", "mean_length")
SPLITS = ("test", "validation", "train")   # not rates in [0, 1], and no side of them is better


# ----------------------------------------------------------------------------- config
# Inherited flags: --data, --data-path, --image-root (data.DataFlags).
@dataclass
class EvalConfig(data.DataFlags):
    checkpoint: str = "runs/sft"     # one or more checkpoint directories, space separated
    against: str = ""                # as many baselines, one per --checkpoint (a seed each)
    split: str = "test"  # 'test', 'validation' or 'train' (a small file may hold no test image)
    n: int = 1000                    # samples evaluated, the same ones for every checkpoint
    batch_size: int = 100            # prompts per generate call
    max_new_tokens: int = 0          # tokens per answer (0: 1.25x the references' 99th pct, >= 160)
    json: str = ""                   # also write the numbers to this JSON file
    gallery: str = "gallery.png"     # PNG gallery of a few samples per checkpoint ('' to skip)
    curves: str = ""  # PNG of the training curves in each checkpoint's metrics.jsonl ('' to skip)
    bootstrap: int = 2000            # paired-bootstrap resamples for the confidence intervals
    device: str = "auto"             # 'auto' (CUDA if available), 'cpu' or 'cuda'
    dtype: str = "auto"              # weights: 'auto' (bf16 on a bf16 GPU, else fp32) or a dtype
    predictions: str = ""            # write a JSON line per sample (for a judge) and a page of them


def check(cfg):
    """Flag values that cannot work, named, before anything is loaded."""
    size = {"test": data.DataConfig.n_test, "validation": data.DataConfig.n_val,
            "train": data.DataConfig.n_train}
    size = size.get(cfg.split, 0)
    for ok, msg in ((cfg.split in SPLITS, f"--split must be one of {', '.join(SPLITS)}"),
                    *data.DataFlags.problems(cfg),
                    (cfg.n >= 1 and (cfg.data != "synthetic" or cfg.n <= size),
                     f"--n must be in 1..{size}"),
                    (cfg.batch_size >= 1 and cfg.max_new_tokens >= 0 and cfg.bootstrap >= 1,
                     "--batch-size and --bootstrap must be >= 1, --max-new-tokens >= 0"),
                    (cfg.dtype in ("auto", "float32", "bfloat16"),
                     "--dtype must be auto, float32 or bfloat16")):
        if not ok:
            raise SystemExit(f"evaluate.py: {msg}")


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def greedy_scores(model, processor, rows, batch_size=100, max_new_tokens=160):
    """Greedy completions for every row (a dict of lists) -> per-row reward.score dicts, each with
    the completion `length` in tokens added, and the texts. sft.py validates with this too.
    (model.sample switches the model to eval mode for generation and back.)"""
    scores, texts = [], []
    for i in range(0, len(rows["question"]), batch_size):
        batch = {k: v[i: i + batch_size] for k, v in rows.items()}
        out = M.sample(model, processor, batch["image"], batch["question"], greedy=True,
                       max_new_tokens=max_new_tokens)
        for text, ref, qtype, length, image in zip(out["texts"], batch["response"],
                                                   batch["question_type"],
                                                   out["completion_mask"].sum(1).tolist(),
                                                   batch["image"]):
            scores.append(dict(reward.score(text, ref, qtype, image_size=image.size),
                               length=float(length)))
            texts.append(text)
    return scores, texts


def greedy_means(model, processor, rows, max_new_tokens):
    """The periodic validation of sft.py and grpo.py: greedy answers on a few rows, scored as
    above -> the mean of each reward component (all in [0, 1]) and of the length in tokens, and
    one example completion.
    max_new_tokens: sized from the data (model.completion_budget), or real traces are cut off."""
    scores, texts = greedy_scores(model, processor, rows, max_new_tokens=max_new_tokens)
    return {k: sum(s[k] for s in scores) / len(scores)
            for k in (*reward.REWARDS, "length")}, texts[0]


def run_checkpoint(path, cfg, device, rows=None):
    """Load a checkpoint and score it -> (per-sample records keyed like METRICS, texts, rows).
    The rows are loaded with the first checkpoint, at the frame its processor gives images."""
    dtype = ({"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.dtype)
             or run.pick_device(str(device))[1])
    model, processor = M.load(path, device, dtype)
    if rows is None:
        frame = M.image_frame(processor, data.GEMEX_FRAME)
        rows = data.load(cfg.split, cfg.n, cfg, frame)[:]  # dict of lists
        if not rows["question"]:
            others = " or ".join(f"--split {s}" for s in SPLITS if s != cfg.split)
            raise SystemExit(f"evaluate.py: the {cfg.split} split of {cfg.data_path} is empty; "
                             f"evaluate {others}")
        if not cfg.max_new_tokens:
            cfg.max_new_tokens = M.completion_budget(processor, rows["response"])
    scores, texts = greedy_scores(model, processor, rows, cfg.batch_size, cfg.max_new_tokens)
    records = []
    for s, text, ref, q, qt in zip(scores, texts, rows["response"], rows["question"],
                                   rows["question_type"]):
        n_boxes, n_ref = len(reward.parse(text).boxes), len(reward.parse(ref).boxes)
        records.append({"format_rate": s["format"], "accuracy": s["answer"], "mean_iou": s["iou"],
                        "iou50_rate": float(s["iou"] >= 0.5), "grounding_rate": s["grounding"],
                        "consistency_rate": consistency(text, q, qt),
                        "count_rate": float(n_boxes == n_ref),
                        "n_boxes": float(n_boxes), "mean_length": s["length"], "question_type": qt})
    return records, texts, rows


# ------------------------------------------ consistency: does the answer follow from the reasoning?
def stated_findings(think):
    """What a reasoning text says about each region it names: {region: finding, or NO_FINDING if it
    calls the region clear}. Reads the sentences data.describe writes (and a model imitates)."""
    said = {}
    for region, rest in re.findall(r"The ([a-z ]+?) \[[^\]]{0,40}\] ([^.]{0,60})\.", think or ""):
        kind = next((k for k, (_, d) in data.FINDINGS.items() if rest == f"shows {d}"), None)
        if region in data.REGIONS and (kind or rest in ("is clear", "has a normal outline")):
            said.setdefault(region, kind or data.NO_FINDING)
    return said


def implied_answer(question, think):
    """The answer a reasoning text implies for a synthetic question, or None when it does not
    decide it (the asked region is never described). consistency() compares it with the answer
    the same completion gives: does the answer follow from the model's own grounded reasoning?"""
    said = stated_findings(think)
    opts = dict(re.findall(r"([A-D])\. ((?:(?! [A-D]\. )[^?])+)", question))
    def letter(pick):
        return ", ".join(k for k, o in sorted(opts.items()) if pick(o.strip())) or None
    asked = (("cardiomegaly", "cardiac silhouette")
             if question == "Is the cardiac silhouette enlarged?" else None)
    if m := re.fullmatch(r"Is there (?:a |an )?(.+) in the (.+)\?", question):
        asked = next((k for k, a in data.ARTICLE.items() if a == m[1] or k == m[1]), m[1]), m[2]
    if asked:  # yes/no: is that finding stated for that region?
        kind, region = asked
        return None if region not in said else "yes" if said[region] == kind else "no"
    if m := re.match(r"Where is the (.+)\?$", question):
        where = [r for r, k in said.items() if k == m[1]]
        return where[0] if len(where) == 1 else None
    if m := re.match(r"What abnormality is seen in the (.+?)\?", question):
        if m[1] not in said:
            return None
        return letter(lambda o: o == said[m[1]]) if opts else said[m[1]]
    if m := re.match(r"Which region contains the (.+?)\?", question):
        return letter(lambda o: said.get(o) == m[1])
    if m := re.match(r"Which of these regions (are abnormal|appear normal)\?", question):
        if any(o.strip() not in said for o in opts.values()):
            return None
        return letter(lambda o: (said[o] != data.NO_FINDING) == (m[1] == "are abnormal"))
    return None


def consistency(completion, question, question_type):
    """1.0 when the completion's answer is the one its own reasoning implies (see module doc)."""
    p = reward.parse(completion)
    implied = implied_answer(question, p.think)
    return reward.answer_correct(p.answer, implied, question_type) if implied is not None else 0.0


def summarise(path, records):
    """Per-sample records -> the stable JSON object of one checkpoint."""
    out = {"checkpoint": path, "n": len(records)}
    for m in METRICS:
        out[m] = float(np.mean([r[m] for r in records]))
    out["accuracy_by_type"] = {t: float(np.mean([r["accuracy"] for r in records
                                                 if r["question_type"] == t] or [0.0]))
                               for t in data.QUESTION_TYPES}
    return out


def paired_bootstrap(a, b, n_boot, seed=0):
    """Mean of b - a over paired samples, with a 95% percentile-bootstrap interval."""
    diff = np.asarray(b) - np.asarray(a)
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(n_boot, len(diff)))
    boots = diff[idx].mean(1)
    return {"diff": float(diff.mean()), "lo": float(np.percentile(boots, 2.5)),
            "hi": float(np.percentile(boots, 97.5))}


# t(0.975) with 1..30 degrees of freedom: the 95% interval of a mean over a few seeds
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def seed_interval(deltas):
    """The mean of per-seed paired differences with a 95% t interval over the seeds:
    mean +- t(0.975, n-1) sd / sqrt(n). Each seed's difference already holds its own sample
    noise on these test samples, so the spread between them is seed-to-seed AND sample noise;
    a bootstrap over 3-5 seeds would be degenerate (3 seeds have 10 distinct resamples), and one
    over seeds x samples pooled treats seeds as if they were more samples of one run. This
    interval answers: would another seed of the same two pipelines differ the same way? It does
    not cover another test set (every seed is scored on the same samples)."""
    d = np.asarray(deltas, dtype=float)
    if len(d) < 2:
        return {"diff": float(d.mean()), "lo": float("nan"), "hi": float("nan")}
    half = (T975[len(d) - 2] if len(d) <= 31 else 1.96) * d.std(ddof=1) / np.sqrt(len(d))
    return {"diff": float(d.mean()), "lo": float(d.mean() - half), "hi": float(d.mean() + half)}


def verdict(metric, v):
    if metric in UNBOUNDED:       # length and box count have no good side
        up, down = ("longer", "shorter") if metric == "mean_length" else ("more", "fewer")
        return up if v["lo"] > 0 else down if v["hi"] < 0 else "no clear difference"
    return "better" if v["lo"] > 0 else "worse" if v["hi"] < 0 else "no clear difference"


def majority_baseline(rows):
    """Accuracy of always giving the most frequent reference answer of each question type:
    the 'chance level' a trained model must beat."""
    out = {}
    for t in data.QUESTION_TYPES:
        answers = [reward.parse(r).answer for r, q in zip(rows["response"], rows["question_type"])
                   if q == t]
        best = max(set(answers), key=answers.count) if answers else ""
        out[t] = (float(np.mean([reward.answer_correct(best, a, t) for a in answers])) if answers
                  else 0.0)
    return out


# ----------------------------------------------------------------------------- report
def write_predictions(path, checkpoints, records, texts, rows):
    """One JSON line per (checkpoint, sample): what was asked, the reference, the completion and
    every reward component, so that any judge (an LLM, a radiologist) can score it afterwards."""
    with open(path, "w") as f:
        for c, recs, outs in zip(checkpoints, records, texts):
            for i, (r, text) in enumerate(zip(recs, outs)):
                f.write(json.dumps({"checkpoint": c, "image_path": rows["image_path"][i],
                                    "question": rows["question"][i],
                                    "question_type": rows["question_type"][i],
                                    "reference": rows["response"][i],
                                    "completion": text, "format": r["format_rate"],
                                    "answer": r["accuracy"],
                                    "grounding": r["grounding_rate"], "iou": r["mean_iou"],
                                    "consistency": r["consistency_rate"],
                                    "length": r["mean_length"]}) + "\n")
    print(f"wrote {path}: {sum(map(len, records))} predictions")


def print_table(summaries, baseline, ref_boxes):
    short = {t: t.split("_")[0] for t in data.QUESTION_TYPES}
    cols = METRICS + [f"acc_{short[t]}" for t in data.QUESTION_TYPES]
    heads = []
    for c in cols:
        for long, short in (("_rate", ""), ("mean_", ""), ("consistency", "consist."),
                            ("accuracy", "acc")):
            c = c.replace(long, short)
        heads.append(c)
    print(f"{'checkpoint':<28}" + "".join(f"{c:>11}" for c in heads))
    for s in summaries:
        vals = [s[m] for m in METRICS] + [s["accuracy_by_type"][t] for t in data.QUESTION_TYPES]
        cells = [f"{v:>11.2f}" if c in UNBOUNDED else f"{v:>11.3f}" for c, v in zip(cols, vals)]
        print(f"{s['checkpoint'][-28:]:<28}" + "".join(cells))
    print(f"{'majority-answer baseline':<28}" + " " * 11 * len(METRICS) +
          "".join(f"{baseline[t]:>11.3f}" for t in data.QUESTION_TYPES))
    print(f"{'reference':<28}" + " " * 11 * METRICS.index("n_boxes") + f"{ref_boxes:>11.2f}")


def paired_metrics(a, b, n_boot):
    """Every metric's paired difference b - a over the same samples, and accuracy per type."""
    out = {m: paired_bootstrap([x[m] for x in a], [x[m] for x in b], n_boot) for m in METRICS}
    for t in data.QUESTION_TYPES:
        keep = [i for i, x in enumerate(a) if x["question_type"] == t]
        if keep:
            acc_a, acc_b = [a[i]["accuracy"] for i in keep], [b[i]["accuracy"] for i in keep]
            out[f"acc_{t.split('_')[0]}"] = paired_bootstrap(acc_a, acc_b, n_boot)
    return out


def print_seeds(pairs, per_seed, mean):
    """One row per metric: each seed's paired difference, then their mean [95% t interval]."""
    print(f"\nover {len(pairs)} seeds, " + ", ".join(f"{b} minus {a}" for a, b in pairs))
    seeds = "".join(f"{f'seed {i}':>21}" for i in range(len(pairs)))
    print(f"{'':<16}{seeds}{'mean over seeds':>26}")
    for m, v in mean.items():
        cells = "".join(f"{p[m]['diff']:>+9.3f} [{p[m]['lo']:+.2f},{p[m]['hi']:+.2f}]"
                        for p in per_seed)
        interval = f"{v['diff']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}]"
        print(f"{m:<16}{cells}   {interval}  {verdict(m, v)}")


def gallery(path, rows, names, all_texts, k=4, per_row=2):
    """k samples per checkpoint, two to a row: the image with reference (green) and predicted
    (red) boxes, then the question, the model's reasoning and answer, and the reference answer."""
    k = min(k, len(rows["question"]))                 # --n below k: show what there is
    scale, text_w = 3, 430
    tile = rows["image"][0].height * scale
    cell_w, cell_h = tile + text_w, tile + 6
    n_rows = (k + per_row - 1) // per_row
    sheet = Image.new("RGB", (cell_w * per_row, (n_rows * cell_h + 20) * len(names)), "white")
    d = ImageDraw.Draw(sheet)
    for c, (name, texts) in enumerate(zip(names, all_texts)):
        top = c * (n_rows * cell_h + 20)
        d.text((4, top + 4), f"checkpoint: {name}", fill="black")
        for i in range(k):
            ref, pred = reward.parse(rows["response"][i]), reward.parse(texts[i])
            boxes = [b for _, b in ref.boxes] + [b for _, b in pred.boxes if reward.valid_box(b)]
            colours = ["#30d030"] * len(ref.boxes) + ["#ff3030"] * (len(boxes) - len(ref.boxes))
            x, y = (i % per_row) * cell_w, top + 20 + (i // per_row) * cell_h
            sheet.paste(data.draw_boxes(rows["image"][i], boxes, colours, scale), (x, y))
            lines = (textwrap.wrap("Q: " + rows["question"][i], 68) + [""]
                     + textwrap.wrap("model: " + texts[i], 68))
            lines += ["", f"reference answer: {ref.answer}"]
            d.multiline_text((x + tile + 8, y + 4), "\n".join(lines[:24]), fill="black")
    sheet.save(path)
    print(f"wrote {path}")


def curves(path, checkpoints, smooth=10):
    """Training curves from each checkpoint's metrics.jsonl, the runs side by side: the GRPO
    reward (a `smooth`-step moving mean: one step's reward is 64 noisy samples), then the
    held-out greedy accuracy and grounding rate at every periodic validation (sft.py, grpo.py)."""
    panels = [("reward", f"GRPO reward, {smooth}-step mean"),
              ("val_answer", "held-out accuracy (greedy)"),
              ("val_grounding", "held-out grounding rate (greedy)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for c in checkpoints:
        log = os.path.join(c, "metrics.jsonl")
        if not os.path.exists(log):
            print(f"curves: {c} has no metrics.jsonl, left out")
            continue
        recs = [json.loads(line) for line in open(log)]
        for ax, (key, _) in zip(axes, panels):
            pts = [(r["step"], r[key]) for r in recs if key in r]
            if key == "reward" and len(pts) >= smooth:  # moving mean, plotted at the window's end
                ys = np.convolve([y for _, y in pts], np.ones(smooth) / smooth, mode="valid")
                pts = list(zip([x for x, _ in pts][smooth - 1:], ys))
            if pts:
                ax.plot(*zip(*pts), marker="o" if key != "reward" else None, ms=3, label=c)
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title), ax.set_xlabel("step"), ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)                                 # every run has validations
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- main
def main(cfg, checkpoints, against=()):
    check(cfg)
    if against and len(against) != len(checkpoints):
        raise SystemExit(f"evaluate.py: --against takes one checkpoint per --checkpoint "
                         f"({len(against)} for {len(checkpoints)})")
    device, _ = run.pick_device(cfg.device)
    print(f"device {device}; {cfg.data} {cfg.split} split, {cfg.n} samples, greedy decoding")
    names = list(dict.fromkeys([*checkpoints, *against]))   # each evaluated once
    rows, records, texts = None, {}, {}
    for c in names:                     # the same rows for every checkpoint: paired comparisons
        records[c], texts[c], rows = run_checkpoint(c, cfg, device, rows)
    summaries = [summarise(c, records[c]) for c in names]
    print_table(summaries, majority_baseline(rows),
                np.mean([len(reward.parse(r).boxes) for r in rows["response"]]))
    result = summaries[0] if len(summaries) == 1 else {"checkpoints": summaries}
    if against:                         # seed i of one pipeline against seed i of the other
        pairs = list(zip(checkpoints, against))
        per_seed = [paired_metrics(records[a], records[b], cfg.bootstrap) for a, b in pairs]
        mean = {m: seed_interval([p[m]["diff"] for p in per_seed]) for m in per_seed[0]}
        print_seeds(pairs, per_seed, mean)
        result["seeds"] = {"pairs": pairs, "per_seed": per_seed, "mean": mean}
    elif len(names) > 1:                # each checkpoint against the first
        result["paired"] = []
        for c in names[1:]:
            diffs = paired_metrics(records[names[0]], records[c], cfg.bootstrap)
            result["paired"].append({"checkpoint": c, "baseline": names[0], "metrics": diffs})
            print(f"\n{c} minus {names[0]} (95% paired bootstrap interval):")
            for m, v in diffs.items():
                print(f"  {m:<16} {v['diff']:+8.3f}  [{v['lo']:+.3f}, {v['hi']:+.3f}]  "
                      f"{verdict(m, v)}")
    if cfg.predictions:
        write_predictions(cfg.predictions, names, [records[c] for c in names],
                          [texts[c] for c in names], rows)
        rollouts.write_best_and_worst(os.path.splitext(cfg.predictions)[0] + ".html", rows,
                                      texts[names[-1]], names[-1])
    if cfg.json:
        json.dump(result, open(cfg.json, "w"), indent=2)
        print(f"wrote {cfg.json}")
    if cfg.gallery:
        gallery(cfg.gallery, rows, names, [texts[c] for c in names])
    if cfg.curves:
        curves(cfg.curves, names)
    return result


if __name__ == "__main__":
    cfg = run.parse_config(EvalConfig, __doc__, nargs={"checkpoint": "+", "against": "+"})
    listed = lambda v: v if isinstance(v, list) else [v] if v else []  # noqa: E731
    main(cfg, listed(cfg.checkpoint), listed(cfg.against))
