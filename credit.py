"""credit.py -- beyond the paper: each reward's advantage to the tokens that decide it.

The paper's GRPO gives every token of a completion the same advantage. Here the rewards are
decided by different tokens: the answer by a letter, where a box lies by its digits, how many
boxes there are by which boxes get written and where the reasoning stops. One advantage for all
of them tells a box digit it was good because the letter was right, and a letter that it was
good because a box was tight. grpo.py --credit span and coord (the default) give each reward's
advantage to the tokens that decide it; --credit sequence is the paper's. The text and count
parts go through grpo.advantages (passed in as `advantages`), scaled exactly as the whole reward
is; a coordinate's error has a scale of its own (coord_advantages).

    span    the digits get the box rewards' advantage, every other token the text rewards'
    coord   the text rewards' advantage on the words; each coordinate's digits its own error
            against the group's; the box count on the boxes the reward cannot pair and on
            the end of the reasoning (coord_advantages)
"""
import bisect
import itertools

import torch

import reward
import run


def token_pieces(tokenizer, vocab_size):
    """The text of every token id the model can output, [V] strings: '' for special tokens and
    for the ids a real checkpoint's embedding has past the tokenizer (Qwen2.5: 151,936 rows,
    151,665 tokens). Joined, a completion's pieces are its decoded text, so they place each
    token at its characters."""
    pieces = tokenizer.batch_decode([[i] for i in range(min(len(tokenizer), vocab_size))],
                                    skip_special_tokens=True)
    return pieces + [""] * (vocab_size - len(pieces))


def digit_tokens(pieces):
    """[V] bool: the token ids that are one digit. Qwen's tokenizer and the tiny one spell
    numbers digit by digit, and in a ThinkVG trace every digit is a coordinate."""
    return torch.tensor([len(p) == 1 and p in "0123456789" for p in pieces])


def reward_advantages(advantages, scores, keys, weights, group_size, adv_norm):
    """The group-relative advantage [N] of the weighted sum of some reward components, by
    `advantages` (grpo.advantages: each part is scaled exactly as the whole reward is)."""
    r = torch.tensor([sum(weights[k] * s[k] for k in keys) for s in scores])
    return advantages(r, group_size, adv_norm)


def token_advantages(advantages, cfg, scores, roll, references, pieces, is_digit, weights):
    """The one entry point from grpo.py: [N, T] advantages for --credit span or coord.
    advantages: grpo.advantages; references [B]: each prompt's reference response."""
    ids, G = roll["completion_ids"], roll["group_size"]
    if cfg.credit == "span":
        return span_advantages(advantages, scores, ids, is_digit, weights, G, cfg.adv_norm)
    lengths = roll["completion_mask"].sum(1).long().tolist()
    return coord_advantages(advantages, scores, roll["texts"], references, ids, lengths, pieces,
                            weights, G, cfg.adv_norm)


def span_advantages(advantages, scores, ids, is_digit, weights, group_size, adv_norm="group"):
    """--credit span: the digits get the box rewards' advantage (grounding + IoU), every other
    token (region names, findings, the answer) the text rewards' (format + answer). [N, T].
    scores: reward.score dicts [N]; ids [N, T] completion ids; is_digit [V] from digit_tokens."""
    G = group_size
    a_box = reward_advantages(advantages, scores, reward.BOX_REWARDS, weights, G, adv_norm)    # [N]
    a_text = reward_advantages(advantages, scores, reward.TEXT_REWARDS, weights, G, adv_norm)  # [N]
    digit = is_digit[ids.cpu()]                                                             # [N, T]
    return torch.where(digit, a_box.unsqueeze(1), a_text.unsqueeze(1)).to(ids.device)      # [N, T]


def coord_advantages(advantages, scores, texts, references, ids, lengths, pieces, weights,
                     group_size, adv_norm="group"):
    """--credit coord: each reward to the tokens that decide it. [N, T].

      text  (format, answer)  every token but a box's numbers: the text rewards' advantage
      where (each coordinate) the digits of a coordinate of a box the reward paired with a
                              reference box: how much closer to the reference this completion
                              wrote it than its group wrote the same coordinate of the same box
      count (how many boxes)  every token of a box the reward could NOT pair (a hallucination),
                              and </think> when the reasoning stopped at or before the
                              reference's count (stopping early is how a box goes missing)

    where: a coordinate's "reward" is minus its error as a fraction of the reference box's side,
    e = |pred - ref| / side, so errors on boxes of any size compare; its advantage is
    (w_grounding + w_iou)(mean_group(e) - e) / scale, scale per --adv-norm as for the rewards:
    std_group(e) + 1 px ('group'), the batch std of e + 1 px ('batch'), 1 ('none'). A
    coordinate that no other completion of the group paired with the same box gets 0.
    count: the box rewards as if every paired box were exact (reward.box_rewards with the
    paired count as the IoU sum): only the number of boxes, paired or not, moves it, and its
    group-relative advantage is what a hallucinated or missing box cost against the group.
    Boxes are paired by the reward's own optimal IoU matching (reward.box_layout), never by the
    words before them. texts [N] decoded completions, references [B] reference responses,
    lengths [N] completion lengths in tokens, pieces [V] from token_pieces.
    """
    G, (N, T) = group_size, ids.shape
    a_text = reward_advantages(advantages, scores, reward.TEXT_REWARDS, weights, G, adv_norm)
    layouts = [reward.box_layout(t, references[i // G]) for i, t in enumerate(texts)]

    def count_reward(lay):               # the box rewards as if every paired box were exact
        paired = sum(b.paired is not None for b in lay.boxes)
        rewards = reward.box_rewards(paired, len(lay.boxes), len(lay.reference_boxes))
        return sum(weights[k] * v for k, v in zip(reward.BOX_REWARDS, rewards))
    count = torch.tensor([count_reward(lay) for lay in layouts])
    a_count = advantages(count, G, adv_norm)                                              # [N]
    adv = a_text.unsqueeze(1).repeat(1, T)                                                # [N, T]
    # (prompt, reference box, coordinate) -> [(row i, its token slice, error, side)]
    where = {}
    for i, lay in enumerate(layouts):
        row_pieces = [pieces[t] for t in ids[i, :lengths[i]].tolist()]
        if "".join(row_pieces) != texts[i]:  # tokens and text disagree: no box credit in this row
            continue
        ends = list(itertools.accumulate(map(len, row_pieces)))       # token t: characters
        starts = [end - len(p) for end, p in zip(ends, row_pieces)]   # starts[t]:ends[t]

        def token_slice(start, end):         # the tokens that overlap characters start:end
            return slice(bisect.bisect_right(ends, start), bisect.bisect_left(starts, end))
        for box in lay.boxes:
            for c, (start, end) in enumerate(box.numbers):
                adv[i, token_slice(start, end)] = 0.0                 # a number: no text credit
                if box.paired is not None:
                    ref_box = lay.reference_boxes[box.paired]
                    side = max(ref_box[2 + c % 2] - ref_box[c % 2], 1.0)    # width or height
                    where.setdefault((i // G, box.paired, c), []).append(
                        (i, token_slice(start, end), box.errors[c] / side, side))
            if box.paired is None:
                adv[i, token_slice(*box.span)] += a_count[i]
        if lay.think_end and len(lay.boxes) <= len(lay.reference_boxes):
            adv[i, token_slice(*lay.think_end)] += a_count[i]
    shared = [writers for writers in where.values() if len(writers) > 1]   # the group compares
    errors_batch = torch.tensor([error for writers in shared for _, _, error, _ in writers],
                                dtype=torch.float64)
    std_batch = float(run.ddp_std(errors_batch)) if adv_norm == "batch" else 0.0
    w_box = sum(weights[k] for k in reward.BOX_REWARDS)
    for writers in shared:
        errors = torch.tensor([error for _, _, error, _ in writers], dtype=torch.float64)
        spread = {"group": float(errors.std()), "batch": std_batch}.get(adv_norm)  # a tie: 0
        for i, tokens, error, side in writers:
            scale = 1.0 if spread is None else spread + 1 / side       # + 1 px: no blow-up
            adv[i, tokens] = w_box * (float(errors.mean()) - error) / scale
    return adv.to(ids.device)
