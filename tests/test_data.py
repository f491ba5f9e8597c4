"""The synthetic set: deterministic, disjoint splits, balanced, grounded in the image frame."""
import hashlib
import re
from collections import Counter

import numpy as np
import pytest

import data
from reward import letters, parse

N = 400  # samples checked per property: enough for the balance bounds below to be meaningful


def digest(img):
    return hashlib.sha1(np.asarray(img).tobytes()).hexdigest()


def test_same_seed_same_sample_other_seed_other_sample():
    a, b = data.make_sample("train", 7, seed=0), data.make_sample("train", 7, seed=0)
    c = data.make_sample("train", 7, seed=1)
    assert digest(a["image"]) == digest(b["image"]) and a["response"] == b["response"]
    assert digest(a["image"]) != digest(c["image"])


def test_datasets_container_schema_and_disjoint_splits(tmp_path):
    cfg = data.DataConfig(n_train=48, n_val=16, n_test=16)
    splits = {s: data.load_synthetic(s, cfg=cfg, cache_dir=str(tmp_path)) for s in data.SPLITS}
    for name, ds in splits.items():
        assert ds.column_names == ["image_path", "image", "question", "question_type", "response"]
        assert ds[0]["image"].size == (cfg.frame, cfg.frame)
    hashes = {s: {digest(r["image"]) for r in ds} for s, ds in splits.items()}
    assert len(hashes["train"]) == 48                      # no repeated image inside a split
    assert not hashes["train"] & hashes["validation"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["validation"] & hashes["test"]
    # a smaller set is a prefix of the full one
    sub = data.load_synthetic("train", n=10, cfg=cfg, cache_dir=str(tmp_path))
    assert [r["response"] for r in sub] == splits["train"]["response"][:10]
    with pytest.raises(AssertionError, match="outside"):
        data.load_synthetic("train", n=49, cfg=cfg, cache_dir=str(tmp_path))


@pytest.fixture(scope="module")
def samples():
    return [data.make_sample("train", i) for i in range(N)]


def test_question_types_balanced_and_answers_balanced(samples):
    types = Counter(s["question_type"] for s in samples)
    assert set(types) == set(data.QUESTION_TYPES) and set(types.values()) == {N // 4}
    def by(t):
        return [parse(s["response"]).answer for s in samples if s["question_type"] == t]
    closed = Counter(by("closed_ended_questions"))
    assert set(closed) == {"yes", "no"} and 0.4 < closed["yes"] / (N // 4) < 0.6
    single = Counter(by("single_choice_questions"))
    assert set(single) == set("ABCD") and min(single.values()) > 0.15 * (N // 4)
    multi = [letters(a) for a in by("multi_choice_questions")]
    assert all(len(m) >= 2 for m in multi)                  # "several letters"
    assert len({tuple(m) for m in multi}) >= 8              # and many different sets
    open_answers = Counter(by("open_ended_questions"))
    assert data.NO_FINDING in open_answers and len(open_answers) >= 8


def test_findings_regions_and_traces(samples):
    regions, kinds = Counter(), Counter()
    for s in samples:
        p = parse(s["response"])
        # 1-4 grounded sentences
        assert 1 <= len(p.boxes) <= 4 and p.think.count(".") == len(p.boxes)
        for region, box in p.boxes:
            assert region in data.REGIONS
            assert 0 <= box[0] < box[2] <= 112 and 0 <= box[1] < box[3] <= 112  # inside the frame
            regions[region] += 1
        kinds.update(k for k, (_, desc) in data.FINDINGS.items() if desc in p.think)
    # every region and finding occurs
    assert set(regions) == set(data.REGIONS) and set(kinds) == set(data.FINDINGS)
    no_answers = [s for s in samples if parse(s["response"]).answer == "no"]
    assert no_answers and all(parse(s["response"]).boxes
                              for s in no_answers)  # a "no" is grounded too


def test_boxes_follow_the_anatomy_not_a_template(samples):
    """The same region moves from image to image: a box must be found by looking."""
    boxes = [b for s in samples for r, b in parse(s["response"]).boxes
             if r == "left lower lung zone"]
    spread = np.array(boxes).std(0)
    assert (spread > 2).all(), spread


def test_costophrenic_angles_are_lateral():
    """The CP angle is the outer-lower corner of a lung, never the inner (cardiophrenic) one.
    Radiological convention: the patient's right lung is on the image's left."""
    for i in range(150):
        _, b = data.draw_radiograph(np.random.default_rng([9, i]), 112, [])
        centre = lambda box: (box[0] + box[2]) / 2  # noqa: E731
        assert centre(b["right costophrenic angle"]) < centre(b["right lower lung zone"]), i
        assert centre(b["left costophrenic angle"]) > centre(b["left lower lung zone"]), i


def test_rescale_box_is_the_one_frame_conversion():
    assert data.rescale_box([60, 120, 104, 170], (224, 224), (112, 112)) == [30, 60, 52, 85]
    assert data.rescale_box([0, 0, 230, 224], (224, 224), (448, 448)) == [0, 0, 448, 448]  # clamped
    assert data.rescale_box([10, 20, 30, 40], (100, 200), (200, 100)) == [20, 10, 60, 20]


def test_preview_writes_a_png(tmp_path):
    from PIL import Image
    out = tmp_path / "p.png"
    data.preview(str(out), n=4)
    img = Image.open(out)
    assert img.size[0] == 4 * 112 * 3 and np.asarray(img).std() > 20  # a picture, not a blank sheet


def test_walk_options_letters_every_region_option_and_changes_nothing_else(samples):
    """--walk-options: a question whose options are regions gets a trace that checks each option
    in turn under its letter, and the answer's letters are exactly those whose sentence says the
    asked thing. Image, question and answer are the default sample's; other traces are unchanged."""
    walked = 0
    for i, s in enumerate(samples[:80]):
        w = data.make_sample("train", i, walk_options=True)
        q, think, answer = w["question"], parse(w["response"]).think, parse(w["response"]).answer
        assert digest(w["image"]) == digest(s["image"]) and q == s["question"]
        assert answer == parse(s["response"]).answer
        if not q.startswith(("Which region contains", "Which of these regions")):
            assert w["response"] == s["response"]
            continue
        walked += 1
        options = re.split(r" [A-D]\. ", q)[1:]                     # the regions, in order A-D
        checks = re.split(r"(?:^| )[A-D]\. ", think)[1:]             # the trace's four sentences
        assert re.findall(r"(?:^| )([A-D])\. The ", think) == list("ABCD")
        assert [c.startswith(f"The {o} [") for c, o in zip(checks, options)] == [True] * 4
        if q.startswith("Which region contains"):                    # the finding's own words
            kind = q.removeprefix("Which region contains the ").split("?")[0]
            wanted = [data.FINDINGS[kind][1] in c for c in checks]
        else:                                                         # abnormal, or normal
            wanted = [("shows" in c) != q.startswith("Which of these regions appear normal")
                      for c in checks]
        assert letters(answer) == [l for l, y in zip("ABCD", wanted) if y]
        assert len(parse(w["response"]).boxes) == 4
    assert walked >= 20
