"""Rewards against hand-computed values, and the promise that no string can break them."""
import pytest

import data
import reward
from reward import (GROUNDING_IOU, answer_correct, grounding_scores, iou, letters,
                    open_answer_score, parse, score, yes_no)


def trace(boxes, answer="yes"):
    sents = " ".join(f"The left lower lung zone {data.format_box(b)} is clear." for b in boxes)
    return f"<think>{sents}</think><answer>{answer}</answer>"


# ----------------------------------------------------------------------------- IoU
@pytest.mark.parametrize("a, b, expected", [
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),             # identical
    ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),           # disjoint
    ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),            # touching along an edge: no shared area
    ([0, 0, 10, 10], [2, 2, 7, 7], 25 / 100),          # nested: inner area / outer area
    ([0, 0, 10, 10], [5, 0, 15, 10], 50 / 150),        # half overlap: 50 / (100 + 100 - 50)
    ([0, 0, 10, 10], [5, 5, 15, 15], 25 / 175),        # corner overlap
    ([10, 10, 0, 0], [0, 0, 10, 10], 0.0),             # swapped corners: no area, never repaired
    ([0, 0, 0, 10], [0, 0, 10, 10], 0.0),              # zero width
])
def test_iou_hand_computed(a, b, expected):
    assert iou(a, b) == pytest.approx(expected)
    assert iou(b, a) == pytest.approx(expected)


def test_grounding_count_mismatch_and_dense_iou():
    ref = [[0, 0, 10, 10], [20, 20, 30, 30]]
    # one perfect box of two: the paper's rule says 0 (count differs), dense IoU = 1 / 2
    assert grounding_scores([[0, 0, 10, 10]], ref) == (0.0, 0.5)
    # three boxes for two: the extra one costs, 2 / 3
    assert grounding_scores(ref + [[50, 50, 60, 60]], ref) == (0.0, pytest.approx(2 / 3))
    # order does not matter: matching is one-to-one and optimal
    assert grounding_scores(ref[::-1], ref) == (1.0, 1.0)
    # a duplicated box cannot be matched twice
    assert grounding_scores([[0, 0, 10, 10], [0, 0, 10, 10]], ref)[1] == pytest.approx(0.5)
    assert grounding_scores([], ref) == (0.0, 0.0)


def test_matching_is_optimal_not_greedy():
    # 1-D intervals of height 10. Greedy takes the best pair first, p0-r0 (9/11), leaving
    # p1-r1 (2/18): 0.929. The optimum pairs p0-r1 (8/12) and p1-r0 (5/15): exactly 1.0.
    ref = [[10, 0, 20, 10], [13, 0, 23, 10]]
    pred = [[11, 0, 21, 10], [5, 0, 15, 10]]
    assert iou(pred[0], ref[0]) + iou(pred[1], ref[1]) == pytest.approx(9 / 11 + 2 / 18)
    assert grounding_scores(pred, ref)[1] == pytest.approx((8 / 12 + 5 / 15) / 2)


def test_grounding_threshold_is_strict():
    ref = [[0, 0, 100, 100]]
    at = [[0, 0, 75, 100]]        # IoU exactly 0.75: the paper requires MORE than 0.75
    above = [[0, 0, 76, 100]]     # IoU 0.76
    assert iou(at[0], ref[0]) == pytest.approx(GROUNDING_IOU)
    assert grounding_scores(at, ref)[0] == 0.0
    assert grounding_scores(above, ref)[0] == 1.0


# ----------------------------------------------------------------------------- answers
@pytest.mark.parametrize("pred, ref, ok", [
    ("A, C", "A, C", 1), ("C,A", "A, C", 1), ("a and c", "A, C", 1), ("['C', 'A']", "A, C", 1),
    ("(A) (C)", "A, C", 1), ("A; C", "A, C", 1), ("A. nodule, C. mass", "A, C", 1),
    ("A", "A, C", 0), ("A, B, C", "A, C", 0), ("", "A, C", 0), ("none", "A, C", 0),
    ("bad", "A, B, D", 0), ("BAD", "A, B, D", 0), ("AC", "A, C", 0), ("cab", "A, B, C", 0),
      # words, not letters
])
def test_multi_choice_order_and_spacing(pred, ref, ok):
    assert answer_correct(pred, ref, "multi_choice_questions") == ok


@pytest.mark.parametrize("pred, ok",
                         [("B", 1), ("(B)", 1), ("B. mass", 1), ("Option B", 1), ("b", 1),
                                      ("B, C", 0), ("C", 0), ("mass", 0)])
def test_single_choice(pred, ok):
    assert answer_correct(pred, "B", "single_choice_questions") == ok


def test_closed_and_open():
    assert answer_correct("Yes.", "yes", "closed_ended_questions") == 1
    assert answer_correct("no", "yes", "closed_ended_questions") == 0
    assert answer_correct("maybe", "maybe", "closed_ended_questions") == 0   # only yes/no count
    assert answer_correct("The Left lower-lung zone.", "left lower lung zone",
                          "open_ended_questions") == 1
    assert answer_correct("left upper lung zone", "left lower lung zone",
                          "open_ended_questions") == 0
    assert answer_correct("no finding", "none", "open_ended_questions") == 1
    assert letters("A, C") == ["A", "C"] and letters("I think B") == ["B"]


# ----------------------------------------------------------------------------- format and total
def test_format_reward():
    good = trace([[1, 2, 30, 40]])
    assert score(good, good, "closed_ended_questions")["format"] == 1.0
    bad = [
        good.replace("<think>", ""),                       # missing open tag
        good + "<answer>no</answer>",                      # two answers
        "Sure! " + good,                                   # text before
        good.replace("[1, 2, 30, 40]", ""),                # no box
        good.replace("[1, 2, 30, 40]", "[30, 2, 1, 40]"),  # reversed box
        good.replace("[1, 2, 30, 40]", "[1.5, 2, 30, 40]"),  # non-integer pixel
        good.replace("yes", " "),                          # empty answer
        "<answer>yes</answer><think>[1, 2, 30, 40]</think>",  # wrong order
    ]
    for text in bad:
        assert score(text, good, "closed_ended_questions")["format"] == 0.0, text
    # a frame makes out-of-image boxes invalid
    assert parse(trace([[0, 0, 200, 50]]), image_size=(112, 112)).well_formed is False
    assert parse(trace([[0, 0, 112, 50]]), image_size=(112, 112)).well_formed is True


def test_total_is_weighted_mean():
    ref = trace([[0, 0, 10, 10], [20, 20, 30, 30]], "yes")
    pred = trace([[0, 0, 10, 10]], "yes")
    s = score(pred, ref, "closed_ended_questions",
              weights={"format": 1, "answer": 2, "grounding": 0, "iou": 1})
    assert (s["format"], s["answer"], s["grounding"], s["iou"]) == (1.0, 1.0, 0.0, 0.5)
    assert s["total"] == pytest.approx((1 * 1 + 2 * 1 + 1 * 0.5) / 4)


def test_parse_reads_regions_and_tolerates_missing_think():
    p = parse("The right upper lung zone [1, 2, 3, 4] is clear. Nothing in the cardiac silhouette "
              "[5, 6, 7, 8].<answer>no</answer>")
    assert [r for r, _ in p.boxes] == ["right upper lung zone", "cardiac silhouette"]
    assert p.answer == "no" and p.well_formed is False


def test_every_synthetic_reference_scores_one_against_itself():
    for split in data.SPLITS:
        for i in range(120):
            s = data.make_sample(split, i)
            r = score(s["response"], s["response"], s["question_type"], image_size=(112, 112))
            assert all(v == 1.0 for v in r.values()), (split, i, s["response"], r)


# ----------------------------------------------------------------------------- adversarial input
ADVERSARIAL = [
    "", " ", "<think>", "</think>", "<answer>",
    "<think><think></think></think><answer><answer>x</answer>",
    "<think>[1, 2, 3, 4]</think><answer>", "<answer>yes</answer><answer>no</answer>",
    "<think>" + "[" * 5000 + "</think><answer>A</answer>",
    "<think>[-5, -5, -1, -1] [99999999999999999999, 1, 2, 3] [1e9, 2, 3, "
    "4]</think><answer>yes</answer>",
    "<think>[" + "9" * 6000 + ", 1, 2, 3]</think><answer>B</answer>",
    "<think>[1.5, 2.25, 3.125, 4.0] [nan, inf, 1, 2]</think><answer>A,</answer>",
    "<think>左下肺野 [1, 2, 30, 40] 🫁</think><answer>是</answer>",
    "\x00\x01\ufffd<answer>\u202e</answer>",
    "<think>" + "the left lung " * 3000 + "</think><answer>" + "A, " * 3000 + "</answer>",
    "<think>" + "[1, 2, 3, 4] " * 2000 + "</think><answer>yes</answer>",   # thousands of boxes
]


@pytest.mark.parametrize("text", ADVERSARIAL)
@pytest.mark.parametrize("qtype", data.QUESTION_TYPES + ["not_a_type"])
def test_never_raises_and_stays_in_range(text, qtype):
    ref = data.make_sample("test", 3)["response"]
    for a, b in ((text, ref), (ref, text), (text, text)):
        out = score(a, b, qtype)
        assert set(out) == {"format", "answer", "grounding", "iou", "total"}
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in out.values()), out
    assert score(None, ref, qtype)["total"] == 0.0   # not even a string


# ------------------------------------------------------------- free-text answers (GEMeX open-ended)

PARAPHRASES = [   # (prediction, reference): the same finding in other words -> high
    ("Cardiomegaly.", "Moderately enlarged heart."),
    ("The heart is enlarged.", "Cardiomegaly is present"),
    ("Enlarged cardiac silhouette", "cardiomegaly"),
    ("The heart size is normal.", "Normal cardiac silhouette."),
    ("There is a left pleural effusion.", "Small left-sided effusion."),
    ("Blunting of the right costophrenic angle", "right pleural effusion"),
    ("No pneumothorax is seen.", "There is no pneumothorax."),
    ("Pneumothorax absent.", "No evidence of pneumothorax"),
    ("Right apical pneumothorax.", "There is a pneumothorax at the right apex."),
    ("Patchy airspace opacity in the right lower lobe", "Right lower lobe consolidation"),
    ("Pulmonary edema", "Mild pulmonary oedema."),
    ("The feeding tube terminates in the stomach.", "NG tube tip is in the stomach."),
    ("The ET tube is in good position.", "Endotracheal tube in standard position."),
    ("A left PICC line ends in the SVC.",
     "Left-sided central venous catheter terminates in the SVC."),
    ("Pacemaker leads in the right ventricle.", "A cardiac pacemaker is present."),
    ("No acute cardiopulmonary process.", "No acute findings."),
    ("none", "No abnormality"),
    ("A 1 cm nodule in the left upper lobe.", "Left upper lobe nodule."),
    ("left lower lung zone", "The left lower lung zone"),
    ("Bibasilar atelectasis.", "Atelectasis at both lung bases."),
]
CONTRADICTIONS = [   # -> 0
    ("The cardiac silhouette is normal, with no cardiomegaly",
     "The cardiac silhouette is enlarged"),
    ("Normal heart size.", "Cardiomegaly."),
    ("No pleural effusion.", "Small left pleural effusion."),
    ("There is a pneumothorax.", "No pneumothorax."),
    ("No pneumothorax.", "Right pneumothorax."),
    ("Pulmonary nodule.", "Lung mass."),
    ("Consolidation.", "Pleural effusion."),
    ("No acute findings.", "Right lower lobe pneumonia."),
    ("NG tube in the stomach.", "Endotracheal tube above the carina."),
    ("left lower lung zone", "left upper lung zone"),
    ("right upper lung zone", "left upper lung zone"),
    ("none", "nodule"),
]


@pytest.mark.parametrize("pred,ref", PARAPHRASES)
def test_a_paraphrase_of_the_same_finding_scores_high(pred, ref):
    assert open_answer_score(pred, ref) >= 0.99, (pred, ref, reward.findings(pred),
                                                  reward.findings(ref))
    assert answer_correct(pred, ref, "open_ended_questions") == open_answer_score(pred, ref)


@pytest.mark.parametrize("pred,ref", CONTRADICTIONS)
def test_a_contradiction_scores_0(pred, ref):
    assert open_answer_score(pred, ref) == 0.0, (pred, ref, reward.findings(pred),
                                                 reward.findings(ref))


def test_open_answer_score_is_graded_and_falls_back_to_word_overlap():
    # two findings against one: F1 over (observation, present) pairs = 2/3
    said = "Cardiomegaly and a small left effusion."
    assert open_answer_score(said, "Cardiomegaly.") == pytest.approx(2 / 3)
    # no observation or region on either side: normalised word overlap, stop words dropped
    score = open_answer_score("Aortic calcification noted", "Calcification of the aortic knob")
    assert score == pytest.approx(2 * 2 / (3 + 3))
    assert open_answer_score("", "Cardiomegaly") == 0.0
    assert open_answer_score("Cardiomegaly", "") == 0.0
    # plain word overlap would reward this contradiction with 0.67 (the pitfall the findings avoid)
    assert open_answer_score("The cardiac silhouette is normal, with no cardiomegaly",
                             "The cardiac silhouette is enlarged") == 0.0


def test_letters_ignore_capitals_inside_option_text():
    assert letters("A: Type B aortic dissection") == ["A"]
    assert letters("B: Vitamin D deficiency") == ["B"]
    assert letters("['A', 'C']") == ["A", "C"] and letters("C: 1.2 cm") == ["C"]
    assert letters("A: Cardiomegaly, C: Pleural effusion") == ["A", "C"]
    assert letters("The answer is B.") == ["B"] and letters("Option D") == ["D"]


@pytest.mark.parametrize("text, picked", [
    ("A", ["A"]), ("A, C", ["A", "C"]), ("['A', 'C']", ["A", "C"]), ("(B)", ["B"]), ("B.", ["B"]),
    ("Option B", ["B"]), ("bad", []), ("Bad", []), ("BAD", []), ("ACE", []), ("fade", []),
    ("cab", []), ("a bad one", []), ("The answer is bad.", []), ("Abcd", []),
])
def test_letters_stand_alone_never_inside_a_word(text, picked):
    assert letters(text) == picked


@pytest.mark.parametrize("hedge",
                         ["It is not clear.", "Cannot tell.", "uncertain", "Possibly.", "Maybe",
                                   "It cannot be determined from this film.", "I can't tell.",
                                   "Unclear",
                                   "A pneumothorax cannot be excluded.",
                                   "Possibly a small effusion.", "Yes, possibly."])
def test_a_hedge_is_neither_yes_nor_no(hedge):
    assert yes_no(hedge) == ""
    assert answer_correct(hedge, "no", "closed_ended_questions") == 0.0
    assert answer_correct(hedge, "yes", "closed_ended_questions") == 0.0


def test_closed_answers_read_yes_or_no_from_a_sentence():
    ref = "There is no pneumothorax."
    assert answer_correct(ref, ref, "closed_ended_questions") == 1.0  # was 0: first word 'there'
    assert answer_correct("No.", ref, "closed_ended_questions") == 1.0
    assert answer_correct("Yes, a small one.", ref, "closed_ended_questions") == 0.0
    assert yes_no("A small left effusion is present.") == "yes"
    assert yes_no("Pneumothorax is absent.") == "no"
    assert yes_no("maybe") == "" and answer_correct("maybe", "maybe",
                                                    "closed_ended_questions") == 0.0
