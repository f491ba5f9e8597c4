"""grpo.py: the maths against hand-computed values, micro-batch invariance, and a smoke run."""
import itertools
import json
import math
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import data
import credit
import grpo
import pretrain
import model as M
import run
import reward

# the loss tests add the KL term only where they test it (default 0.3)
CFG = grpo.GRPOConfig(beta=0.0, max_new_tokens=10)


# ----------------------------------------------------------------------------- advantages
def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.4, 0.6, 0.8])          # two groups of 4
    a = grpo.advantages(r, 4, "none")
    assert torch.allclose(a, torch.tensor([0.5, -0.5, 0.0, 0.0, -0.3, -0.1, 0.1, 0.3]))
    # group std (unbiased, as torch.std): group 1 -> sqrt(0.5 / 3), group 2 -> sqrt(0.2 / 3)
    g = grpo.advantages(r, 4, "group", eps=0.0)
    assert torch.allclose(g[:4], a[:4] / math.sqrt(0.5 / 3))
    assert torch.allclose(g[4:], a[4:] / math.sqrt(0.2 / 3))
    b = grpo.advantages(r, 4, "batch", eps=0.0)
    assert torch.allclose(b, a / r.std())


def test_a_group_of_equal_rewards_teaches_nothing():
    r = torch.tensor([0.7, 0.7, 0.7, 1.0, 0.0, 0.0])
    for norm in ("group", "batch", "none"):
        a = grpo.advantages(r, 3, norm)
        assert torch.all(a[:3] == 0) and a[3] > 0 > a[4]


def _tokens(tok, texts):
    """Completions as a sampled rollout holds them: right-padded ids [N, T] and lengths [N]."""
    rows = [tok(x, add_special_tokens=False)["input_ids"] for x in texts]
    T = max(map(len, rows))
    padded = [r + [tok.pad_token_id] * (T - len(r)) for r in rows]
    return torch.tensor(padded), [len(r) for r in rows]


def test_span_credit_by_hand():
    # one group of 2: completion 0 has the right answer but a loose box, completion 1 the reverse
    tok = pretrain.build_tokenizer()
    # + 3 ids past the tokenizer
    is_digit = credit.digit_tokens(credit.token_pieces(tok, len(tok) + 3))
    assert is_digit.shape == (len(tok) + 3,) and is_digit.sum() == 10
    assert all(is_digit[tok.convert_tokens_to_ids(str(d))] for d in range(10))
    # 8 tokens each
    ids = torch.tensor([tok("[1, 2] yes")["input_ids"], tok("[3, 4] no")["input_ids"]])
    scores = [{"format": 1, "answer": 1, "grounding": 0, "iou": 0.2},
              {"format": 1, "answer": 0, "grounding": 1, "iou": 0.9}]
    w = {"format": 0.25, "answer": 1.0, "grounding": 1.0, "iou": 0.5}
    a = credit.span_advantages(grpo.advantages, scores, ids, is_digit, w, 2, "none")
    digit = is_digit[ids]
    # text reward 1.25 vs 0.25 -> +-0.5; box reward 0.1 vs 1.45 -> -+0.675
    assert torch.allclose(a[digit], torch.tensor([-0.675, -0.675, 0.675, 0.675]))
    assert torch.allclose(a[~digit].view(2, -1),
                          torch.tensor([[0.5], [-0.5]]).expand(2, int((~digit[0]).sum())))
    # the loss takes the [N, T] advantages as they are: at rho = 1 the gradient is -A_t / tokens
    logp = torch.zeros(ids.shape, requires_grad=True)
    loss, _ = _loss(logp, logp.detach(), a, torch.ones(ids.shape), loss_agg="token")
    loss.backward()
    assert torch.allclose(logp.grad, -a / ids.numel())


def _coord(texts, ref, scores, w, norm, G=None):
    """coord_advantages on hand-made completions of one prompt -> (advantages [N, T], ids,
    a function giving the token positions of a substring of completion i)."""
    tok = pretrain.build_tokenizer()
    ids, lengths = _tokens(tok, texts)
    pieces = credit.token_pieces(tok, len(tok))
    a = credit.coord_advantages(grpo.advantages, scores, texts, [ref], ids, lengths, pieces, w,
                                G or len(texts), norm)

    def at(i, sub, nth=0):                   # token positions covering the nth occurrence of sub
        s = -1
        for _ in range(nth + 1):
            s = texts[i].index(sub, s + 1)
        ends = list(itertools.accumulate(len(pieces[t]) for t in ids[i, :lengths[i]].tolist()))
        return [t for t, e in enumerate(ends) if e - len(pieces[ids[i, t]]) < s + len(sub)
                and e > s]
    return a, ids, at


REF1 = "<think>The left lower lung zone [60, 70, 95, 95] is clear.</think><answer>no</answer>"
W = {"format": 0.25, "answer": 1.0, "grounding": 1.0, "iou": 0.5}


@pytest.mark.parametrize("norm", ["none", "group"])
def test_coordinate_credit_by_hand(norm):
    # one group of 2 against a reference box [60, 70, 95, 95] (35 wide, 25 high): completion 0
    # writes [62, 70, 90, 95] (errors 2, 0, 5, 0), completion 1 [58, 72, 95, 99] (errors 2, 2,
    # 0, 4) and a box for a region the reference does not have
    texts = ["<think>The left lower lung zone [62, 70, 90, 95] is clear.</think>"
             "<answer>no</answer>",
             "<think>The left lower lung zone [58, 72, 95, 99] is clear. The cardiac silhouette "
             "[1, 2, 3, 4] is clear.</think><answer>yes</answer>"]
    scores = [{"format": 1, "answer": 1, "grounding": 0, "iou": 0.5},
              {"format": 1, "answer": 0, "grounding": 0, "iou": 0.4}]
    a, ids, at = _coord(texts, REF1, scores, W, norm)
    # where: 1.5 (mean(e) - e) / scale with e = error / side. Coordinate 0 ties -> 0.
    # 'none' (scale 1): e = (0, 2/25) -> +-0.06; (5/35, 0) -> -+1.5 * 2.5/35; (0, 4/25) -> +-0.12
    # 'group' (scale std(e) + 1 px / side): the pixel formula 1.5 (mean - err) / (std + 1 px):
    # (0, 2) -> +-1.5 / (1 + sqrt 2); (5, 0) -> -+1.5 * 2.5 / (1 + sqrt 12.5); (0, 4) -> +-1.5 * 2 /
    # (1 + sqrt 8)
    c = ([0.06, 1.5 * 2.5 / 35, 0.12] if norm == "none" else
         [1.5 / (1 + 2 ** 0.5), 1.5 * 2.5 / (1 + 12.5 ** 0.5), 1.5 * 2 / (1 + 8 ** 0.5)])
    for i, sign in ((0, 1), (1, -1)):
        for number, want in zip(texts[i][33:47].split(", "),
                                [0, sign * c[0], -sign * c[1], sign * c[2]]):
            assert torch.allclose(a[i, at(i, number)], torch.tensor(float(want)),
                                  atol=1e-5), (i, number)
    # count: the box rewards as if the paired box were exact. 0: 1 box of 1 -> 1 + 0.5 = 1.5;
    # 1: 2 boxes, 1 paired -> grounding 0, iou 1/2 -> 0.25. Advantages +-0.625 ('none'), and
    # +-0.625 / std = +-0.7071 ('group': the std of (1.5, 0.25) is 0.8839)
    k = 0.625 if norm == "none" else 0.625 / 0.8838835
    # text (format + answer): 1.25 vs 0.25 -> +-0.5 ('none'), +-0.7071 ('group')
    t = 0.5 if norm == "none" else 0.5 / 0.7071068
    box = at(1, "cardiac silhouette [1, 2, 3, 4]")
    digit_ids = ids.new_tensor(pretrain.build_tokenizer().convert_tokens_to_ids(list("1234")))
    digits = [p for p in box if ids[1, p] in digit_ids]
    # the hallucination: count
    assert len(digits) == 4 and torch.allclose(a[1, digits], torch.tensor(-k), atol=1e-3)
    words = [p for p in box if p not in digits]
    # its name and brackets: text + count
    assert torch.allclose(a[1, words], torch.tensor(-t - k), atol=1e-3)
    # 0 stopped at the right count
    assert torch.allclose(a[0, at(0, "</think>")], torch.tensor(t + k), atol=1e-3)
    # 1 stopped late: its box is blamed
    assert torch.allclose(a[1, at(1, "</think>")], torch.tensor(-t), atol=1e-3)
    # every other token: the text's
    assert torch.allclose(a[0, at(0, "is clear.")], torch.tensor(t), atol=1e-3)
    # text that does not match its tokens (here one number too few): no box credit in that row
    tok = pretrain.build_tokenizer()
    b = credit.coord_advantages(grpo.advantages, scores, [texts[0], texts[1][:40]], [REF1], ids,
                                _tokens(tok, texts)[1], credit.token_pieces(tok, len(tok)), W, 2,
                                norm)
    assert torch.allclose(b[1], torch.tensor(-t), atol=1e-3)


def test_a_hallucinated_box_is_pushed_down_and_the_right_box_alone_is_not():
    # the right box alone (total 1.0) against the right box plus a hallucinated one (0.6875),
    # with the default weights and --adv-norm batch: before, every token got advantage 0
    right = "<think>The left lower lung zone [60, 70, 95, 95] is clear.</think><answer>no</answer>"
    extra = ("<think>The left lower lung zone [60, 70, 95, 95] is clear. The cardiac silhouette "
             "[40, 60, 80, 90] is clear.</think><answer>no</answer>")
    scores = [reward.score(x, REF1, "closed_ended_questions") for x in (right, extra)]
    assert [s["total"] for s in scores] == [1.0, 0.6875]
    a, _, at = _coord([right, extra], REF1, scores, reward.DEFAULT_WEIGHTS, "batch")
    # count rewards 0.5 + 0.25 = 0.75 and 0.125: +-0.3125 / their std 0.4419 = +-0.7071
    assert torch.allclose(a[1, at(1, "cardiac silhouette [40, 60, 80, 90]")], torch.tensor(-0.7071),
                          atol=1e-3)
    assert (a[0, at(0, "left lower lung zone [60, 70, 95, 95]")] >= 0).all()
    assert torch.allclose(a[0, at(0, "</think>")], torch.tensor(0.7071), atol=1e-3)


def test_a_missing_box_is_pushed_down_at_the_end_of_the_reasoning():
    ref = ("<think>The left lower lung zone [60, 70, 95, 95] shows a small round opacity. The "
           "cardiac silhouette [40, 60, 80, 90] has a normal outline.</think><answer>A</answer>")
    both = ("<think>The left lower lung zone [60, 70, 95, 95] shows a small round opacity. The "
            "cardiac silhouette [40, 60, 80, 90] has a normal outline.</think><answer>A</answer>")
    one = ("<think>The left lower lung zone [60, 70, 95, 95] shows a small round opacity.</think>"
           "<answer>A</answer>")
    scores = [reward.score(x, ref, "single_choice_questions") for x in (both, one)]
    a, _, at = _coord([both, one], ref, scores, W, "none")
    # count: 2 of 2 -> 1 + 0.5 = 1.5; 1 of 2 -> grounding 0, iou 1/2 -> 0.25: +-0.625. Text ties.
    assert torch.allclose(a[1, at(1, "</think>")], torch.tensor(-0.625))
    assert torch.allclose(a[0, at(0, "</think>")], torch.tensor(0.625))
    # the box it wrote: exact, tied
    assert (a[1, at(1, "left lower lung zone [60, 70, 95, 95]")] == 0).all()


def test_reordered_boxes_are_credited_by_geometry():
    # two completions write the same two boxes in opposite orders, one of them 3 px off on x1:
    # the credit follows the boxes, not their place in the text
    ref = ("<think>The left lower lung zone [60, 70, 95, 95] is clear. The cardiac silhouette [40, "
           "10, 80, 50] has a normal outline.</think><answer>no</answer>")
    first = ("<think>The left lower lung zone [63, 70, 95, 95] is clear. The cardiac silhouette "
             "[40, 10, 80, 50] has a normal outline.</think><answer>no</answer>")
    second = ("<think>The cardiac silhouette [40, 10, 80, 50] has a normal outline. The left lower "
              "lung zone [60, 70, 95, 95] is clear.</think><answer>no</answer>")
    scores = [reward.score(x, ref, "closed_ended_questions") for x in (first, second)]
    a, _, at = _coord([first, second], ref, scores, W, "none")
    # x1 of the lung box: e = 3/35 and 0 -> 1.5 * -+1.5/35 = -+0.0643; every other token ties: 0
    assert torch.allclose(a[0, at(0, "63")], torch.tensor(-1.5 * 1.5 / 35))
    assert torch.allclose(a[1, at(1, "60")], torch.tensor(1.5 * 1.5 / 35))
    a[0, at(0, "63")] = a[1, at(1, "60")] = 0
    assert (a == 0).all()


def test_a_group_that_ties_gets_no_advantage_anywhere():
    text = ("<think>The left lower lung zone [61, 70, 95, 95] is clear. The cardiac silhouette [1, "
            "2, 3, 4] is clear.</think><answer>yes</answer>")
    scores = [reward.score(text, REF1, "closed_ended_questions")] * 3
    for norm in ("group", "batch", "none"):
        a, _, _ = _coord([text] * 3, REF1, scores, W, norm)
        assert (a == 0).all(), norm


@pytest.mark.parametrize("style", ["({region} [{box}])", "{region} ([{box}])"])
def test_coordinate_credit_is_matched_by_geometry_not_wording(style):
    # the paper's two box styles; the completions name the regions unlike the reference, write
    # them in the other order and after a clause: every coordinate of every box is still credited
    b = lambda *v: ", ".join(map(str, v))  # noqa: E731
    ref = ("The heart is enlarged " + style.format(region="cardiac silhouette",
                                                   box=b(70, 90, 160, 170)) +
           ", and fluid blunts the angle " + style.format(region="right costophrenic angle",
                                                          box=b(30, 150, 70, 190)) +
           ".<answer>yes</answer>")
    def completion(heart, angle):
        return ("<think>On the right there is an effusion "
                + style.format(region="right CP recess", box=b(*angle))
                + "; the heart looks big " + style.format(region="heart shadow", box=b(*heart)) +
                ".</think><answer>yes</answer>")
    texts = [completion((72, 88, 158, 171), (33, 149, 68, 194)),
             completion((69, 93, 165, 166), (28, 152, 73, 185))]
    layout = reward.box_layout(texts[0], ref)
    assert [(x.paired, x.errors) for x in layout.boxes] == [(1, [3.0, 1.0, 2.0, 4.0]),
                                                         (0, [2.0, 2.0, 2.0, 1.0])]
    scores = [reward.score(t, ref, "closed_ended_questions") for t in texts]
    a, ids, at = _coord(texts, ref, scores, reward.DEFAULT_WEIGHTS, "none")
    numbers = [at(i, f"{v}") for i, t in enumerate(texts)
               for v in (re.findall(r"\d+", t[t.index("["):]))]
    assert len(numbers) == 16
    for i, t in enumerate(texts):  # every digit of every coordinate (no two errors tie)
        for v in re.findall(r"\[([\d, ]+)\]", t):
            for n in v.split(", "):
                assert (a[i, at(i, "[" + v + "]")] != 0).any()


# ----------------------------------------------------------------------------- the clipped loss
def _loss(logp, old, adv, mask, ref=None, **kw):
    """grpo.py's loss for one micro-batch that is the whole rollout: (loss, diagnostics)."""
    cfg = replace(CFG, **kw)
    a = adv if adv.dim() == 2 else adv.unsqueeze(1)
    loss = grpo.aggregate(grpo.per_token_loss(logp, old, ref, a, cfg), mask, cfg,
                          grpo.loss_denominator(mask, cfg))
    return loss, grpo.diagnostics(logp, old, ref, a, mask, cfg)


def test_loss_at_ratio_one_is_minus_mean_advantage_and_gradient_is_not_zero():
    # mu = 1: rho == 1 everywhere. Group-normalised advantages sum to ~0, so the printed loss is
    # ~0 -- but its gradient is -A * grad log pi, which is not.
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.3]], requires_grad=True)
    mask, adv = torch.ones(2, 2), torch.tensor([1.0, -1.0])
    loss, _ = _loss(logp, logp.detach(), adv, mask, loss_agg="token")
    assert abs(loss.item()) < 1e-7
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -0.25], [0.25, 0.25]]))   # -A / 4 tokens


def test_clipping_by_hand():
    # ratios e^{0.5} = 1.65 (above 1 + 0.28) and e^{-0.5} = 0.61 (below 1 - 0.2)
    logp = torch.tensor([[0.5, -0.5, 0.5, -0.5]], requires_grad=True)
    old, mask = torch.zeros(1, 4), torch.ones(1, 4)
    loss, st = _loss(logp, old, torch.tensor([2.0]), mask, loss_agg="token")
    # A > 0: min(rho A, clip(rho) A) -> 1.28 A (clipped, no gradient) and 0.61 A (unclipped)
    want = -(1.28 * 2 + math.exp(-0.5) * 2 + 1.28 * 2 + math.exp(-0.5) * 2) / 4
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0                     # clipped: no gradient
    assert logp.grad[0, 1].item() == pytest.approx(-2 * math.exp(-0.5) / 4)  # -A rho / n
    assert st["clip_high"].item() == pytest.approx(0.5) and st["clip_low"].item() == 0
    # A < 0: the low ratio is clipped (0.8 A), the high one is not (the pessimistic bound)
    logp.grad = None
    loss, st = _loss(logp, old, torch.tensor([-1.0]), mask, loss_agg="token")
    loss.backward()
    assert logp.grad[0, 1] == 0 and logp.grad[0, 0].item() == pytest.approx(math.exp(0.5) / 4)
    assert st["clip_low"].item() == pytest.approx(0.5) and st["clip_high"].item() == 0


def test_k3_kl_by_hand():
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])                        # d = log(ref / pi) = -log 2
    loss, st = _loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 1), ref, beta=0.1,
                     loss_agg="token")
    k3 = 0.5 - math.log(0.5) - 1                                  # e^d - d - 1
    assert st["kl_ref"].item() == pytest.approx(k3) and loss.item() == pytest.approx(0.1 * k3)


def test_loss_aggregations_by_hand():
    # rho = 1, so each token's loss is exactly -A: sequence 1 has 1 token of loss 1,
    # sequence 2 has 3 tokens of loss -0.5
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    adv = torch.tensor([-1.0, 0.5])                                # token losses: 1 and -0.5
    seq, _ = _loss(logp, logp, adv, mask, loss_agg="seq")
    tok, _ = _loss(logp, logp, adv, mask, loss_agg="token")
    const, _ = _loss(logp, logp, adv, mask, loss_agg="constant", max_new_tokens=5)
    assert seq.item() == pytest.approx((1 + -0.5) / 2)             # mean of per-sequence means
    assert tok.item() == pytest.approx((1 - 1.5) / 4)              # every token counts once
    assert const.item() == pytest.approx((1 - 1.5) / (2 * 5))      # G*B*max_new_tokens


def test_a_fully_dropped_rollout_is_a_zero_loss_not_nan():
    # --drop-truncated can mask every completion of a step: no gradient, but no NaN either
    logp = torch.zeros(2, 3, requires_grad=True)
    for agg in ("seq", "token", "constant"):
        loss, _ = _loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.zeros(2, 3),
                        loss_agg=agg)
        assert loss.item() == 0.0


# ----------------------------------------------------------------------------- micro-batching
def _rollout(n_prompts=2, G=3):
    torch.manual_seed(0)
    policy, processor = pretrain.build()
    rows = [data.make_sample("train", i) for i in range(n_prompts)]
    roll = M.sample(policy, processor, [r["image"] for r in rows], [r["question"] for r in rows], G,
                    max_new_tokens=10)
    # completions of different lengths, as if ended
    for i, n in enumerate([10, 4, 7, 2, 9, 3][:n_prompts * G]):
        roll["completion_mask"][i, n:] = 0
    return policy, roll


@pytest.mark.parametrize("agg", ["seq", "token", "constant"])
def test_micro_batched_update_equals_unbatched(agg):
    policy, roll = _rollout()
    N = roll["completion_ids"].shape[0]
    adv = torch.linspace(-1, 1, N)
    # rho != 1
    noise = 0.05 * torch.randn(N, roll["completion_ids"].shape[1])
    old = grpo.logprobs(policy, roll, N, CFG.temperature) + noise
    grads = []
    for size in (N, 2, 1):
        policy.zero_grad()
        loss, _ = grpo.accumulate_gradients(policy, roll, adv, old, None,
                                            replace(CFG, micro_batch=size, loss_agg=agg))
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()
                                if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], rtol=1e-4, atol=1e-6)


def test_micro_batches_cut_prompts_by_group():
    _, roll = _rollout()                                             # 2 prompts x G = 3
    parts = list(grpo.micro_batches(roll, 4))
    # group 2 straddles
    assert [(s[0].start, s[0].stop, r) for s, _, r in parts] == [(0, 4, [3, 1]), (4, 6, [2])]
    lengths = roll["completion_mask"].sum(1)
    # columns: to the longest
    assert [s[1].stop for s, _, _ in parts] == [int(lengths[:4].max()), int(lengths[4:].max())]
    assert torch.equal(parts[0][1]["input_ids"], roll["prompt"]["input_ids"])
    assert torch.equal(parts[1][1]["input_ids"], roll["prompt"]["input_ids"][1:])
    for _, p, _ in parts:
        assert p["pixel_values"].shape[0] == int(p["image_grid_thw"].prod(-1).sum())


# ----------------------------------------------------------------------------- the script
def test_bad_flags_are_named(tmp_path):
    for flags, word in (({"group_size": 1}, "--group-size"), ({"lr": -1.0}, "--lr"),
                        ({"eps_low": 1.5}, "--eps-low"),
                        ({"loss_agg": "sum"}, "--loss-agg"), ({"w_answer": -1.0}, "weights"),
                        ({"top_p": 0.9}, "off-policy"),
                        ({"types": "yes_no"}, "--types"), ({"credit": "box"}, "--credit")):
        with pytest.raises(SystemExit, match=word):
            grpo.check(replace(CFG, **flags))
    grpo.check(grpo.GRPOConfig())                                 # the defaults are fine
    # and from the command line: one line, non-zero exit, no traceback
    r = subprocess.run([sys.executable, "grpo.py", "--init", pretrain.BASE, "--types",
                        "closed_ended_questions",
                        "--train-size", "8", "--out", str(tmp_path / "o")], capture_output=True,
                        text=True)
    assert r.returncode != 0
    assert "2 training prompts of --types closed_ended_questions" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "grpo.py", "--group-size", "1"], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "--group-size" in r.stderr and "Traceback" not in r.stderr


def test_grpo_smoke_then_evaluate(tmp_path):
    init = tmp_path / "init"
    run.save(*pretrain.build(), str(init))
    out = tmp_path / "grpo"
    r = subprocess.run([sys.executable, "grpo.py", "--init", str(init), "--out", str(out),
                        "--max-steps", "2",
                        "--prompts", "2", "--group-size", "2", "--max-new-tokens", "12", "--mu",
                        "2",
                        "--beta", "0.04", "--micro-batch", "3", "--eval-every", "0", "--eval-n",
                        "2", "--train-size", "16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for key in ("reward_format", "reward_answer", "reward_grounding", "reward_iou", "reward_std",
                "zero_std_groups",
                "length_mean", "length_max", "truncated", "kl_ref", "kl_old", "clip_low",
                "clip_high", "entropy",
                "grad_norm", "lr", "time_generate", "time_score", "time_ref", "time_train"):
        assert key in lines[-1], key
    assert "val_answer" in lines[-1]
    # the benchmark line: mean seconds per step (the first is warm-up) and its split, which adds up
    line = next(x for x in r.stdout.splitlines()
                if x.startswith("seconds per step over steps 2-2:"))
    total, parts = float(line.split(": ")[1].split(" = ")[0]), [float(w) for w in line.split()
                                                                if w[0].isdigit() and "." in w]
    assert total == pytest.approx(sum(parts[1:]), abs=0.03) and total == pytest.approx(sum(
        lines[1][f"time_{k}"] for k in ("generate", "score", "ref", "train")), abs=0.01)
    assert all(math.isfinite(v) for x in lines for v in x.values())
    model, _ = M.load(str(out))                                   # saved with save_pretrained
    before, _ = M.load(str(init))
    changed = any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))
    # by default the tower sft.py kept is kept here too, bit for bit
    tower = [(a, b) for (n, a), (_, b) in zip(model.named_parameters(), before.named_parameters())
             if ".visual." in n]
    assert tower and all(torch.equal(a, b) for a, b in tower)
    # a random-init model usually earns equal rewards in every group: then step 1's gradient is
    # only the float noise of a KL between two equal models. AdamW's normalisation still turns
    # that noise into a step of ~lr per weight, so by step 2 the KL has a real gradient.
    if all(x["zero_std_groups"] == 1 for x in lines):
        assert lines[0]["grad_norm"] < 1e-3
    else:
        assert changed


def test_the_benchmark_script_runs_both_of_its_measurements(tmp_path):
    # tests/benchmark.py prints figures for the README's speed section; here only that it runs
    # (TRL is not a dependency: its side is exercised where trl is installed, by hand)
    r = subprocess.run([sys.executable, "tests/benchmark.py", "model", "--repeats", "1",
                        "--batch-size", "2",
                        "--prompts", "2", "--group-size", "2", "--max-new-tokens", "4"],
                        capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "forward+backward, batch 2:" in r.stdout, r.stderr[-2000:]
    assert "rollout 2 x 2" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "tests/benchmark.py", "one", "grpo", "--init",
                        pretrain.BASE, "--out", str(tmp_path),
                        "--steps", "2", "--prompts", "2", "--group-size", "2", "--max-new-tokens",
                        "6"],
                       capture_output=True, text=True)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and got["s_per_step"] > 0 and 1 <= got["length"] <= 6, r.stderr[-2000:]
