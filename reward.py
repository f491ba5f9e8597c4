"""reward.py -- verifiable rewards for ThinkVG outputs: pure functions, no model, no judge.

A ThinkVG response reasons in short sentences that name anatomical regions with boxes, then
answers:

    <think>The left lower lung zone [60, 70, 95, 95] shows a small round
    opacity.</think><answer>yes</answer>

`parse` reads such text (model outputs and reference responses alike) and `score` compares a
completion with its reference:

    format     1 if exactly one <think>...</think> then one <answer>...</answer>, nothing else
               around them, a non-empty answer, and at least one valid box in the reasoning
    answer     in [0, 1], checked for its question type (the paper uses an LLM judge; ours is
               verifiable): closed: yes/no; single / multi choice: the letters standing alone;
               open: graded, F1 over the findings both answers name (open_answer_score)
    grounding  the paper's rule (GEMeX-ThinkVG, Sec. 3.3): 1 if the number of predicted boxes
               equals the reference's and their mean IoU after matching exceeds 0.75, else 0
    iou        a dense version for a smoother signal: the optimal one-to-one matched IoU summed
               and divided by max(#predicted, #reference), so missing and extra boxes both cost
    total      sum_k w_k * r_k / sum_k w_k, weights DEFAULT_WEIGHTS unless given

This is the one definition of the rewards: their names (REWARDS), their default weights (which
grpo.py's --w-* flags start from) and the tokens each one decides (grpo.py's token-level credit):
format and answer are decided by the text tokens, grounding and iou by the box digits.

Model outputs are adversarial input. Nothing here raises on any string, every component is a
float in [0, 1], and parsing is linear in the length of the text (bounded regexes, no nested
quantifiers, a cap on how many boxes are matched).
"""
import re
from dataclasses import dataclass, field
from typing import NamedTuple

# The paper's two rewards are answer and grounding; format keeps the tags parseable, and the dense
# IoU shapes the grounding rule's 0/1 (a box 0.74 of the way there still scores). The box rewards
# weigh half the answer's: their advantages move the same weights as the answer's, and at equal
# weight they took back half of what the answer reward teaches (README, "Results").
DEFAULT_WEIGHTS = {"format": 0.25, "answer": 1.0, "grounding": 0.5, "iou": 0.25}
# ("format", "answer", "grounding", "iou"): every log and table uses these
REWARDS = tuple(DEFAULT_WEIGHTS)
# decided by text tokens / by box digits
TEXT_REWARDS, BOX_REWARDS = ("format", "answer"), ("grounding", "iou")
GROUNDING_IOU = 0.75   # the paper's threshold on the mean matched IoU
MAX_BOXES = 32         # boxes beyond this are counted (they cost IoU) but never matched
MAX_COORD = 10_000     # a coordinate above this is not a pixel of any image we use

# A box: four numbers in brackets (data.py rewrites real boxes with it). Digits are bounded so int()
# never sees a 5,000-digit number.
_NUM = r"(-?\d{1,7}(?:\.\d{1,6})?)"
BOX = re.compile(r"\[\s{0,3}" + r"\s{0,3},\s{0,3}".join([_NUM] * 4) + r"\s{0,3}\]")
_STOP = {"the", "a", "an", "in", "of", "at", "on", "and", "with", "shows", "is", "are", "see",
         "seen"}
_NONE = {"none", "no finding", "no findings", "no abnormality", "normal", "nothing", "no"}


@dataclass
class Parsed:
    think: str = ""                                  # reasoning text ("" if absent)
    answer: str = ""                                 # answer text, stripped ("" if absent)
    boxes: list = field(default_factory=list)  # [(region name, [x1, y1, x2, y2]), ...] in order
    well_formed: bool = False                        # the strict format check (see module doc)


# ----------------------------------------------------------------------------- parsing
def parse(text, image_size=None):
    """Read think, answer and boxes from any string. Tolerant: a missing <think> tag makes the
    text before <answer> the reasoning (how a reference may be written); `well_formed` is strict.
    With `image_size` (w, h), a box must lie inside the image to count as valid for the format."""
    if not isinstance(text, str):
        return Parsed()
    (s0, s1), (t0, t1, a0, a1) = _reasoning_span(text)
    answer = text[a0 + 8:a1].strip() if 0 <= a0 < a1 else ""
    think = text[s0:s1]
    boxes = []
    for m in BOX.finditer(think):
        coords = [float(v) for v in m.groups()]
        boxes.append((_region_before(think, m.start()), coords))
    counts = [text.count(tag) for tag in ("<think>", "</think>", "<answer>", "</answer>")]
    well_formed = (counts == [1, 1, 1, 1] and 0 <= t0 < t1 < a0 < a1 and not text[:t0].strip()
                   and not text[t1 + 8:a0].strip() and not text[a1 + 9:].strip() and bool(answer)
                   and any(valid_box(b, image_size) for _, b in boxes))
    return Parsed(think.strip(), answer, boxes, well_formed)


def _reasoning_span(text):
    """((start, end) of the reasoning in text, (the positions of the four tags, -1 if absent))."""
    t0, t1 = text.find("<think>"), text.find("</think>")
    a0 = text.find("<answer>", max(t1, 0))
    a1 = text.find("</answer>", a0 + 1) if a0 >= 0 else -1
    if 0 <= t0 < t1:
        return (t0 + 7, t1), (t0, t1, a0, a1)
    # no think span: all before the answer
    return (0, a0 if a0 >= 0 else len(text)), (t0, t1, a0, a1)


def _region_before(text, end, raw=False):
    """The region name written just before a box: trailing words of a short window, cut at the
    last stop word ('... shows nothing in the left lower lung zone [' -> 'left lower lung zone').
    raw=True: the stretch of `text` from the name's first word up to `end`, as written."""
    window = text[max(0, end - 60):end]
    words = list(re.finditer(r"[A-Za-z]+", window))
    kept = []
    for w in reversed(words):
        if w[0].lower() in _STOP:
            break
        kept.append(w)
    kept = kept[:6]
    if raw:
        return window[kept[-1].start():] if kept else ""
    return " ".join(w[0].lower() for w in reversed(kept))


def valid_box(box, image_size=None):
    """Integer-valued, strictly ordered corners, non-negative, inside the image if sized."""
    x1, y1, x2, y2 = box
    hi_x, hi_y = image_size if image_size else (MAX_COORD, MAX_COORD)
    return (all(float(v).is_integer() for v in box) and 0 <= x1 < x2 <= hi_x
            and 0 <= y1 < y2 <= hi_y)


# ----------------------------------------------------------------------------- grounding
def iou(a, b):
    """Intersection over union of two [x1, y1, x2, y2] boxes. A box with swapped corners has no
    area, so it scores 0: we do not repair model output. Touching boxes share no area: 0."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    area = lambda r: max(r[2] - r[0], 0.0) * max(r[3] - r[1], 0.0)  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 and inter > 0 else 0.0


def match_boxes(pred, ref):
    """The one-to-one matching of pred to ref boxes with the largest total IoU: (IoU sum,
    [(i, j), ...] pairs of a pred index and a ref index, the pairs that overlap at all).

    Exact by dynamic programming over the subsets of reference boxes already used (2^R states;
    R is 1-4 here), which is the assignment problem without scipy. Above 8 reference boxes it
    falls back to greedy matching by IoU, which is exact whenever boxes barely overlap."""
    pred, R = pred[:MAX_BOXES], len(ref)
    if R > 8:
        pairs = sorted(((iou(p, r), i, j) for i, p in enumerate(pred) for j, r in enumerate(ref)),
                       reverse=True)
        used_p, used_r, total, out = set(), set(), 0.0, []
        for v, i, j in pairs:
            if v > 0 and i not in used_p and j not in used_r:
                used_p.add(i), used_r.add(j)
                total += v
                out.append((i, j))
        return total, out
    best = {0: (0.0, ())}  # {mask of used ref boxes: (best IoU sum, its pairs)}
    for i, p in enumerate(pred):
        nxt = dict(best)
        for mask, (val, pairs) in best.items():
            for j in range(R):
                v = iou(p, ref[j])
                if v > 0 and not mask >> j & 1 and val + v > nxt.get(mask | 1 << j, (-1.0,))[0]:
                    nxt[mask | 1 << j] = (val + v, pairs + ((i, j),))
        best = nxt
    total, pairs = max(best.values())
    return total, list(pairs)


def matched_iou_sum(pred, ref):
    """Largest total IoU over one-to-one matchings of pred to ref boxes (match_boxes)."""
    return match_boxes(pred, ref)[0]


def box_rewards(iou_sum, n_pred, n_ref):
    """(the paper's 0/1 grounding, the dense IoU) from the matched IoU sum and the two box counts:
    the one definition of both, used by the reward and by grpo.py's count credit."""
    if not n_pred or not n_ref:
        return 0.0, 0.0
    grounding = float(n_pred == n_ref and iou_sum / n_ref > GROUNDING_IOU)
    return grounding, min(iou_sum / max(n_pred, n_ref), 1.0)


def grounding_scores(pred, ref):
    """(paper's 0/1 grounding reward, dense IoU) for lists of boxes."""
    return box_rewards(matched_iou_sum(pred, ref) if pred and ref else 0.0, len(pred), len(ref))


class Box(NamedTuple):
    """One box of a completion, as box_layout reads it. Character positions index the completion."""
    span: tuple      # (start, end) of the box with the region words before it
    numbers: list    # (start, end) of each of its four numbers
    paired: int      # index of the reference box the reward pairs it with; None: unpaired
    errors: list     # |pred_c - ref_c| in pixels for c = 0..3; None when unpaired


@dataclass
class BoxLayout:
    """Where a completion's boxes are and what the reward made of them (grpo.py's --credit coord).
    Character positions index the completion string."""
    boxes: list = field(default_factory=list)   # Box per reasoning box, in order of writing
    reference_boxes: list = field(default_factory=list)  # [x1, y1, x2, y2] each
    think_end: tuple = None                     # (start, end) of the </think> tag, or None


def box_layout(completion, reference):
    """Each reasoning box of `completion`, matched to `reference` exactly as the reward matches
    them (match_boxes: by geometry, never by wording), as Box records: the span of
    'left lower lung zone [60, 70, 95, 95]', its four numbers, the reference box it is paired
    with and the error of each coordinate. Never raises."""
    if not isinstance(completion, str) or not isinstance(reference, str):
        return BoxLayout()
    ref = [b for _, b in parse(reference).boxes]
    (s0, s1), (t0, t1, _, _) = _reasoning_span(completion)
    found = list(BOX.finditer(completion, s0, s1))
    pred = [[float(v) for v in m.groups()] for m in found]
    pairs = dict(match_boxes(pred, ref)[1])                           # pred index -> ref index
    boxes = []
    for i, m in enumerate(found):
        j = pairs.get(i)
        before = completion[s0:m.start()]
        start = m.start() - len(_region_before(before, len(before), raw=True))
        numbers = [(m.start(c + 1), m.end(c + 1)) for c in range(4)]
        errors = [abs(pred[i][c] - ref[j][c]) for c in range(4)] if j is not None else None
        boxes.append(Box((start, m.end()), numbers, j, errors))
    return BoxLayout(boxes, ref, (t1, t1 + 8) if 0 <= t0 < t1 else None)


# ----------------------------------------------------------------------------- answers
def normalise(text):
    """Lowercase words, no leading article: 'The Left lower-lung zone.' -> 'left lower lung zone'"""
    words = re.findall(r"[a-z0-9]+", text.lower())
    while words and words[0] in ("the", "a", "an"):
        words = words[1:]
    return " ".join(words)


def letters(text):
    """The option letters an answer picks, sorted. Styles: 'A, C', 'A,C', 'a c', 'A and C',
    "['A', 'C']", '(A) (C)', 'A; C', 'A. nodule, C. mass', 'Option B', 'B) mass', 'C: 1.2 cm'.
    A letter counts only where it stands alone, never inside a word: 'bad' picks nothing (not A,
    B and D), nor does 'AC'. In prose only the letter that opens an option counts (or ends a
    clause: 'the answer is B'): 'A: Type B aortic dissection' is A, 'B: Vitamin D deficiency' B."""
    bare = re.sub(r"\b(?:and|or|options?|answers?)\b", " ", text, flags=re.IGNORECASE)
    if (re.fullmatch(r"[A-Ha-h\s,;/&()\[\].:+'\"-]*", bare) and re.search(r"[A-Ha-h]", bare)
            and not re.search(r"[A-Za-z]{2}", bare)):
        # letters only: each counts
        return sorted({c.upper() for c in re.findall(r"[A-Ha-h]", bare)})
    found = set()
    for part in re.split(r"[,;/&]", bare[:2000]):
        # a letter that opens the option ('C: 1.2 cm') or ends the clause ('is B.')
        m = (re.match(r"\s*[(\['\"]*([A-H])(?:[.:)\]'\"]|\s|$)", part)
             or re.search(r"(?<![^\W\d_])([A-H])[\s.)\]'\"]*$", part))
        if m:
            found.add(m.group(1))
    return sorted(found)


# NegEx-style negation (Chapman et al. 2001): a cue before a finding, within a few words of the same
# clause, or a cue after it ("... is absent"), makes the finding absent.
_NEG_BEFORE = re.compile(r"\b(?:no|not|without|negative for|free of|absence of|no evidence of|no "
                         r"signs? of|resolved|resolution of|rules? out|ruled out|clear of)\b")
_NEG_AFTER = re.compile(r"^\W*(?:\w+\W+){0,3}?(?:is |are |was |were |has |have )?(?:absent|not "
                        r"(?:seen|present|identified|visualized)|resolved|ruled out|excluded)\b")
_CLAUSE = re.compile(r"[.;]|\bbut\b|\bhowever\b|\bexcept\b|\bwith\b")
# CheXpert's observations (Irvin et al. 2019), finer where GEMeX answers are (nodule vs mass), and
# the support devices GEMeX asks about, each with the synonyms a report uses. Longer phrases first.
OBSERVATIONS = {
    "cardiomegaly": r"cardiomegaly|(?:heart|cardiac silhouette|cardiac size|heart size)(?: is| "
                    r"appears)?(?: \w+)? (?:enlarged|increased)|enlarged (?:heart|cardiac "
                    r"silhouette)|enlargement of the (?:heart|cardiac silhouette)|cardiac "
                    r"enlargement",
    "normal heart": r"(?:heart|cardiac silhouette|heart size|cardiac size)(?: is| appears)? "
                    r"(?:normal|within normal limits|not enlarged)|normal(?:[- ]sized)? "
                    r"(?:heart|cardiac silhouette|heart size|cardiac size)",
    "pleural effusion": r"(?:pleural )?effusions?|pleural fluid|fluid blunting|blunting of the "
                        r"(?:\w+ )?costophrenic angles?",
    "pneumothorax": r"pneumothora(?:x|ces)|ptx|dark rim without lung markings",
    "consolidation": r"consolidations?|airspace (?:opacity|opacities|disease)|patchy airspace "
                     r"opacity",
    "pneumonia": r"pneumonias?|infectious process",
    "atelectasis": r"atelectasis|atelectatic|volume loss|collapse",
    "edema": r"(?:pulmonary )?o?edema|vascular congestion|fluid overload",
    "nodule": r"nodules?|nodular opacity|small round opacity",
    "mass": r"mass(?:es)?|large dense opacity|tumou?r",
    "lung opacity": r"opacit(?:y|ies)|opacification|infiltrates?",
    "fracture": r"fractures?|broken ribs?",
    "widened mediastinum": r"(?:widened|enlarged|wide) mediastinum|mediastinal widening",
    "endotracheal tube": r"endotracheal tube|et tube|ett|breathing tube|intubat\w*",
    "nasogastric tube": r"nasogastric tube|ng tube|orogastric tube|og tube|enteric tube|feeding "
                        r"tube|dobhoff(?: tube)?",
    "central line": r"central (?:venous )?(?:line|catheter)|cvc|picc(?: line)?|(?:internal "
                    r"jugular|ij|subclavian) (?:line|catheter)",
    "pacemaker": r"pacemaker|pacer|defibrillator|icd|pacing leads?|cardiac device",
    "chest tube": r"chest tubes?|pleural drain|pigtail catheter",
    "no finding": r"no (?:acute )?(?:findings?|abnormalit(?:y|ies))|no acute (?:cardiopulmonary "
                  r")?(?:process|disease)|unremarkable|within normal "
                  r"limits|^normal$|^none$|^nothing$",
}
_OBS = re.compile("|".join(f"(?P<o{i}>{p})" for i, p in enumerate(OBSERVATIONS.values())))
_REGION = re.compile(r"(?:(?:right|left|bilateral) )?(?:(?:upper|mid|middle|lower|apical) "
                     r")?(?:lung zones?|lungs?|hilar "
                     r"structures?|hil(?:um|a)|hemidiaphragms?|costophrenic "
                     r"angles?|clavicles?|apical zones?)|cardiac silhouette|upper "
                     r"mediastinum|mediastinum|trachea|carina|aortic arch|cavoatrial "
                     r"junction|svc|right atrium|stomach|abdomen|spine")
_STOPWORDS = _STOP | {"there", "this", "that", "it", "be", "as", "to", "by", "which", "was", "were",
                      "has", "have"}


def findings(text):
    """{(observation, present?)} named in a free-text answer: the CheXpert-style observations of
    OBSERVATIONS, each negated NegEx-style. 'normal heart' reads as cardiomegaly absent."""
    t = " ".join(re.findall(r"[a-z0-9]+|[.;]", text.lower()[:2000]))
    out = set()
    for m in _OBS.finditer(t):
        obs = list(OBSERVATIONS)[int(m.lastgroup[1:])]
        if obs == "normal heart":
            out.add(("cardiomegaly", False))
            continue
        before = _CLAUSE.split(t[:m.start()])[-1].split()[-6:]  # this clause, at most 6 words back
        negated = (bool(_NEG_BEFORE.search(" ".join(before)))
                   or bool(_NEG_AFTER.match(_CLAUSE.split(t[m.end():])[0])))
        out.add((obs, obs == "no finding" or not negated))
    return out


def _f1(pred, ref):
    hit = len(pred & ref)
    return 2 * hit / (len(pred) + len(ref)) if hit else 0.0


def open_answer_score(pred, ref):
    """A graded, judge-free score in [0, 1] for free-text answers, the way radiology report
    generation is scored (clinical-efficacy F1): F1 over the (observation, present/absent) pairs
    the two answers name. Answers that name no observation are compared by the anatomical regions
    they name (F1 over region names), else by normalised word overlap (F1, stop words dropped).

    Catches: synonyms ('enlarged heart' = cardiomegaly, 'feeding tube' = NG tube), negation ('no
    pneumothorax' contradicts 'pneumothorax'), a normal heart against cardiomegaly, a different
    region. Misses: severity and size ('small' vs 'large' effusion), a device's position ('tip in
    the stomach' vs 'tip in the oesophagus' both name the tube), laterality of a finding, hedging
    ('possible'), findings outside the lexicon, and words that are not findings at all."""
    p, r = normalise(pred), normalise(ref)
    if not p:
        return 0.0
    if ("none" if p in _NONE else p) == ("none" if r in _NONE else r):
        return 1.0
    fp, fr = findings(pred), findings(ref)
    if fp or fr:
        return _f1(fp, fr)
    rp, rr = set(_REGION.findall(p)), set(_REGION.findall(r))
    if rp or rr:
        return _f1(rp, rr)
    return _f1(set(p.split()) - _STOPWORDS, set(r.split()) - _STOPWORDS)


# A hedge commits to neither answer: "It is not clear" must not read as "no" (its "not" is a
# negation cue), nor "possibly an effusion" as "yes".
_HEDGE = re.compile(r"\b(?:not (?:clear|sure|certain|possible to (?:tell|say|determine))"
                    r"|unclear|uncertain|unsure"
                    r"|cannot (?:tell|say|be (?:determined|assessed|excluded|ruled out)"
                    r"|determine|assess|exclude)"
                    r"|can ?not (?:tell|say)|can t (?:tell|say)|possibl[ey]|maybe|perhaps"
                    r"|equivocal|indeterminate|questionable"
                    r"|difficult to (?:tell|say|determine|assess))\b")


def yes_no(text):
    """'yes' or 'no' from a closed answer: its first word, or in a sentence a NegEx cue ('There is
    no pneumothorax.' -> no, 'A small effusion is present.' -> yes); '' when it says neither or
    hedges ('It is not clear.', 'Possibly.', 'Cannot tell.')."""
    words = normalise(text).split()
    if not words or _HEDGE.search(" ".join(words)):
        return ""
    if words[0] in ("yes", "no"):
        return words[0]
    if len(words) < 2:
        return ""
    said = " ".join(words)
    negative = _NEG_BEFORE.search(said) or re.search(r"\b(?:absent|none|normal)\b", said)
    return "no" if negative else "yes"


def answer_correct(pred, ref, question_type):
    """The answer reward per GEMeX question type, in [0, 1]: exact for closed (yes/no), single- and
    multi-choice (letters); graded for open-ended free text (open_answer_score)."""
    if not pred:
        return 0.0
    if question_type == "closed_ended_questions":
        p = yes_no(pred)
        return float(bool(p) and p == yes_no(ref))
    if question_type == "single_choice_questions":
        p = letters(pred)
        return float(len(p) == 1 and p == letters(ref))
    if question_type == "multi_choice_questions":
        p = letters(pred)
        return float(bool(p) and p == letters(ref))
    return open_answer_score(pred, ref)   # open-ended, or a type we do not know


# ----------------------------------------------------------------------------- the reward
def score(completion, reference, question_type, weights=None, image_size=None):
    """Score one completion against its reference response. Every value is a float in [0, 1]."""
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    pred, ref = parse(completion, image_size), parse(reference)
    out = {"format": float(pred.well_formed),
           "answer": answer_correct(pred.answer, ref.answer, question_type)}
    out["grounding"], out["iou"] = grounding_scores([b for _, b in pred.boxes],
                                                    [b for _, b in ref.boxes])
    norm = sum(w[k] for k in REWARDS)
    out["total"] = sum(w[k] * out[k] for k in REWARDS) / norm if norm > 0 else 0.0
    return out
