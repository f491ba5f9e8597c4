"""rollouts.py -- see what GRPO sees: one HTML page per shown step of a rollout.

A log says the mean reward went from 0.54 to 0.55. This page shows why: for a few prompts of the
step, the film with the reference boxes and every completion's boxes on it, the G completions
with their rewards, and every completion token coloured by the advantage grpo.py gave it (blue:
pushed down, orange: pushed up, the value on hover). --credit sequence paints a completion in
one colour; span and coord paint the answer, the box digits and a hallucinated box apart. A
group whose rewards all tie is flagged: it teaches nothing.

The pages are self-contained (films inline, no script, no server) and open offline in any
browser. grpo.py writes OUT/rollouts/step_000050.html (+ .json, the data it was drawn from)
every --show-every steps, and OUT/rollouts/index.html; evaluate.py --predictions writes a page of
the best and worst greedy answers per question type.

    python rollouts.py runs/grpo/rollouts/step_000050.json     # redraw a page from its data
"""
import base64
import glob
import html
import io
import json
import os
import sys

import reward

COLOURS = ["#d62728", "#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#ff7f0e"]
REF_COLOUR = "#2ca02c"
STYLE = """<style>
body{font:14px/1.45 system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
.prompt{display:flex;gap:20px;border-top:1px solid #ccc;padding:14px 0}
.film{flex:0 0 auto} .group{flex:1 1 auto;min-width:0}
.c{margin:8px 0;padding:6px 8px;border-left:6px solid;background:#fafafa}
.head{font:12px monospace;color:#444;margin-bottom:3px}
.text{font:13px/1.6 monospace;white-space:pre-wrap;word-break:break-all}
.t{border-radius:2px} .tie{color:#a00;font-weight:bold} .muted{color:#777}
.legend span{display:inline-block;width:34px;text-align:center;font:11px monospace}
</style>"""


# ----------------------------------------------------------------------------- the data of a page
def png(image):
    """A PIL image as base64 PNG, to sit inline in the page."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def prompt_record(image, question, question_type, reference, completions):
    """One prompt of a page. completions: dicts of text, tokens (their strings), advantages (one
    per token), rewards (reward.score's dict), truncated."""
    totals = [c["rewards"]["total"] for c in completions]
    mean = sum(totals) / len(totals)
    std = (sum((t - mean) ** 2 for t in totals) / max(len(totals) - 1, 1)) ** 0.5
    for c in completions:
        c["boxes"] = [b for _, b in reward.parse(c["text"]).boxes if reward.valid_box(b)]
    return {"image": png(image), "size": list(image.size), "question": question,
            "question_type": question_type,
            "reference": reference, "ref_boxes": [b for _, b in reward.parse(reference).boxes],
            "mean": mean, "std": std, "completions": completions}


def step_record(step, credit, roll, rows, scores, adv, lengths, pieces, k=3):
    """The data of a GRPO step's page: the first k prompts of the rollout, each completion with
    its tokens and the advantage every token got (adv [N], or [N, T] under --credit span/coord)."""
    G, prompts = roll["group_size"], []
    for b in range(min(k, len(rows["question"]))):
        completions = []
        for i in range(b * G, (b + 1) * G):
            n = int(lengths[i])
            ids = roll["completion_ids"][i, :n].tolist()
            a = adv[i, :n].tolist() if adv.dim() == 2 else [float(adv[i])] * n
            completions.append({"text": roll["texts"][i], "tokens": [pieces[t] for t in ids],
                                "advantages": a,
                                "rewards": scores[i], "truncated": bool(roll["truncated"][i])})
        prompts.append(prompt_record(rows["image"][b], rows["question"][b],
                                     rows["question_type"][b], rows["response"][b], completions))
    totals = [s["total"] for s in scores]
    ties = [max(totals[g:g + G]) - min(totals[g:g + G]) < 1e-6 for g in range(0, len(totals), G)]
    return {"step": step, "credit": credit, "reward": sum(totals) / len(totals),
            "zero_std_groups": sum(ties) / len(ties), "prompts": prompts}


# ----------------------------------------------------------------------------- drawing
def film_svg(p, scale=3):
    """The film with the reference's boxes (green, dashed) and each completion's (its colour)."""
    w, h = p["size"]
    rects = [_rect(b, REF_COLOUR, "box ref", "reference", dash=True) for b in p["ref_boxes"]]
    for j, c in enumerate(p["completions"]):
        rects += [_rect(b, COLOURS[j % len(COLOURS)], f"box c{j}", f"completion {j}")
                  for b in c["boxes"]]
    return (f'<svg class="film" width="{w * scale}" height="{h * scale}" viewBox="0 0 {w} {h}">'
            f'<image href="data:image/png;base64,{p["image"]}" width="{w}" height="{h}" '
            f'style="image-rendering:pixelated"/>{"".join(rects)}</svg>')


def _rect(box, colour, cls, who, dash=False):
    x1, y1, x2, y2 = box
    dashes = ' stroke-dasharray="2"' if dash else ""
    return (f'<rect class="{cls}" x="{x1}" y="{y1}" width="{x2 - x1}" height="{y2 - y1}" '
            f'fill="none" stroke="{colour}" stroke-width="0.8"{dashes}>'
            f'<title>{who}: [{", ".join(str(int(v)) for v in box)}]</title></rect>')


def shade(a, scale):
    """Diverging colour of an advantage: blue below 0, orange above, white at 0."""
    x = max(-1.0, min(1.0, a / scale)) if scale > 0 else 0.0
    rgb = (33, 102, 172) if x < 0 else (230, 97, 1)
    return f"rgba({rgb[0]},{rgb[1]},{rgb[2]},{abs(x) * 0.75:.2f})"


def completion_html(j, c, scale):
    r = c["rewards"]
    adv = c["advantages"]
    parts = " ".join(f"{k} {r[k]:.2f}" for k in reward.REWARDS)
    head = (f"#{j} total {r['total']:.3f} | {parts} | A mean {sum(adv) / max(len(adv), 1):+.3f}, "
            f"min {min(adv, default=0):+.3f}, max {max(adv, default=0):+.3f} | "
            f"{'TRUNCATED' if c['truncated'] else 'ended'}")
    spans = "".join(f'<span class="t" title="A = {a:+.4f}" '
                    f'style="background:{shade(a, scale)}">{html.escape(t)}</span>'
                    for t, a in zip(c["tokens"], adv))
    return (f'<div class="c" style="border-color:{COLOURS[j % len(COLOURS)]}"><div '
            f'class="head">{html.escape(head)}</div><div class="text">{spans}</div></div>')


def page(record, title, links=""):
    """The whole page of one record (a GRPO step, or evaluate.py's best and worst). The colour
    scale saturates at the 95th percentile of |A| on the page: the few largest advantages would
    otherwise wash every other token out."""
    mags = sorted(abs(a) for p in record["prompts"] for c in p["completions"]
                  for a in c["advantages"])
    scale = (mags[int(0.95 * (len(mags) - 1))] if mags else 0.0) or 1.0
    legend = "".join(f'<span style="background:{shade(v * scale, scale)}">{v * scale:+.2f}</span>'
                     for v in (-1, -0.5, -0.25, 0, 0.25, 0.5, 1))
    out = [f"<!doctype html><html><head><meta "
           f"charset='utf-8'><title>{html.escape(title)}</title>{STYLE}</head><body>",
           f"<h2>{html.escape(title)}</h2>{links}",
           f"<p class='legend'>advantage per token: {legend} <small class='muted'>(hover a token "
           f"for its value)</small></p>",
           f"<p class='muted'>{html.escape(record.get('note', ''))}</p>"]
    for p in record["prompts"]:
        tie = (' <span class="tie">all rewards tie: this group teaches nothing</span>'
               if p["std"] < 1e-6 else "")
        out.append(f'<div class="prompt">{film_svg(p)}<div class="group">'
                   f'<b>{html.escape(p["question"])}</b> <span '
                   f'class="muted">({p["question_type"]})</span><br><span '
                   f'class="muted">reference:</span> <span '
                   f'class="text">{html.escape(p["reference"])}</span><br>group: mean '
                   f'{p["mean"]:.3f}, std {p["std"]:.3f}{tie}'
                   + "".join(completion_html(j, c, scale)
                             for j, c in enumerate(p["completions"])) + "</div></div>")
    return "\n".join(out) + "</body></html>"


# ----------------------------------------------------------------------------- writing
def write_step(folder, step, record, every):
    """OUT/rollouts/step_000050.json and .html, with links to the steps before and after, and
    the index of every page written so far. Returns the page's path."""
    os.makedirs(folder, exist_ok=True)
    name = lambda s: f"step_{s:06d}.html"  # noqa: E731
    base = os.path.join(folder, name(step)[:-5])
    json.dump(record, open(base + ".json", "w"))
    links = (f'<p><a href="index.html">all steps</a> | ' + (f'<a href="{name(step - every)}">step '
                                                            f'{step - every}</a> | '
             if step > every else "") + f'<a href="{name(step + every)}">step '
                                        f'{step + every}</a></p>')
    with open(base + ".html", "w") as f:
        f.write(page(record, f"GRPO step {step}, --credit {record['credit']}", links))
    pages = sorted(glob.glob(os.path.join(folder, "step_*.json")))
    rows = []
    for path in pages:
        r = json.load(open(path))
        rows.append(f'<li><a href="{os.path.basename(path)[:-5]}.html">step {r["step"]}</a>: mean '
                    f'reward {r["reward"]:.3f}, groups that tie {r["zero_std_groups"]:.2f}</li>')
    with open(os.path.join(folder, "index.html"), "w") as f:
        f.write(f"<!doctype html><html><head><meta "
                f"charset='utf-8'><title>rollouts</title>{STYLE}</head><body><h2>GRPO "
                f"rollouts</h2><ul>{''.join(rows)}</ul></body></html>")
    return base + ".html"


def write_best_and_worst(path, rows, completions, name, k=2):
    """evaluate.py --predictions: the k worst and k best greedy answers per question type."""
    import data
    scores = [reward.score(c, ref, t, image_size=im.size) for c, ref, t, im in
              zip(completions, rows["response"], rows["question_type"], rows["image"])]
    picked = []
    for t in data.QUESTION_TYPES:
        idx = sorted((i for i, q in enumerate(rows["question_type"]) if q == t),
                     key=lambda i: scores[i]["total"])
        picked += idx[:k] + idx[-k:] if len(idx) > 2 * k else idx
    prompts = [prompt_record(rows["image"][i], rows["question"][i], rows["question_type"][i],
                             rows["response"][i],
                             [{"text": completions[i], "tokens": [completions[i]],
                               "advantages": [0.0],
                               "rewards": scores[i], "truncated": False}]) for i in picked]
    with open(path, "w") as f:
        f.write(page({"prompts": prompts,
                      "note": f"the {k} worst and {k} best greedy answers of each question type"},
                     f"{name}: best and worst answers"))
    print(f"wrote {path}")


if __name__ == "__main__":
    for src in sys.argv[1:]:
        r = json.load(open(src))
        with open(src[:-5] + ".html", "w") as f:
            f.write(page(r, f"GRPO step {r['step']}, --credit {r['credit']}"))
        print(f"wrote {src[:-5]}.html")
