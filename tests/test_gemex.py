"""The real-data path (--data gemex) on a fixture parquet in the GEMeX-ThinkVG schema, with small
images laid out like MIMIC-CXR-JPG (files/p10/p10000032/s50414267/<id>.jpg), including rows that
must be skipped: a missing image, a truncated JPEG, a response without an answer."""
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

# also runnable: python tests/test_gemex.py DIR
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import gemex  # noqa: E402
import reward  # noqa: E402

# one row per question type, in the styles a real response might use (224-pixel GEMeX boxes)
RESPONSES = [
    ("closed_ended_questions", "Is there a nodule in the left lower lung zone?",
     "<think>The left lower lung zone [120, 130, 200, 190] shows a small round "
     "opacity.</think><answer>yes</answer>"),
    ("open_ended_questions", "What abnormality is seen in the right upper lung zone?",
       # no <think> tags
     "The right upper lung zone [10, 20, 100, 90] is clear.\n<answer>none</answer>"),
    ("single_choice_questions", "Which region contains the mass? A. x B. y C. z D. w",
     "<think>The cardiac silhouette [80, 120, 160, 200] has a normal outline.</think><answer>B. "
     "left mid lung zone</answer>"),
    ("multi_choice_questions", "Which of these regions appear normal? A. a B. b C. c D. d",
       # overshooting box
     "<think>The left costophrenic angle [200, 200, 230, 226] is clear.</think><answer>A and "
     "C</answer>"),
    # the paper's own styles: boxes in parentheses after a clause, free-text reasons and answers,
    # multi-choice answers written as a list, options with their text
    ("open_ended_questions", "What is the position of the NG tube?",
     "<think>The tube courses below the diaphragm (abdomen [70, 160, 150, 220]), with its tip over "
     "the stomach (left upper abdomen [120, 170, 170, 215]).</think><answer>NG tube tip is in the "
     "stomach.</answer>"),
    ("closed_ended_questions", "Is there any pneumothorax?",
     "<think>Both apices show lung markings to the chest wall, right apical zone ([30, 20, 90, "
     "60]) and left apical zone ([140, 20, 200, 62]).</think><answer>There is no "
     "pneumothorax.</answer>"),
    ("multi_choice_questions",
     "Which findings are present? A. Cardiomegaly B. Type B aortic dissection C. Pleural effusion "
     "D. Vitamin D deficiency",
     "<think>The heart is enlarged (cardiac silhouette [70, 110, 170, 190]) and the right angle is "
     "blunted (right hemidiaphragm [43, 126, 129, 150]).</think><answer>['A', 'C']</answer>"),
    ("single_choice_questions",
     "What is the size of the nodule? A: 0.5 cm B: 0.8 cm C: 1.2 cm D: 2.0 cm",
     "<think>A small round opacity, right mid lung zone ([40, 90, 80, 120]), about a centimetre "
     "across.</think><answer>C: 1.2 cm</answer>"),
]


def _mimic_paths(n, split):
    """n image paths that land in `split` (the split is a hash of the path: pick paths that do)."""
    out, i = [], 0
    while len(out) < n:
        p = f"/files/p10/p100000{i:02d}/s5041{i:04d}/{i:04x}abcd.jpg"
        if gemex.split_of(p) == split:
            out.append(p)
        i += 1
    return out


def write_fixture(tmp):
    """-> (parquet path, image root): 3 train, 2 validation, 2 test images, 4 questions each, plus
    three broken train rows. `python tests/test_gemex.py DIR` writes it for a manual run."""
    tmp = Path(tmp)
    root = tmp / "mimic-cxr-jpg" / "files"
    rows, rng = [], np.random.default_rng(0)
    for split, n in (("train", 3), ("validation", 2), ("test", 2)):
        for path in _mimic_paths(n, split):
            file = root / path[len("/files/"):]
            file.parent.mkdir(parents=True, exist_ok=True)
            pixels, _ = data.draw_radiograph(rng, 224, [])
            # a MIMIC-CXR film's size: squashed to the frame
            Image.fromarray(pixels).resize((2544, 3056)).save(file)
            rows += [dict(image_path=path, question=q, question_type=t, response=r)
                     for t, q, r in RESPONSES]
    missing, truncated = _mimic_paths(5, "train")[3:]
    trunc_file = root / truncated[len("/files/"):]
    trunc_file.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((300, 256), 128, np.uint8)).save(trunc_file)
    trunc_file.write_bytes(trunc_file.read_bytes()[:200])               # a download cut short
    good = rows[0]["image_path"]
    rows += [dict(image_path=missing, question="q", question_type="closed_ended_questions",
                  response="<answer>no</answer>"),
             dict(image_path=truncated, question="q", question_type="closed_ended_questions",
                  response="<answer>no</answer>"),
             dict(image_path=good, question="q", question_type="closed_ended_questions",
                  response="I think it is fine [1, 2, 3, 4]")]
    parquet = tmp / "train-00000-of-00001.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    return str(parquet), str(root)


@pytest.fixture(scope="module")
def gemex_files(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("gemex"))


def test_convert_response_moves_boxes_into_the_frame_and_normalises_answers():
    def conv(r, t="closed_ended_questions", f=112):
        return gemex.convert_response(r, t, f)
    assert conv(RESPONSES[0][2]) == ("<think>The left lower lung zone [60, 65, 100, 95] shows a "
                                     "small round opacity.</think><answer>yes</answer>")
    assert conv(RESPONSES[0][2], f=224) == RESPONSES[0][2]  # 224 -> 224: unchanged
    assert conv(RESPONSES[1][2], "open_ended_questions") == (
        "<think>The right upper lung zone [5, 10, 50, 45] is clear.</think><answer>none</answer>")
    assert conv(RESPONSES[3][2], "multi_choice_questions").endswith(
        "[100, 100, 112, 112] is clear.</think><answer>A, C</answer>")
    for style in ("A, C", "A,C", "A and C", "(A) (C)", "A. nodule, C. mass", "a; c", "['A', 'C']"):
        assert conv(f"<think>x [0, 0, 10, 10]</think><answer>{style}</answer>",
                    "multi_choice_questions").endswith(
            "<answer>A, C</answer>"), style
    want = "<think></think><answer>B</answer>"
    assert conv("<answer>Option B</answer>", "single_choice_questions") == want
    for broken, qtype in (("no answer at all [1, 2, 3, 4]", "closed_ended_questions"),
                          ("<answer></answer>", "closed_ended_questions"),
                          ("<answer>A, B</answer>", "single_choice_questions"),
                            # one letter expected
                          ("<answer>all of them</answer>", "multi_choice_questions"),
                          ("x [300, 300, 400, 400] <answer>yes</answer>",
                           "closed_ended_questions")):  # empty once clamped
        assert conv(broken, qtype) is None, broken
    # what we write back is what reward.py reads: the converted reference scores itself perfectly
    ref = conv(RESPONSES[0][2])
    assert reward.score(ref, ref, "closed_ended_questions", image_size=(112, 112))["total"] == 1.0


def test_splits_are_by_image_and_broken_rows_are_counted(gemex_files, capsys):
    path, root = gemex_files
    splits = {s: gemex.load_gemex(s, path=path, image_root=root, frame=112)
              for s in ("train", "validation", "test")}
    out = capsys.readouterr().out
    assert "kept 24 rows, skipped 1 (missing image" in out and "1 (unreadable image" in out
    assert "1 (response does not parse" in out
    assert {s: len(d) for s, d in splits.items()} == {"train": 24, "validation": 16, "test": 16}
    images = {s: set(d["image_path"]) for s, d in splits.items()}
    assert not (images["train"] & images["validation"] or images["train"] & images["test"]
                or images["validation"] & images["test"])                 # no image in two splits
    row = splits["test"][0]
    assert row["image"].size == (112, 112) and row["image"].mode == "L"
    # as load_synthetic
    assert set(row) == {"image_path", "image", "question", "question_type", "response"}
    for r in splits["train"]:
        assert all(reward.valid_box(b, (112, 112)) for _, b in reward.parse(r["response"]).boxes)
    # a seeded random sample
    subset = gemex.load_gemex("train", 4, path=path, image_root=root, frame=112)
    assert len(subset) == 4 and subset["question"] != splits["train"]["question"][:4]
    assert subset["question"] == gemex.load_gemex("train", 4, path=path, image_root=root,
                                                  frame=112)["question"]
    capsys.readouterr()
    # all there is, said
    assert len(gemex.load_gemex("test", 99, path=path, image_root=root, frame=112)) == 16
    assert "99 samples asked for, 16 usable: using all 16" in capsys.readouterr().out


def test_every_reference_scores_1_against_itself_on_every_component(gemex_files):
    path, root = gemex_files
    rows = gemex.load_gemex("train", path=path, image_root=root, frame=112)
    assert set(rows["question_type"]) == set(data.QUESTION_TYPES)
    for r, qt, im in zip(rows["response"], rows["question_type"], rows["image"]):
        s = reward.score(r, r, qt, image_size=im.size)
        assert all(s[k] == 1.0 for k in reward.REWARDS), (r, s)
    answers = {reward.parse(r).answer for r in rows["response"]}
    assert {"A, C", "C", "NG tube tip is in the stomach.", "There is no pneumothorax."} <= answers


def test_split_reads_the_image_not_the_spelling_of_its_path():
    # GEMeX v1 writes 'p10/...', ThinkVG '/p10/...', some copies '/files/p10/...': one image, one
    # split
    for i in range(50):
        p = f"p1{i % 10}/p100{i:05d}/s5{i:07d}/{i:08x}.jpg"
        assert len({gemex.split_of(prefix + p) for prefix in ("", "/", "/files/", "files/")}) == 1
    splits = {gemex.split_of(f"p10/p{i}/x.jpg") for i in range(400)}
    assert splits == {"train", "validation", "test"}


def _exit_message(fn):
    with pytest.raises(SystemExit) as e:
        fn()
    return str(e.value)


def test_bad_data_files_stop_with_one_line_naming_the_culprit(gemex_files, tmp_path):
    path, root = gemex_files
    def load(p, r=root):
        return gemex.load_gemex("train", path=str(p), image_root=r, frame=112)
    assert "--image-root" in _exit_message(lambda: load(path, str(tmp_path / "nowhere")))
    assert "does not exist" in _exit_message(lambda: load(tmp_path / "nope.parquet"))
    junk = tmp_path / "junk.parquet"
    junk.write_text("this is not a parquet file")
    assert str(junk) in _exit_message(lambda: load(junk))
    table = datasets.Dataset.from_parquet(path)
    table.remove_columns("response").to_parquet(str(tmp_path / "cols.parquet"))
    said = _exit_message(lambda: load(tmp_path / "cols.parquet"))
    assert "missing column(s) ['response']" in said
    table.map(lambda r, i: {"question_type": "yes_no" if i == 5 else r["question_type"]},
              with_indices=True).to_parquet(str(tmp_path / "qtype.parquet"))
    msg = _exit_message(lambda: load(tmp_path / "qtype.parquet"))
    assert "row 5" in msg and "'yes_no'" in msg and "\n" not in msg


def test_sft_and_evaluate_run_on_gemex_data(gemex_files, tmp_path):
    path, root = gemex_files
    flags = ["--data", "gemex", "--data-path", path, "--image-root", root]
    out = tmp_path / "sft"
    r = subprocess.run([sys.executable, "sft.py", "--max-steps", "2", "--batch-size", "4",
                          # no size flags
                        "--out", str(out), *flags], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skipped 1 (missing image" in r.stdout
    res = tmp_path / "eval.json"
    assert "validation: 64 samples asked for, 16 usable: using all 16" in r.stdout
    preds = tmp_path / "p.jsonl"
    r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(out), "--max-new-tokens",
                        "8",
                        "--json", str(res), "--gallery", str(tmp_path / "g.png"), "--predictions",
                        str(preds), *flags],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(res.read_text())["n"] == 16 and len(preds.read_text().splitlines()) == 16
    assert "test: 1000 samples asked for, 16 usable" in r.stdout
    r = subprocess.run([sys.executable, "grpo.py", "--init", str(out), "--max-steps", "1",
                        "--prompts", "2",
                        "--group-size", "2", "--max-new-tokens", "8", "--out",
                        str(tmp_path / "grpo"), *flags],
                       capture_output=True, text=True)  # default credit, no size flags
    assert r.returncode == 0, r.stderr[-2000:]


def test_each_script_stops_on_a_bad_data_file_with_one_line(gemex_files, tmp_path):
    """Through the scripts: non-zero exit, the culprit named on the last line, no traceback."""
    path, root = gemex_files
    table = datasets.Dataset.from_parquet(path)
    table.remove_columns(["question_type"]).to_parquet(str(tmp_path / "cols.parquet"))
    table.map(lambda r, i: {"question_type": "yes_no" if i == 2 else r["question_type"]},
              with_indices=True).to_parquet(str(tmp_path / "qtype.parquet"))
    cases = [("sft.py", str(tmp_path / "cols.parquet"), root,
              "missing column(s) ['question_type']"),
             ("grpo.py", str(tmp_path / "qtype.parquet"), root, "row 2: question_type 'yes_no'"),
             ("evaluate.py", path, str(tmp_path / "no_images"), "--image-root"),
             ("sft.py", str(tmp_path / "absent.parquet"), root, "absent.parquet: does not exist")]
    for script, p, r, words in cases:
        extra = {"sft.py": ["--out", str(tmp_path / "o"), "--train-size", "8", "--batch-size", "4"],
                 "grpo.py": ["--out", str(tmp_path / "o"), "--train-size", "8", "--init",
                             "tiny-qwen2.5-vl-cxr"],
                 "evaluate.py": ["--checkpoint", "tiny-qwen2.5-vl-cxr", "--n", "8"]}[script]
        run = subprocess.run([sys.executable, script, "--data", "gemex", "--data-path", p,
                              "--image-root", r, *extra], capture_output=True, text=True)
        last = (run.stderr.strip().splitlines() or [""])[-1]
        assert run.returncode != 0, (script, run.stderr[-1500:])
        assert "Traceback" not in run.stderr, (script, run.stderr[-1500:])
        assert words in last, (script, run.stderr[-1500:])


if __name__ == "__main__":
    parquet, root = write_fixture(sys.argv[1])
    print(f"python sft.py --data gemex --data-path {parquet} --image-root {root} --train-size 8 "
          f"--batch-size 4")
