"""rollouts.py: the page shows exactly what grpo.py computed (one span per completion token with
its advantage, every completion's rewards, one overlay per parsed box), grpo.py writes it, and
a browser draws it."""
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import data
import credit
import grpo
import pretrain
import model as M
import reward
import rollouts
import run


class Page(HTMLParser):
    """The parts of a page a test checks: per completion, its head line and token spans; boxes."""

    def __init__(self, text):
        super().__init__()
        self.completions, self.rects, self._in = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and a.get("class") == "c":
            self.completions.append({"head": "", "spans": []})
        elif tag == "div" and a.get("class") == "head":
            self._in = "head"
        elif tag == "span" and a.get("class") == "t":
            self.completions[-1]["spans"].append([a["title"], ""])
            self._in = "span"
        elif tag == "rect":
            self.rects.append(a["class"])

    def handle_endtag(self, tag):
        self._in = None if tag in ("div", "span") else self._in

    def handle_data(self, d):
        if self._in == "head":
            self.completions[-1]["head"] += d
        elif self._in == "span":
            self.completions[-1]["spans"][-1][1] += d


REF = ("<think>The left lower lung zone [60, 70, 95, 95] shows a small round opacity.</think>"
       "<answer>left lower lung zone</answer>")
TEXTS = [REF,
         "<think>The left lower lung zone [62, 70, 90, 95] shows a small round opacity. The "
         "cardiac silhouette [40, 60, 80, 90] has a normal outline.</think><answer>left lower lung "
         "zone</answer>",
         "<think>The right lower lung zone [20, 70, 50, 95] is clear.</think><answer>none</answer>"]


@pytest.mark.parametrize("mode", ["sequence", "span", "coord"])
def test_the_page_shows_each_token_with_the_advantage_grpo_computed(mode, tmp_path):
    tok = pretrain.build_tokenizer()
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    sample = data.make_sample("train", 0)
    roll = {"group_size": 3, "completion_ids": ids,
            "completion_mask": (torch.arange(T) < lengths[:, None]).float(),
            "texts": TEXTS, "truncated": torch.tensor([False, False, True])}
    scores = [reward.score(t, REF, "open_ended_questions") for t in TEXTS]
    pieces = credit.token_pieces(tok, len(tok))
    cfg = grpo.GRPOConfig(credit=mode)
    adv = (grpo.advantages(torch.tensor([s["total"] for s in scores]), 3, cfg.adv_norm)
           if mode == "sequence" else
           credit.token_advantages(grpo.advantages, cfg, scores, roll, [REF], pieces,
                                   credit.digit_tokens(pieces), reward.DEFAULT_WEIGHTS))
    rows_ = {"image": [sample["image"]], "question": ["Where is the nodule?"],
             "question_type": ["open_ended_questions"], "response": [REF]}
    record = rollouts.step_record(50, mode, roll, rows_, scores, adv, lengths, pieces)
    path = rollouts.write_step(str(tmp_path), 50, record, 50)
    page = Page(open(path).read())
    assert len(page.completions) == 3
    for i, c in enumerate(page.completions):
        want = adv[i, :lengths[i]] if adv.dim() == 2 else adv[i].expand(int(lengths[i]))
        assert len(c["spans"]) == int(lengths[i])  # one span per token
        assert "".join(s for _, s in c["spans"]) == TEXTS[i]  # the tokens spell the text
        got = torch.tensor([float(t.split("= ")[1]) for t, _ in c["spans"]])
        assert torch.allclose(got, want.float(), atol=6e-5)  # the advantage of each
        assert f"total {scores[i]['total']:.3f}" in c["head"]
        assert all(f"{k} {scores[i][k]:.2f}" in c["head"] for k in reward.REWARDS)
    assert ("TRUNCATED" in page.completions[2]["head"]) and "ended" in page.completions[0]["head"]
    # one overlay per parsed box: the reference's, then each completion's in its own class
    assert page.rects == ["box ref", "box c0", "box c1", "box c1", "box c2"]
    assert json.load(open(path[:-5] + ".json"))["prompts"][0]["completions"][1]["advantages"] == \
        pytest.approx(adv[1, :lengths[1]].tolist() if adv.dim() == 2
                      else [float(adv[1])] * int(lengths[1]))
    if mode == "sequence":                # one colour per completion; span/coord paint tokens apart
        assert len({t for t, _ in page.completions[1]["spans"]}) == 1
    else:
        assert len({t for t, _ in page.completions[1]["spans"]}) > 1


def test_grpo_writes_a_page_every_shown_step(tmp_path):
    init, out = tmp_path / "init", tmp_path / "grpo"
    run.save(*pretrain.build(), str(init))
    r = subprocess.run([sys.executable, "grpo.py", "--init", str(init), "--out", str(out),
                        "--max-steps", "3",
                        "--prompts", "2", "--group-size", "2", "--max-new-tokens", "8",
                        "--show-every", "1",
                        "--eval-every", "0", "--eval-n", "2", "--train-size", "16", "--save-every",
                        "0"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    folder = out / "rollouts"
    assert sorted(os.listdir(folder)) == ["index.html"] + [f"step_00000{s}.{e}" for s in (1, 2, 3)
                                                           for e in ("html", "json")]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for s in (1, 2, 3):
        record = json.load(open(folder / f"step_00000{s}.json"))
        page = Page((folder / f"step_00000{s}.html").read_text())
        completions = [c for p in record["prompts"] for c in p["completions"]]
        assert len(page.completions) == len(completions) == 4
        for c, shown in zip(completions, page.completions):
            assert [t for t, _ in shown["spans"]] == [f"A = {a:+.4f}" for a in c["advantages"]]
            assert len(shown["spans"]) == len(c["tokens"])
        assert record["reward"] == pytest.approx(metrics[s - 1]["reward"])
    index = (folder / "index.html").read_text()
    assert all(f'href="step_00000{s}.html"' in index for s in (1, 2, 3))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None,
                    reason="headless Chromium is not installed (Debian: apt install chromium)")
def test_a_browser_draws_the_page(tmp_path):
    from PIL import Image
    record = {"step": 1, "credit": "coord", "reward": 0.5, "zero_std_groups": 0.0, "prompts": [
        rollouts.prompt_record(data.make_sample("train", 0)["image"], "Where is the nodule?",
                               "open_ended_questions",
                               REF, [{"text": t, "tokens": list(t),
                                      "advantages": list(np.linspace(-1, 1, len(t))),
                                      "rewards": reward.score(t, REF, "open_ended_questions"),
                                      "truncated": False}
                                     for t in TEXTS])]}
    path = rollouts.write_step(str(tmp_path), 1, record, 1)
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900",
                    f"--screenshot={shot}", f"file://{path}"], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 20                                                       # not blank
    blue = (pixels[..., 2] - pixels[..., 0] > 60).mean()
    orange = (pixels[..., 0] - pixels[..., 2] > 60).mean()
    assert blue > 0.001 and orange > 0.001  # both ends of the scale drawn
