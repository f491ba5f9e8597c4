"""evaluate.py: the paired interval maths, the baseline, and the script end to end."""
import json
import subprocess
import sys

import numpy as np
import pytest

import data
import evaluate


def test_paired_bootstrap_hand_cases():
    a = [0.0, 1.0, 0.0, 1.0] * 50
    # same model: exactly 0
    assert evaluate.paired_bootstrap(a, a, 500) == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    b = [x + 1.0 for x in a]
    # constant gain: no spread
    assert evaluate.paired_bootstrap(a, b, 500) == {"diff": 1.0, "lo": 1.0, "hi": 1.0}
    # 60 of 200 samples flip 0 -> 1 and 20 flip 1 -> 0: gain 0.2, standard error ~0.039
    rng = np.random.default_rng(1)
    a = np.zeros(200)
    b = np.zeros(200)
    b[:60], a[60:80] = 1, 1
    perm = rng.permutation(200)
    r = evaluate.paired_bootstrap(a[perm], b[perm], 4000)
    assert r["diff"] == pytest.approx(0.2)
    assert 0.11 < r["lo"] < 0.15 and 0.25 < r["hi"] < 0.29


def test_seed_interval_by_hand():
    # the three seeds: GRPO - SFT accuracy +0.053, +0.017, +0.049: mean 0.0397, sd 0.01973,
    # t(0.975, 2) = 4.303 -> half width 4.303 * 0.01973 / sqrt 3 = 0.0490
    r = evaluate.seed_interval([0.053, 0.017, 0.049])
    assert r["diff"] == pytest.approx(0.039667, abs=1e-6)
    assert r["lo"] == pytest.approx(-0.009, abs=5e-4) and r["hi"] == pytest.approx(0.089, abs=5e-4)
    # no spread
    assert evaluate.seed_interval([0.02, 0.02, 0.02]) == {"diff": 0.02, "lo": 0.02, "hi": 0.02}
    one = evaluate.seed_interval([0.1])
    assert one["diff"] == 0.1 and np.isnan(one["lo"])  # one seed says nothing about seeds
    five = evaluate.seed_interval([0.0, 0.1, 0.0, 0.1, 0.05])  # sd 0.05, t(0.975, 4) = 2.776
    assert five["hi"] - five["diff"] == pytest.approx(2.776 * 0.05 / 5 ** 0.5, rel=1e-3)


def test_majority_baseline():
    rows = data.load_synthetic("validation", n=200)[:]
    base = evaluate.majority_baseline(rows)
    assert set(base) == set(data.QUESTION_TYPES)
    assert 0.4 < base["closed_ended_questions"] < 0.65      # yes/no, balanced
    assert 0.2 < base["single_choice_questions"] < 0.4      # four letters


def test_evaluate_script_two_checkpoints(tmp_path):
    import pretrain
    import run
    for name, seed in (("a", 0), ("b", 1)):
        m, p = pretrain.build(seed=seed)
        run.save(m, p, str(tmp_path / name))
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(tmp_path / "a"),
                        str(tmp_path / "b"),
                        "--split", "validation", "--n", "8", "--batch-size", "4",
                        "--max-new-tokens", "8",
                        "--bootstrap", "100", "--json", str(out), "--gallery",
                        str(tmp_path / "g.png")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [c["checkpoint"] for c in res["checkpoints"]] == [str(tmp_path / "a"),
                                                             str(tmp_path / "b")]
    keys = {"checkpoint", "n", "format_rate", "accuracy", "accuracy_by_type", "mean_iou",
            "iou50_rate",
            "grounding_rate", "consistency_rate", "count_rate", "n_boxes", "mean_length"}
    for c in res["checkpoints"]:
        assert set(c) == keys
        assert c["n"] == 8
        assert set(c["accuracy_by_type"]) == set(data.QUESTION_TYPES)
        assert all(0 <= c[k] <= 1 for k in keys - {"checkpoint", "n", "accuracy_by_type",
                                                   "mean_length", "n_boxes"})
        assert 0 < c["mean_length"] <= 8 and c["n_boxes"] >= 0
    (p,) = res["paired"]
    assert set(evaluate.METRICS) <= set(p["metrics"]) and "acc_single" in p["metrics"]
    assert all(v["lo"] <= v["diff"] <= v["hi"] for v in p["metrics"].values())
    assert (tmp_path / "g.png").stat().st_size > 1000
    # one checkpoint: a single flat object; --n 2 (fewer than the gallery's 4) and --predictions
    preds = tmp_path / "p.jsonl"
    r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(tmp_path / "a"),
                        "--split", "validation",
                        "--n", "2", "--max-new-tokens", "4", "--json", str(out), "--gallery",
                        str(tmp_path / "g2.png"),
                        "--predictions", str(preds), "--dtype", "float32"], capture_output=True,
                        text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(json.loads(out.read_text())) == keys and (tmp_path / "g2.png").exists()
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(lines) == 2 and set(lines[0]) == {"checkpoint", "image_path", "question",
                                                 "question_type", "reference",
                                                 "completion", "format", "answer", "grounding",
                                                 "iou", "consistency", "length"}
    assert lines[1]["image_path"] == "synthetic/validation/000001.png"
    assert 0 < lines[1]["length"] <= 4
    page = (tmp_path / "p.html").read_text()  # the best and worst answers, drawn
    assert page.count('<div class="c"') == 2 and "best and worst" in page


def test_evaluate_over_seeds(tmp_path):
    import pretrain
    import run
    for name, seed in (("a0", 0), ("a1", 1), ("b0", 2), ("b1", 3)):
        run.save(*pretrain.build(seed=seed), str(tmp_path / name))
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(tmp_path / "a0"),
                        str(tmp_path / "a1"),
                        "--against", str(tmp_path / "b0"), str(tmp_path / "b1"), "--split",
                        "validation", "--n", "6",
                        "--max-new-tokens", "6", "--bootstrap", "50", "--json", str(out),
                        "--gallery", ""],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "over 2 seeds" in r.stdout and "mean over seeds" in r.stdout
    seeds = json.loads(out.read_text())["seeds"]
    assert [list(p) for p in seeds["pairs"]] == [[str(tmp_path / "a0"), str(tmp_path / "b0")],
                                                [str(tmp_path / "a1"), str(tmp_path / "b1")]]
    for m, v in seeds["mean"].items():
        assert v["diff"] == pytest.approx(np.mean([p[m]["diff"] for p in seeds["per_seed"]]))
    r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(tmp_path / "a0"),
                        "--against",
                        str(tmp_path / "b0"), str(tmp_path / "b1")], capture_output=True, text=True)
    assert r.returncode != 0 and "--against takes one checkpoint per --checkpoint" in r.stderr
    assert "Traceback" not in r.stderr


def test_consistency_on_hand_made_cases():
    """Consistency asks whether the answer follows from the completion's own reasoning, right or
    wrong."""
    c = evaluate.consistency
    q = "Is there a nodule in the left lower lung zone?"
    says_nodule = ("<think>The left lower lung zone [60, 65, 100, 95] shows a small round "
                   "opacity.</think>")
    says_clear = "<think>The left lower lung zone [60, 65, 100, 95] is clear.</think>"
    assert c(says_nodule + "<answer>yes</answer>", q, "closed_ended_questions") == 1.0
    # contradicts itself
    assert c(says_nodule + "<answer>no</answer>", q, "closed_ended_questions") == 0.0
    # consistent, maybe wrong
    assert c(says_clear + "<answer>no</answer>", q, "closed_ended_questions") == 1.0
    other = "<think>The right upper lung zone [5, 10, 50, 45] is clear.</think><answer>no</answer>"
    assert c(other, q, "closed_ended_questions") == 0.0  # never looked there
    assert c("<answer>yes</answer>", q, "closed_ended_questions") == 0.0  # no reasoning at all
    q = ("Which region contains the mass? A. cardiac silhouette B. left mid lung zone "
         "C. right upper lung zone D. upper mediastinum")
    think = ("<think>The left mid lung zone [60, 40, 100, 60] shows a large dense opacity. "
             "The right upper lung zone [5, 10, 50, 45] is clear.</think>")
    assert c(think + "<answer>B</answer>", q, "single_choice_questions") == 1.0
    assert c(think + "<answer>C</answer>", q, "single_choice_questions") == 0.0
    q = ("Which of these regions appear normal? A. left mid lung zone B. right upper lung zone "
         "C. cardiac silhouette D. upper mediastinum")
    four = think[:-8] + (" The cardiac silhouette [40, 50, 70, 80] has a normal outline."
                         " The upper mediastinum [45, 5, 65, 50] is clear.</think>")
    assert c(four + "<answer>B, C, D</answer>", q, "multi_choice_questions") == 1.0
    assert c(four + "<answer>B, C</answer>", q, "multi_choice_questions") == 0.0
    # C and D never described
    assert c(think + "<answer>B</answer>", q, "multi_choice_questions") == 0.0
    q = "What abnormality is seen in the left mid lung zone?"
    assert c(think + "<answer>mass</answer>", q, "open_ended_questions") == 1.0
    assert c(think + "<answer>none</answer>", q, "open_ended_questions") == 0.0
    for junk in ("", "<think>The [1, 2, 3, 4] shows</think><answer>", "x" * 10000):
        assert c(junk, q, "open_ended_questions") == 0.0


def test_every_reference_trace_is_consistent():
    """The metric reads the traces data.py writes: every reference answer follows from its
    reasoning."""
    for i in range(300):
        s = data.make_sample("test", i)
        assert evaluate.consistency(s["response"], s["question"], s["question_type"]) == 1.0, s


def test_curves_plot(tmp_path, capsys):
    """--curves draws every run that has a metrics.jsonl and names the ones it leaves out."""
    from PIL import Image
    run = tmp_path / "grpo"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(1, 31):
            rec = {"step": step, "reward": step / 30}
            if step % 10 == 0:
                rec.update(val_answer=0.3 + step / 100, val_grounding=0.5)
            f.write(json.dumps(rec) + "\n")
    out = tmp_path / "curves.png"
    evaluate.curves(str(out), [str(run), str(tmp_path / "no_such_run")])
    assert f"{tmp_path / 'no_such_run'} has no metrics.jsonl, left out" in capsys.readouterr().out
    assert Image.open(out).size == (1500, 400)
