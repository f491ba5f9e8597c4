"""pretrain.py: stage 0 sees no image of the splits and no ThinkVG trace, its vision targets are
right by hand, a short run writes a base that loads like any checkpoint, and the shipped base is
what its card says."""
import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

import data
import model as M
import pretrain
import reward


def test_pretraining_films_are_never_a_split_image():
    """The base's films come from a stream of their own: none equals a train, validation or
    test film (compared pixel for pixel over the first 300 of each)."""
    assert data.STREAMS["pretrain"] not in data.SPLITS.values()
    seen = {np.asarray(f[0]).tobytes() for f in pretrain.draw_films(300, 0)}
    seen |= {np.asarray(f[0]).tobytes() for f in pretrain.draw_films(300, 1)}  # the card's films
    for split in data.SPLITS:
        assert not any(np.asarray(data.make_sample(split, i)["image"]).tobytes() in seen
                       for i in range(300))


def test_pretraining_never_writes_a_thinkvg_trace():
    """No reasoning with boxes followed by an answer: reading texts hold no box and no tag, the
    one task that writes a box writes the box alone, and no answer follows a reasoning of its
    own."""
    rng = np.random.default_rng(0)
    pool = pretrain.draw_films(40, 0)
    for i in range(400):
        exercise = pretrain.reading(rng, i, 0.5)
        for question, reasoning, answer in (exercise, pretrain.as_passage(*exercise)):
            assert not reward.BOX.search(question + reasoning + answer)
            assert "<" not in question + reasoning + answer
        request, said = pretrain.image_task(rng, pool[i % 40])
        assert "<" not in request + said
        boxes = reward.BOX.findall(said)
        assert not boxes or (request.startswith("Locate") and reward.BOX.fullmatch(said))


def test_tower_targets_by_hand():
    """A 2x2 token grid on a 20-px frame (cells of 10 px): a region box covering the left column,
    abnormal with a nodule, and one covering only a sliver (< 1/4) of the top-right cell."""
    boxes = {r: [0, 0, 1, 1] for r in data.REGIONS}                    # 1 px: covers no cell enough
    boxes["right mid lung zone"] = [0, 0, 10, 20]  # tokens 0 and 2 (left column)
    boxes["upper mediastinum"] = [18, 0, 20, 10]  # 2 px of token 1: not enough
    y = pretrain.tower_targets(boxes, {"right mid lung zone": "nodule"}, grid=2, frame=20)
    k, R = data.REGIONS.index("right mid lung zone"), len(data.REGIONS)
    nodule = 2 * R + list(data.FINDINGS).index("nodule")
    assert y.shape == (4, 2 * R + len(data.FINDINGS))
    assert y[:, k].tolist() == [1, 0, 1, 0] and y[:, R + k].tolist() == [1, 0, 1, 0]
    assert y[:, nodule].tolist() == [1, 0, 1, 0]
    assert y.sum() == 6                                                  # nothing else is set


def test_patch_order_matches_the_processor():
    """The warm-up's per-patch targets are put in the tower's patch order: check that order
    against the processor itself, on an image whose 14-px patches are numbered by brightness."""
    _, processor = pretrain.build()
    ip = processor.image_processor
    grid, m, size = 4, ip.merge_size, ip.patch_size
    pgrid = grid * m
    img = np.zeros((pgrid * size, pgrid * size), dtype=np.uint8)
    for r in range(pgrid):
        for c in range(pgrid):
            img[r * size:(r + 1) * size, c * size:(c + 1) * size] = 3 * (r * pgrid + c)
    # [patches, C*T*14*14]
    pix = ip(images=[Image.fromarray(img)], return_tensors="pt")["pixel_values"]
    assert pix.shape[0] == pgrid * pgrid
    seen = pix.mean(-1).argsort().argsort()  # each row's rank by brightness = its raster index
    assert torch.equal(seen, pretrain.patch_order(grid, m))


def test_a_short_pretraining_run_writes_a_base_that_loads_like_any_checkpoint(tmp_path):
    out = tmp_path / "base"
    r = subprocess.run([sys.executable, "pretrain.py", "--steps", "4", "--tower-steps", "2",
                        "--films", "16",
                        "--eval-n", "4", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    model, processor = M.load(str(out))
    card = json.loads((out / "pretrain.json").read_text())["card"]
    assert "reading in the prompt: Which region contains" in card
    assert "reading its own reasoning: Which region contains" in card
    assert all(0 <= v <= 1 for v in card.values())
    assert len(processor.tokenizer) == model.get_output_embeddings().weight.shape[0]


def test_the_shipped_base_reads_the_two_region_lookup():
    """The base in the repository is pretrained, not a placeholder: on 60 fresh two-region
    letter lookups (seeded apart from its training and its card) it answers greedily from a
    written passage at least as its card says, within sampling noise, and its card is there."""
    base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), pretrain.BASE)
    card = json.load(open(os.path.join(base, "pretrain.json")))["card"]
    model, processor = M.load(base)
    model.eval()
    rng = np.random.default_rng([7, data.STREAMS["pretrain"], 10 ** 9 + 3])
    exercises = [pretrain.as_passage(*pretrain.lookup(rng, 0.0)) for _ in range(60)]
    texts = pretrain.chat_texts(processor, [q for q, _, _ in exercises], False)
    prompt = processor(text=texts, return_tensors="pt", padding=True)
    said = M.decode(model, processor, prompt, max_new_tokens=4, greedy=True)["texts"]
    right = np.mean([s.strip() == a for s, (_, _, a) in zip(said, exercises)])
    assert right >= card["reading in the prompt: Which region contains"] - 0.15, (right, card)
    assert right > 0.5          # four options: chance is 0.25
