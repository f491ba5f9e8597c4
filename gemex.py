"""gemex.py -- the GEMeX schema, and the real data: BoKelvin/GEMeX-ThinkVG in those columns.

GEMeX-ThinkVG is one parquet (image_path with a leading '/', question, question_type, response)
over MIMIC-CXR-JPG films, which need a credentialed PhysioNet account and live on your disk.
This file holds what both data sets share (the columns, the four question types, the 224-px
frame of GEMeX's boxes and the one function that moves a box out of it; data.py draws its
synthetic set in the same schema) and turns the real parquet into what every script reads
(data.load(..., DataFlags(data="gemex"))):

  - split by IMAGE (a hash of its path), so no test film is ever trained on;
  - every film decoded once, grayscale, squashed to the square frame the model sees;
  - every box moved from GEMeX's 224x224 frame into that frame (rescale_box, the one place);
  - rows that cannot be used skipped, counted and named, never a traceback.

    python tests/test_gemex.py /tmp/fx   # writes a fixture parquet + films in the real schema
"""
import functools
import hashlib
import os
import random
import re
from collections import Counter

from PIL import Image

import reward
from reward import BOX, letters, parse

GEMEX_FRAME = 224  # the frame in which real GEMeX boxes are written
GEMEX_HUB_ID = "BoKelvin/GEMeX-ThinkVG"  # the real data on the Hub
QUESTION_TYPES = ["open_ended_questions", "closed_ended_questions",
                  "single_choice_questions", "multi_choice_questions"]

def rescale_box(box, src_size, dst_size):
    """THE one place where a box changes frame: [x1,y1,x2,y2] in a src (w, h) image -> dst (w, h).

    Real GEMeX boxes are written in a 224x224 frame; the model may see another size. Training,
    reward and evaluation all call this, so boxes are never compared across frames. Coordinates
    are clamped into the destination frame (some GEMeX boxes overshoot the image by a pixel).
    """
    sx, sy = dst_size[0] / src_size[0], dst_size[1] / src_size[1]
    x1, y1, x2, y2 = box
    out = [round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)]
    return [min(max(v, 0), dst_size[i % 2]) for i, v in enumerate(out)]


def format_box(box):
    return "[" + ", ".join(str(int(v)) for v in box) + "]"


def _features(*extra):
    """The `datasets` schema of a sample, synthetic or real: the GEMeX columns + the decoded image
    (+ any `extra` string columns)."""
    import datasets
    text = datasets.Value("string")
    return datasets.Features({"image_path": text, "image": datasets.Image(), "question": text,
                              "question_type": text, "response": text, **{k: text for k in extra}})


def _source_hash(file):
    """A hash of a source file, put in the loaders' gen_kwargs: `datasets` fingerprints the
    arguments, not the code they call, so without it an edit of the code would be served a
    stale cache."""
    return hashlib.sha1(open(file, "rb").read()).hexdigest()



GEMEX_COLUMNS = ["image_path", "question", "question_type", "response"]
# hash ranges of IMAGES; the rest is train
HELD_OUT = {"validation": (0.00, 0.02), "test": (0.02, 0.07)}


def split_of(image_path):
    """'train' / 'validation' / 'test' from a hash of the image path. GEMeX ships one train split;
    cutting by image (never by row) keeps every question about an image in one split, so a test
    question never shares its image with a training question. Stable across machines and runs."""
    # '/p10/...', 'p10/...' (GEMeX v1) and 'files/p10/...' are one image
    rel = image_path.lstrip("/")
    rel = rel[len("files/"):] if rel.startswith("files/") else rel
    u = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) / 16 ** 8
    return next((s for s, (lo, hi) in HELD_OUT.items() if lo <= u < hi), "train")


def convert_response(text, question_type, frame):
    """A GEMeX response -> our canonical `<think>...</think><answer>...</answer>`, with every box
    moved from the 224x224 GEMeX frame into the frame x frame image the model sees (rescale_box,
    which also clamps overshooting boxes). Tolerant of how the reasoning is wrapped (parse reads a
    response without <think> tags too); letter answers are normalised to 'A' or 'A, C'.
    Returns None when the row cannot be used: no answer, no letter where one is needed, or a
    box that is empty once clamped."""
    p = parse(text)
    answer = p.answer
    if question_type in ("single_choice_questions", "multi_choice_questions"):
        picked = letters(answer)
        if not picked or (question_type == "single_choice_questions" and len(picked) != 1):
            return None
        answer = ", ".join(picked)
    if not answer or "<" in answer:
        return None
    bad = []

    def move(m):
        box = rescale_box([float(v) for v in m.groups()], (GEMEX_FRAME, GEMEX_FRAME),
                          (frame, frame))
        bad.append(not (box[0] < box[2] and box[1] < box[3]))
        return format_box(box)
    think = " ".join(BOX.sub(move, p.think).split())
    return None if any(bad) else f"<think>{think}</think><answer>{answer}</answer>"


def _image_file(root, image_path):
    """Join the dataset's '/p10/p10000032/s5.../x.jpg' (or '/files/p10/...') onto the MIMIC-CXR-JPG
    files/ directory given as --image-root."""
    rel = image_path.lstrip("/")
    if rel.startswith("files/") and os.path.basename(os.path.normpath(root)) == "files":
        rel = rel[len("files/"):]
    return os.path.join(root, rel)


def _read_image(file, frame):
    """Decode fully (a truncated JPEG fails here, not mid-training), grayscale, squash to the
    frame: GEMeX's boxes are in a square 224 frame of the whole film, so the film is resized
    the same way. Returns (image, None) or (None, why)."""
    if not os.path.isfile(file):
        return None, "missing image"
    try:
        with Image.open(file) as im:
            return im.convert("L").resize((frame, frame), Image.BICUBIC), None
    except (OSError, ValueError, Image.DecompressionBombError):
        return None, "unreadable image"


def read_gemex_table(path):
    """The GEMeX parquet as a `datasets.Dataset`: a local file, or the Hub id when online.
    Anything that is not the dataset stops here with one line naming the file."""
    import datasets
    hub = (not os.path.exists(path) and re.fullmatch(r"[\w-]+/[\w.-]+", path)
           and not path.endswith(".parquet"))
    if not hub and not os.path.isfile(path):
        raise SystemExit(f"--data-path {path}: does not exist (give the parquet file, or "
                         f"{GEMEX_HUB_ID} when online)")
    datasets.logging.set_verbosity_error()      # our one-line error below says it better
    try:
        table = (datasets.load_dataset(path, split="train") if hub
                 else datasets.Dataset.from_parquet(path))
    except Exception as e:  # noqa: BLE001 -- pyarrow/datasets raise many types, all meaning one
        why = ("cannot be fetched from the Hub (offline? pass the downloaded parquet)" if hub
               else "is not a readable parquet")
        raise SystemExit(f"--data-path {path}: {why} ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:120]})")
    missing = [c for c in GEMEX_COLUMNS if c not in table.column_names]
    if missing:
        raise SystemExit(f"--data-path {path}: missing column(s) {missing}; GEMeX-ThinkVG has "
                         f"{GEMEX_COLUMNS} (found {table.column_names[:8]})")
    for i, qt in enumerate(table["question_type"]):
        if qt not in QUESTION_TYPES:
            raise SystemExit(f"--data-path {path}: row {i}: question_type {qt!r} is not one of "
                             f"{QUESTION_TYPES}")
    return table


def _generate_gemex(path, image_root, split, frame, fingerprint):
    # Yields every row of the split, the unusable ones with `skip` set, so the counts can be
    # printed from the cache on every run without decoding an image again.
    table = read_gemex_table(path)
    read = functools.lru_cache(maxsize=256)(_read_image)   # rows of one image are usually adjacent
    for row in table.select_columns(GEMEX_COLUMNS):
        if split_of(row["image_path"]) != split:
            continue
        image, skip = read(_image_file(image_root, row["image_path"]), frame)
        response = convert_response(row["response"], row["question_type"], frame)
        if skip is None and response is None:
            skip = "response does not parse"
        yield {**row, "image": image, "response": response or row["response"], "skip": skip or ""}


def _empty(split):
    """A split with no rows, in the columns of every other: the scripts decide what that means."""
    import datasets
    return datasets.Dataset.from_dict({k: [] for k in _features()}, features=_features(),
                                      split=datasets.NamedSplit(split))


def load_gemex(split, n=None, path=GEMEX_HUB_ID, image_root="", frame=GEMEX_FRAME, cache_dir=None):
    """A split of the real GEMeX-ThinkVG data with the same columns as load_synthetic: images
    resized to the frame the model sees, boxes moved into that frame. Decoded once and cached
    by `datasets`; skipped rows are counted and printed (with one example path) on every load."""
    import datasets
    if not os.path.isdir(image_root):
        raise SystemExit(f"--image-root {image_root!r}: not a directory (the MIMIC-CXR-JPG files/ "
                         f"directory)")
    paths = read_gemex_table(path)["image_path"]
    if not any(split_of(p) == split for p in paths):        # a small file: a course's subset
        lo, hi = HELD_OUT.get(split, (max(h for _, h in HELD_OUT.values()), 1.0))
        print(f"gemex {split}: no image of {path} falls in the {split} split ({hi - lo:.0%} of "
              f"images, chosen by a hash of the path)")
        return _empty(split)
    stamp = os.stat(path).st_mtime_ns if os.path.exists(path) else path
    ds = datasets.Dataset.from_generator(
        _generate_gemex, features=_features("skip"), split=datasets.NamedSplit(split),
        cache_dir=cache_dir,
        gen_kwargs={"path": os.path.abspath(path) if os.path.exists(path) else path,
                    "image_root": os.path.abspath(image_root), "split": split, "frame": frame,
                    # the file's stamp and the code that reads it
                    "fingerprint": f"{stamp}-{_source_hash(__file__)}-"
                                   f"{_source_hash(reward.__file__)}"})
    skip = ds["skip"]  # read once: counts, examples and the kept rows
    skips = Counter(skip)
    kept = skips.pop("", 0)
    if skips:
        first = {why: ds[skip.index(why)]["image_path"] for why in skips}
        print(f"gemex {split}: kept {kept} rows, skipped " + ", ".join(
            f"{c} ({why}, e.g. {first[why]})" for why, c in skips.items()))
    if kept == 0 and split == "train":
        raise SystemExit(f"--data-path {path}: no usable {split} rows under --image-root "
                         f"{image_root}")
    if kept == 0:
        print(f"gemex {split}: no usable rows under --image-root {image_root}")
        return _empty(split)
    ds = ds.select([i for i, why in enumerate(skip) if not why]).remove_columns("skip")
    if n is not None and n > len(ds):
        print(f"gemex {split}: {n} samples asked for, {len(ds)} usable: using all {len(ds)}")
    # a seeded random subset, in file order (files are often grouped by type)
    elif n is not None and n < len(ds):
        ds = ds.select(sorted(random.Random(0).sample(range(len(ds)), n)))
    return ds
