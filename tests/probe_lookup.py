"""Where is the letter lookup lost? A probe, not a test (NOTES.md, 2026-12-07 (morning)).

"Which region contains the X?" with four region options: given the RIGHT reasoning, written in
the assistant's turn, does the checkpoint put the highest probability on the right letter (of
A-D)? Chance is 0.25. The same lookups are written five ways: the base's reading format (plain
sentences then "Answer:"), the same with boxes, the same inside the trace's tags, a ThinkVG trace
(film, task prompt, tags, boxes) and the --walk-options trace (every option checked by letter).
The films are the probe's own stream: no split's and no pretraining film.

    python tests/probe_lookup.py tiny-qwen2.5-vl-cxr runs/sft --n 300
"""
import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data            # noqa: E402
import model as M      # noqa: E402
import pretrain        # noqa: E402

PROBE_STREAM = 99   # not in data.STREAMS


def lookups(n):
    """n (film, question, answer letter, {style: reasoning sentences}) from the probe's stream."""
    out, i = [], 0
    while len(out) < n:
        i += 1
        rng = np.random.default_rng([PROBE_STREAM, i])
        qtype, variant, findings = data._header(rng, 4 * i + 2)     # single choice
        if not variant:                                             # the other template
            continue
        pixels, boxes = data.draw_radiograph(rng, 112, findings)
        at, state, said = {r: k for k, r in findings}, rng.bit_generator.state, {}
        for style, box, walk in (("plain", False, False), ("boxed", True, False),
                                 ("walk", True, True)):
            rng.bit_generator.state = state                         # the same question each time
            q, think, a = data.ask(rng, qtype, variant, findings,
                                   lambda r: data.describe(r, boxes[r] if box else None, at), walk)
            said[style] = " ".join(think)
        out.append((Image.fromarray(pixels), q, a, said))
    return out


def letter_accuracy(model, processor, items, style, chat):
    """The share of items whose most likely letter (of A-D) after the written reasoning is right.
    chat: 'base' (text only, the base's system prompt, "Answer:"), 'tags' (the same chat, the
    trace's tags) or 'task' (the film, the task's system prompt, the trace's tags)."""
    tok, right = processor.tokenizer, 0
    letters = [tok.encode((" " if chat == "base" else "") + x)[-1] for x in "ABCD"]
    for s in range(0, len(items), 50):
        chunk = items[s:s + 50]
        questions = [q for _, q, _, _ in chunk]
        written = [r[style] + "\nAnswer:" if chat == "base"
                   else f"<think>{r[style]}</think><answer>" for *_, r in chunk]
        if chat == "task":
            texts = [t + w for t, w in zip(M.prompt_texts(processor, questions), written)]
            batch = processor(images=[[im] for im, *_ in chunk], text=texts, return_tensors="pt",
                              padding=True)
        else:
            texts = pretrain.chat_texts(processor, questions, False, written)
            batch = processor(text=texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = M.prefill(model, batch)[0][:, letters]                       # [b, 4]
        right += sum("ABCD"[k] == a for k, (_, _, a, _) in zip(logits.argmax(-1).tolist(), chunk))
    return right / len(items)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args()
    items = lookups(a.n)
    rows = [("base reading format, plain", "plain", "base"), ("... with boxes", "boxed", "base"),
            ("... plain, in the trace's tags", "plain", "tags"),
            ("ThinkVG trace (film, task prompt)", "boxed", "task"),
            ("--walk-options trace", "walk", "task")]
    for path in a.checkpoints:
        model, processor = M.load(path)
        model.eval()
        print(f"{path}: the right letter after the right reasoning, {a.n} lookups")
        for name, style, chat in rows:
            print(f"  {name:<36} {letter_accuracy(model, processor, items, style, chat):.3f}")


if __name__ == "__main__":
    main()
