"""data.py -- a synthetic, grounded chest X-ray VQA set in the GEMeX-ThinkVG schema.

Why synthetic? Real GEMeX-ThinkVG images come from MIMIC-CXR and need PhysioNet access, and
nothing can be downloaded here. So we draw simplified chest radiographs procedurally: the
anatomy is known exactly, so every region box is exact, and every image differs (size,
position, rotation, intensity, noise) so a box has to be *found by looking*, not memorised.

Every sample has the columns of a real GEMeX-ThinkVG row -- image_path, question,
question_type, response -- plus the decoded `image`, so sft.py / grpo.py / evaluate.py have
exactly one code path for synthetic and real data (gemex.py loads the real parquet into the same
columns; `load` below is the entry point for both).

    python data.py --preview          # writes preview.png: samples with their ground-truth boxes
    python data.py --stats            # question types, findings, regions, answer balance

Conventions (GEMeX): boxes are integer pixels [x1, y1, x2, y2] of the image the model sees
(x right, y down, x2/y2 exclusive). Radiological convention: the patient's RIGHT is on the
image's LEFT.
"""
import argparse
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from gemex import (GEMEX_FRAME, GEMEX_HUB_ID, QUESTION_TYPES, _features, _source_hash,  # noqa: F401
                   format_box, load_gemex, rescale_box)

# ----------------------------------------------------------------------------- config
@dataclass
class DataConfig:
    frame: int = 112  # synthetic image side in pixels (GEMeX uses 224; half is 4x cheaper on CPU)
    seed: int = 0           # master seed: same seed, same dataset, bit for bit
    n_train: int = 8000     # samples (= images) in the train split
    n_val: int = 500        # samples in the validation split
    n_test: int = 1000      # samples in the test split
    walk_options: bool = False  # region options: the trace checks each in turn, by letter

# the split id goes into the seed: no shared images
SPLITS = {"train": 0, "validation": 1, "test": 2}
STREAMS = {**SPLITS, "pretrain": 3}               # + pretrain.py's films and texts: never a split's

# Chest ImaGenome-style anatomical regions. "right"/"left" are the patient's.
REGIONS = ["right upper lung zone", "right mid lung zone", "right lower lung zone",
           "left upper lung zone", "left mid lung zone", "left lower lung zone",
           "right costophrenic angle", "left costophrenic angle",
           "cardiac silhouette", "upper mediastinum"]
LUNG_ZONES = REGIONS[:6]

# finding -> (regions it can occur in, how the reasoning describes it)
FINDINGS = {
    "nodule":           (LUNG_ZONES, "a small round opacity"),
    "mass":             (LUNG_ZONES, "a large dense opacity"),
    "consolidation":    ([r for r in LUNG_ZONES if "upper" not in r], "patchy airspace opacity"),
    "pneumothorax":     ([r for r in LUNG_ZONES if "upper" in r],
                         "a dark rim without lung markings"),
    "pleural effusion": (REGIONS[6:8], "fluid blunting the angle"),
    "cardiomegaly":     (["cardiac silhouette"], "an enlarged heart outline"),
}
ARTICLE = {"nodule": "a nodule", "mass": "a mass", "consolidation": "consolidation",
           "pneumothorax": "a pneumothorax", "pleural effusion": "a pleural effusion",
           "cardiomegaly": "cardiomegaly"}
NO_FINDING = "none"  # the open-ended answer for a region with nothing in it


# ----------------------------------------------------------------------------- boxes
def _mask_box(mask):
    """Tight integer box of a boolean mask, x2/y2 exclusive."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


# ----------------------------------------------------------------------------- anatomy
def draw_radiograph(rng, frame, findings):
    """Render one chest radiograph. Returns (uint8 HxW image, {region name: box}).

    Shapes live in a canonical unit square (u right, v down); a random similarity transform
    (scale, rotation, shift) maps pixels back into it, so the whole chest moves per image.
    Bright = dense (bone, heart, fluid), dark = air (lungs), as on a real film.
    """
    s, th = rng.uniform(0.85, 1.05), math.radians(rng.uniform(-6, 6))
    tx, ty = rng.uniform(-0.06, 0.06, size=2)
    pix = (np.arange(frame) + 0.5) / frame - 0.5
    X, Y = np.meshgrid(pix, pix)                                  # (H, W) centred pixel coords
    cos, sin = math.cos(th), math.sin(th)
    U = (cos * (X - tx) + sin * (Y - ty)) / s + 0.5               # (H, W) canonical coords
    V = (-sin * (X - tx) + cos * (Y - ty)) / s + 0.5
    kinds = {k for k, _ in findings}

    def ellipse(cu, cv, au, av):
        return ((U - cu) / au) ** 2 + ((V - cv) / av) ** 2 < 1

    # per-image anatomy: lung size, diaphragm height (right usually higher), heart size
    top, lw = rng.uniform(0.13, 0.19), rng.uniform(0.14, 0.17)
    dia_r, dia_l = rng.uniform(0.70, 0.76), rng.uniform(0.73, 0.79)
    heart_w = rng.uniform(0.12, 0.145) * (1.5 if "cardiomegaly" in kinds else 1.0)
    body = ellipse(0.5, 0.55, 0.46, 0.62)
    heart = ellipse(0.5 + heart_w * 0.35, 0.665, heart_w, 0.095) & (V < dia_l + 0.01)
    mediast = (np.abs(U - 0.5) < 0.05 + 0.03 * V) & (V > 0.04) & (V < 0.64)
    lungs, zones, cps, shape = {}, {}, {}, {}
    for side, cu, dia in (("right", 0.5 - 0.2, dia_r), ("left", 0.5 + 0.2, dia_l)):
        dome = dia - 0.06 * np.cos((U - cu) / lw * 1.3)           # domed diaphragm under each lung
        cv, av = (top + dia) / 2 + 0.05, (dia - top) / 2 + 0.07
        rr = ((U - cu) / lw) ** 2 + ((V - cv) / av) ** 2           # < 1 inside the lung's ellipse
        lung = (rr < 1) & (V < dome) & (V > top) & ~mediast & ~heart
        lungs[side], shape[side] = lung, rr
        v0, v1 = V[lung].min(), V[lung].max()                      # zones = thirds of lung height
        for i, name in enumerate(("upper", "mid", "lower")):
            top, bottom = v0 + i * (v1 - v0) / 3, v0 + (i + 1) * (v1 - v0) / 3
            zones[f"{side} {name} lung zone"] = lung & (V >= top) & (V <= bottom)
        lateral = (cu - U) if side == "right" else (U - cu)  # > 0 towards this lung's outer wall
        j = np.argmax(np.where(lung, V + 0.6 * lateral, -9))           # the lateral-inferior corner
        cu_cp = U.flat[j] + (0.03 if side == "right" else -0.03)
        near = (np.abs(U - cu_cp) < 0.075) & (np.abs(V - V.flat[j] + 0.02) < 0.075)
        cps[f"{side} costophrenic angle"] = body & near
    masks = {**zones, **cps, "cardiac silhouette": heart,
             "upper mediastinum": mediast & (V < 0.45)}
    boxes = {name: _mask_box(m) for name, m in masks.items()}

    # intensities: soft tissue, dark lungs with vessel texture and ribs, bright mediastinum/heart
    img = np.where(body, 0.55, 0.04)
    lung_any = lungs["right"] | lungs["left"]
    ribs = 0.5 + 0.5 * np.sin((V + 0.9 * (U - 0.5) ** 2) * 2 * math.pi * 11 + rng.uniform(0, 6))
    vessels = _smooth_noise(rng, frame, 6) * 0.10
    img = np.where(lung_any, 0.18 + 0.07 * ribs ** 4 + vessels, img)
    img = np.where(V > np.where(U < 0.5, dia_r, dia_l) + 0.02, np.where(body, 0.62, img), img)
    img = np.where(mediast, 0.72, img)
    img = np.where(mediast & (np.abs(U - 0.5) < 0.014) & (V < 0.36), 0.42, img)   # trachea: air
    img = np.where(heart, 0.78, img)

    # findings, each centred well inside the mask of its region (~6 px from its edge at 112 px),
    # and drawn large and bright enough for a 3-block tower trained for two minutes: on a film
    # where a nodule straddles two zones, even a good model can only guess which one is "right"
    for kind, region in findings:
        m, side = masks[region], region.split()[0]
        where = m & lung_any if kind in ("nodule", "mass") else m
        inner = _erode(where, max(1, round(0.054 * frame)))
        ys, xs = np.nonzero(inner if inner.any() else where)
        j = rng.integers(len(ys))
        cy, cx = ys[j], xs[j]
        R2 = (np.arange(frame)[None, :] - cx) ** 2 + (np.arange(frame)[:, None] - cy) ** 2
        if kind == "nodule":
            img += 0.8 * np.exp(-R2 / (2 * (frame * rng.uniform(0.036, 0.05)) ** 2)) * lung_any
        elif kind == "mass":
            img += 0.45 * (R2 < (frame * rng.uniform(0.075, 0.105)) ** 2) * lung_any
        elif kind == "consolidation":
            patch = (_smooth_noise(rng, frame, 10) > -0.1) & m
            img = np.where(patch, img + 0.5, img)
        elif kind == "pleural effusion":  # fluid fills the base, meniscus rises laterally
            lung = lungs[side]
            level = V[lung].max() - rng.uniform(0.09, 0.15) - 0.08 * np.abs(U - 0.5) / 0.35
            img = np.where(lung & (V > level), 0.66, img)
        elif kind == "pneumothorax":  # air rim at the apex/lateral wall, no markings
            lung, d = lungs[side], rng.uniform(0.24, 0.375)
            rim = lung & (shape[side] > (1 - d) ** 2) & (V < V[m].max() + 0.08)
            line = lung & (shape[side] > (1 - d - 0.04) ** 2) & ~rim & (V < V[m].max() + 0.08)
            img = np.where(rim, 0.03, np.where(line, 0.5, img))
    img = (img - img.min()) ** rng.uniform(0.8, 1.25)                 # exposure / gamma
    img = img / max(img.max(), 1e-6) * rng.uniform(0.8, 1.0)
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    pil = pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.2)))
    arr = np.asarray(pil, dtype=np.float32) + rng.normal(0, rng.uniform(3, 8), (frame, frame))
    return np.clip(arr, 0, 255).astype(np.uint8), boxes


def _erode(mask, r):
    """The boolean mask shrunk by r pixels on every side: a (2r+1)-square minimum filter, done as
    two 1-D minima over sliding windows (edges replicated, as PIL's MinFilter does; 10x faster)."""
    k, padded = 2 * r + 1, np.pad(mask, r, mode="edge")
    rows = np.lib.stride_tricks.sliding_window_view(padded, k, axis=0).min(-1)     # [H, W + 2r]
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=1).min(-1)        # [H, W]


def _smooth_noise(rng, frame, cells):
    """Low-frequency noise in about [-1, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = Image.fromarray(rng.normal(0, 1, (cells, cells)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((frame, frame), Image.BILINEAR)) / 1.5


# --------------------------------------------------------------------- questions and ThinkVG traces
def sample_findings(rng, min_n=0):
    """0-2 findings, each in its own region; never two on one lung base (effusion hides a zone)."""
    n = max(min_n, int(rng.choice([0, 1, 2], p=[0.3, 0.45, 0.25])))
    out, used = [], set()
    for kind in rng.permutation(list(FINDINGS))[:n]:
        free = [r for r in FINDINGS[kind][0] if r not in used]
        region = free[rng.integers(len(free))]
        side = region.split()[0]
        used |= {region, f"{side} lower lung zone", f"{side} costophrenic angle"} if (
            "lower" in region or "costophrenic" in region) else {region}
        out.append((str(kind), region))
    return out


def describe(region, box, at):
    """One reasoning sentence that names a region with its box: the unit of a ThinkVG trace.
    `at` maps each abnormal region to its finding. box=None: the same sentence without a box."""
    kind, named = at.get(region), region if box is None else f"{region} {format_box(box)}"
    if kind:
        return f"The {named} shows {FINDINGS[kind][1]}."
    clear = "has a normal outline" if region == "cardiac silhouette" else "is clear"
    return f"The {named} {clear}."


def _options(rng, truth, pool):
    """Four lettered options: the truth (or truths) plus distractors from pool, shuffled."""
    truth = list(truth)
    rest = [p for p in pool if p not in truth]
    opts = truth + [rest[i] for i in rng.permutation(len(rest))[: 4 - len(truth)]]
    return [opts[i] for i in rng.permutation(4)]


def _lettered(opts):
    return " ".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(opts))


def _walked(opts, say):
    """--walk-options: one sentence per region option, in order, each under its letter."""
    return [f"{'ABCD'[i]}. {say(o)}" for i, o in enumerate(opts)]


def make_sample(split, index, seed=0, frame=112, walk_options=False):
    """Sample `index` of `split`: its image, one question, a ThinkVG response. Pure in its args.
    walk_options: where the options are regions, the trace checks every option (ask)."""
    rng = np.random.default_rng([seed, STREAMS[split], index])
    qtype, variant, findings = _header(rng, index)
    pixels, boxes = draw_radiograph(rng, frame, findings)
    at = dict((r, k) for k, r in findings)
    q, think, answer = ask(rng, qtype, variant, findings, lambda r: describe(r, boxes[r], at),
                           walk_options)
    response = f"<think>{' '.join(think)}</think><answer>{answer}</answer>"
    return {"image_path": f"synthetic/{split}/{index:06d}.png", "image": Image.fromarray(pixels),
            "question": q, "question_type": qtype, "response": response}


def _header(rng, index):
    """(question type, which of its two templates, the film's findings) of sample `index`."""
    qtype = QUESTION_TYPES[index % 4]  # exact balance of the four GEMeX question types
    variant = rng.random() < 0.5       # which of the two templates of this type
    needs_finding = qtype in ("open_ended_questions", "multi_choice_questions") or (
        qtype in ("closed_ended_questions", "single_choice_questions") and variant)
    findings = sample_findings(rng, min_n=int(needs_finding))
    # "where is the X?"
    if variant and qtype in ("open_ended_questions", "single_choice_questions"):
        findings = ([f for f in findings if f[0] != "cardiomegaly"]
                    or [("nodule", LUNG_ZONES[rng.integers(6)])])
    return qtype, variant, findings


def ask(rng, qtype, variant, findings, say, walk_options=False):
    """A question about a film with these findings, the reasoning sentences that decide it (each
    from say(region)) and the answer: (question, [sentences], answer). walk_options: where the
    options are regions, the reasoning checks each in turn under its letter ('A. The right ... is
    clear. B. ...'), so the answer's letter is written next to what decides it (NOTES.md)."""
    at = dict((r, k) for k, r in findings)
    if qtype == "closed_ended_questions":
        if variant:                                   # a "yes": ask about a finding that is there
            kind, region = findings[rng.integers(len(findings))]
        else:                                         # a "no": a finding-region pair that is absent
            while True:
                kind = list(FINDINGS)[rng.integers(len(FINDINGS))]
                region = FINDINGS[kind][0][rng.integers(len(FINDINGS[kind][0]))]
                if at.get(region) != kind:
                    break
        q = ("Is the cardiac silhouette enlarged?" if kind == "cardiomegaly"
             else f"Is there {ARTICLE[kind]} in the {region}?")
        think, answer = [say(region)], "yes" if at.get(region) == kind else "no"
    elif qtype == "open_ended_questions":
        if variant:                                   # where is it? -> a region name
            kind, region = findings[rng.integers(len(findings))]
            q, answer = f"Where is the {kind}?", region
        else:                                         # what is there? -> a finding name or "none"
            # a finding's region, else mostly a clear one: "none"
            region = (findings[rng.integers(len(findings))][1] if rng.random() < 0.6
                      else REGIONS[rng.integers(len(REGIONS))])
            q, answer = f"What abnormality is seen in the {region}?", at.get(region, NO_FINDING)
        think = [say(region)]
    elif qtype == "single_choice_questions":
        if variant:                                   # which region holds the finding?
            kind, region = findings[rng.integers(len(findings))]
            opts = _options(rng, [region], [r for r in REGIONS if at.get(r) != kind])
            q = f"Which region contains the {kind}? {_lettered(opts)}"
            other = [o for o in opts if o != region][rng.integers(3)]
            # the answer region and one ruled out (`other` is drawn either way: same rng stream)
            think = _walked(opts, say) if walk_options else [say(region), say(other)]
        else:                                         # which finding is in the region?
            region = REGIONS[rng.integers(len(REGIONS))]
            truth = at.get(region, NO_FINDING)
            opts = _options(rng, [truth], list(FINDINGS) + [NO_FINDING])
            q = f"What abnormality is seen in the {region}? {_lettered(opts)}"
            think = [say(region)]
        answer = "ABCD"[opts.index(region if variant else truth)]
    else:                                             # multi-choice: several letters
        abnormal = [r for _, r in findings]
        ask_abnormal = len(abnormal) == 2 and variant
        normal = [r for r in REGIONS if r not in at]
        pick = [normal[i] for i in rng.permutation(len(normal))[: 4 - len(abnormal)]]
        opts = _options(rng, abnormal + pick, [])
        state = "are abnormal" if ask_abnormal else "appear normal"
        q = f"Which of these regions {state}? {_lettered(opts)}"
        think = _walked(opts, say) if walk_options else [say(r) for r in opts]
        answer = ", ".join(l for l, r in zip("ABCD", opts) if (r in at) == ask_abnormal)
    return q, think, answer


# ----------------------------------------------------------------------------- datasets container
def _generate(split, n, seed, frame, source_hash, walk_options):
    # source_hash is unused here: it is only there to key the cache (see _source_hash)
    for i in range(n):
        yield make_sample(split, i, seed, frame, walk_options)


def load_synthetic(split="train", n=None, cfg=DataConfig(), cache_dir=None):
    """A `datasets.Dataset` of the synthetic split with the GEMeX columns (+ decoded `image`).

    Built once by a generator and cached on disk by `datasets` (keyed on the arguments), so
    the second run of any script loads it in about a second. Each sample has its own seed, so
    a smaller set is a prefix of the full split: `--train-size 1000` trains on a subset of
    what `--train-size 8000` sees, and only those 1000 are generated.
    """
    import datasets
    full = {"train": cfg.n_train, "validation": cfg.n_val, "test": cfg.n_test}[split]
    n = full if n is None else n
    assert 0 < n <= full, f"n={n} outside 1..{full} for the {split} split"
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_generator(
            _generate, features=_features(), split=datasets.NamedSplit(split),
            gen_kwargs={"split": split, "n": n, "seed": cfg.seed, "frame": cfg.frame,
                        "source_hash": _source_hash(__file__), "walk_options": cfg.walk_options},
            cache_dir=cache_dir)
    finally:
        if was:
            datasets.enable_progress_bars()
    return ds


# ----------------------------------------------------------------------------- the entry point
@dataclass
class DataFlags:
    """The data flags of sft.py, grpo.py and evaluate.py: their configs inherit these fields."""
    data: str = "synthetic"        # 'synthetic' (drawn by data.py) or 'gemex' (the GEMeX parquet)
    data_path: str = GEMEX_HUB_ID  # --data gemex: the parquet file (or the Hub id when online)
    image_root: str = ""           # --data gemex: the local MIMIC-CXR-JPG files/ directory
    walk_options: bool = False     # synthetic traces check each region option under its letter

    def problems(self):
        """(ok, message) pairs for the check() of each script."""
        return [(self.data in ("synthetic", "gemex"), "--data must be synthetic or gemex")]


def load(split, n=None, flags=DataFlags(), frame=None):
    """The one entry point of sft.py / grpo.py / evaluate.py: --data synthetic or gemex. `n`: how
    many samples (None: all). Synthetic samples are i.i.d., so n is a prefix; GEMeX rows are a
    seeded random subset, and asking for more than there are uses all and says so. `frame` is
    the side GEMeX films are resized to; the synthetic set is drawn at its own DataConfig.frame,
    which every Qwen processor keeps as it is (build_prompts asserts that it does)."""
    if flags.data == "gemex":
        return load_gemex(split, n, flags.data_path, flags.image_root, frame or GEMEX_FRAME)
    return load_synthetic(split, n, DataConfig(walk_options=flags.walk_options))


# --------------------------------------------------------------------------- preview and statistics
COLOURS = ["#ff4040", "#40c0ff", "#ffd040", "#60ff60"]


def draw_boxes(image, boxes, colours, scale=3, labels=None):
    """Upscale a grayscale image and draw boxes on it (also used by evaluate.py's gallery)."""
    from PIL import ImageDraw
    img = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    d = ImageDraw.Draw(img)
    for i, b in enumerate(boxes):
        c = colours[i % len(colours)]
        d.rectangle([b[0] * scale, b[1] * scale, b[2] * scale - 1, b[3] * scale - 1], outline=c,
                    width=2)
        if labels:
            d.text((b[0] * scale + 3, b[1] * scale + 2), labels[i], fill=c)
    return img


def preview(path="preview.png", n=8, cfg=DataConfig()):
    """A grid of training samples: the image with its ground-truth boxes, question and answer."""
    import textwrap
    from PIL import ImageDraw
    from reward import parse
    tile, text_h, cols = cfg.frame * 3, 80, 4
    rows = (n + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile, rows * (tile + text_h)), "white")
    for i in range(n):
        s = make_sample("train", i, cfg.seed, cfg.frame)
        p = parse(s["response"])
        img = draw_boxes(s["image"], [b for _, b in p.boxes], COLOURS,
                         labels=[r for r, _ in p.boxes])
        x, y = (i % cols) * tile, (i // cols) * (tile + text_h)
        sheet.paste(img, (x, y))
        lines = textwrap.wrap(f"[{s['question_type'].split('_')[0]}] {s['question']}", 52)
        lines += textwrap.wrap(f"answer: {p.answer}", 52)
        ImageDraw.Draw(sheet).multiline_text((x + 4, y + tile + 4), "\n".join(lines[:9]),
                                             fill="black")
    sheet.save(path)
    print(f"wrote {path} ({n} samples)")


def stats(split="train", n=2000, cfg=DataConfig()):
    """Counts a reader should check: type balance, answer balance, findings and regions used."""
    from reward import parse
    types, answers, regions, findings = Counter(), Counter(), Counter(), Counter()
    for i in range(n):
        s = make_sample(split, i, cfg.seed, cfg.frame)
        p = parse(s["response"])
        types[s["question_type"]] += 1
        answers[(s["question_type"].split("_")[0], p.answer if "multi" not in s["question_type"]
                 else f"{len(p.answer.split(','))} letters")] += 1
        regions.update(r for r, _ in p.boxes)
        findings.update(k for k in FINDINGS if FINDINGS[k][1] in s["response"])
    print(f"{split}: {n} samples")
    for name, c in (("question types", types), ("answers", answers), ("grounded regions", regions),
                    ("findings mentioned in traces", findings)):
        print(f"  {name}:")
        for k, v in sorted(c.items(), key=lambda kv: str(kv[0])):
            print(f"    {str(k):<55} {v:5d}  ({v / n:.1%})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preview", nargs="?", const="preview.png",
                    help="write a PNG grid of samples to this path")
    ap.add_argument("--stats", action="store_true", help="print the synthetic set's statistics")
    ap.add_argument("--n", type=int, default=2000, help="samples to count with --stats")
    ap.add_argument("--seed", type=int, default=DataConfig.seed, help="dataset seed")
    args = ap.parse_args()
    cfg = DataConfig(seed=args.seed)
    if args.preview:
        preview(args.preview, cfg=cfg)
    if args.stats:
        stats(n=args.n, cfg=cfg)
    if not (args.preview or args.stats):
        ap.print_help()
