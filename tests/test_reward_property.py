"""reward.py is total: thousands of arbitrary and adversarial strings (hypothesis), every
component a float in [0, 1], nothing raises, and long inputs parse in linear time."""
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data
import reward

TAGS = ["<think>", "</think>", "<answer>", "</answer>", "<think", "answer>", "</", "<<", ">>"]
PIECES = TAGS + ["[", "]", ",", " ", "-", ".", "0", "7", "112", "99999999999999999999", "1e309",
                 "nan", "left lower lung zone", "A", "B, C", "yes", "no", "none", "\n", "\x00",
                 "é", "🫁"]
REF = data.make_sample("test", 3)["response"]

# near-miss ThinkVG: pieces that look like the format, nested and repeated tags, huge numbers
near_miss = st.lists(st.sampled_from(PIECES) | st.integers(-10**30, 10**30).map(str),
                     max_size=60).map("".join)
box = st.lists(st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True),
               min_size=0, max_size=6).map(lambda v: "[" + ", ".join(map(str, v)) + "]")
structured = st.tuples(st.text(max_size=30), box, st.text(max_size=10), st.sampled_from(TAGS)).map(
    lambda t: f"<think>The {t[0]} {t[1]} is clear.{t[3]}</think><answer>{t[2]}</answer>")
anything = st.text(max_size=400) | near_miss | structured


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(anything, st.sampled_from(data.QUESTION_TYPES),
       st.sampled_from([None, (112, 112), (224, 224)]))
def test_every_component_is_a_float_in_unit_interval(text, qtype, image_size):
    out = reward.score(text, REF, qtype, image_size=image_size)
    assert set(out) == {"format", "answer", "grounding", "iou", "total"}
    for k, v in out.items():
        assert isinstance(v, float) and 0.0 <= v <= 1.0, (k, v)
    reward.parse(text)                     # the parser alone is total too
    reward.score(REF, text, qtype)         # and an adversarial *reference* does not break it
    for completion, ref in ((text, REF), (REF, text)):                      # grpo.py --credit coord
        layout = reward.box_layout(completion, ref)
        for b in layout.boxes:
            assert 0 <= b.span[0] <= b.numbers[0][0]
            assert b.numbers[-1][1] <= b.span[1] <= len(completion)
            assert b.paired is None or (0 <= b.paired < len(layout.reference_boxes)
                                     and all(0 <= e < float("inf") for e in b.errors))


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=st.characters(whitelist_categories=["Lu", "Ll"]), min_size=2, max_size=12))
def test_no_letter_is_read_from_inside_a_word(word):
    assert reward.letters(word) == [] and reward.letters(f"the {word}.") == []


@settings(max_examples=100, deadline=None)
@given(near_miss)
def test_long_repetitions_parse_in_linear_time(unit):
    unit = unit or "<think>[1, 2, 3, 4]"
    reps = max(1, 50_000 // max(len(unit), 1))   # long enough that fixed costs do not set the ratio

    def seconds(text):
        t0 = time.perf_counter()
        reward.score(text, REF, "open_ended_questions")
        return time.perf_counter() - t0
    short, long = unit * reps, unit * reps * 8
    small = big = float("inf")
    for _ in range(5):   # interleaved, best of 5: a busy machine's hiccup is not a parser's cost
        small, big = min(small, seconds(short)), min(big, seconds(long))
    assert big < 24 * small, (small, big)  # 8x the input: ~8x the time if linear, ~64x if quadratic
