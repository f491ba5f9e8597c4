"""model.py -- one loader for Qwen2(.5)-VL checkpoints (the shipped tiny base and real ones alike),
plus the two operations every training stage needs: batched sampling and per-token log-probs.

    model, processor = load("tiny-qwen2.5-vl-cxr")           # the tiny base (pretrain.py made it)
    model, processor = load("Qwen/Qwen2.5-VL-3B-Instruct")  # or any local checkpoint directory

Nothing here builds a model from a config: pretrain.py does, once. The tiny base is the real
architecture (transformers' Qwen2_5_VLForConditionalGeneration: a ViT with 2-D rotary positions
and a patch merger, feeding a Qwen2 decoder with 3-D "M-RoPE") at about 2M parameters, wrapped in
the real Qwen2.5-VL processor, so each image becomes the right number of <|image_pad|> tokens
exactly as for the 3B model.

Known traps in transformers 5.x, handled once, here:
  * Qwen2_5_VLProcessor insists on a video processor, which needs torchvision (no CPU wheel):
    ImageOnlyProcessor below drops the video half.
  * without torchvision the image processor falls back to its PIL backend (a warning, harmless).
  * `mm_token_type_ids` must reach the model in every forward, for completion tokens too, or the
    3-D rotary positions silently fall back to 1-D and the logits change.
  * `rope_parameters` replaces `rope_scaling`; `mrope_section` must sum to head_dim / 2.
  * bos/eos/pad ids belong on the config *and* the generation config, or generate() guesses
    (sample() below reads only the end ids from it; tests compare it with generate()).
"""
import math
import os

import torch
import torch.utils.checkpoint
from transformers import (AutoConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                          Qwen2VLForConditionalGeneration)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

SYSTEM_PROMPT = ("Reason in <think> naming each region you check with its box, "
                 "then answer in <answer>.")
# never in a completion
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *VISION_TOKENS]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]  # plain added tokens: they survive decoding
CHAT_TEMPLATE = (  # Qwen's ChatML, reduced to what we use: text and image parts
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    """The real Qwen2.5-VL processor without its video processor (which requires torchvision).
    Its __init__ signature defines which sub-processors ProcessorMixin loads and checks."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


# ----------------------------------------------------------------------------- loading
def load(name_or_path, device="cpu", dtype=torch.float32):
    """A Hub id or a directory holding a Qwen2.5-VL or Qwen2-VL checkpoint (the shipped tiny base,
    one this project saved, a real one). No remote code. A relative path is also looked for next
    to this file, so the default base loads from anywhere. A path that is not such a checkpoint
    exits with one line naming it, not a library traceback."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), name_or_path)
    if not os.path.exists(name_or_path) and not os.path.isabs(name_or_path) and os.path.isdir(here):
        name_or_path = here
    looks_local = (os.path.sep in name_or_path or name_or_path.startswith(".")
                   or os.path.exists(name_or_path))
    if looks_local and not os.path.isfile(os.path.join(name_or_path, "config.json")):
        why = ("does not exist" if not os.path.exists(name_or_path)
               else "has no config.json: not a model checkpoint")
        raise SystemExit(f"checkpoint {name_or_path}: {why}")
    try:
        kind = AutoConfig.from_pretrained(name_or_path).model_type
    except (OSError, ValueError) as e:   # offline Hub id, unreadable or foreign config.json
        raise SystemExit(f"checkpoint {name_or_path}: cannot read its config "
                         f"({str(e).splitlines()[0][:160]})")
    cls = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
           "qwen2_vl": Qwen2VLForConditionalGeneration}.get(kind)
    if cls is None:
        raise SystemExit(f"checkpoint {name_or_path}: model_type {kind!r} is not qwen2_5_vl or "
                         f"qwen2_vl")
    try:
        # straight onto the device in its dtype: a 7B checkpoint never exists in float32 on the CPU
        model = cls.from_pretrained(name_or_path, dtype=dtype, device_map=torch.device(device))
        processor = ImageOnlyProcessor.from_pretrained(name_or_path)
    # missing/truncated weights, tokenizer files, ...
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"checkpoint {name_or_path}: cannot load ({str(e).splitlines()[0][:160]})")
    processor.tokenizer.padding_side = "left"
    assert processor.tokenizer.pad_token_id is not None, f"{name_or_path}: no pad token"
    return model.to(device=device, dtype=dtype), processor


# -------------------------------------------------------------------------- prompts and completions
def image_frame(processor, side):
    """The side of the square image the model sees when handed a side x side image: Qwen's
    smart_resize rounds to whole 28-px merged patches within the pixel budget. Data is loaded
    at this frame, so boxes are written in the frame the model sees (224 -> 112 for tiny)."""
    ip = processor.image_processor
    return smart_resize(side, side, ip.patch_size * ip.merge_size, ip.size["shortest_edge"],
                        ip.size["longest_edge"])[0]


def build_prompts(processor, images, questions):
    """Chat-formatted, LEFT-padded prompts with their images, ready for generate() or a forward.

    Returns a BatchFeature: input_ids / attention_mask / mm_token_type_ids [N, P],
    pixel_values [sum of patches, 3*2*14*14], image_grid_thw [N, 3]. Never truncated: cutting a
    prompt would cut image tokens and break the token/feature correspondence asserted below.
    """
    batch = processor(images=[[im] for im in images], text=prompt_texts(processor, questions),
                      return_tensors="pt", padding=True)
    ip = processor.image_processor
    for im, (_, h, w) in zip(images, batch["image_grid_thw"].tolist()):
        assert (h * ip.patch_size, w * ip.patch_size) == (im.height, im.width), (
            f"the processor resized a {im.width}x{im.height} image to "
            f"{w * ip.patch_size}x{h * ip.patch_size}: its boxes would be in another frame (load "
            f"data at the frame image_frame() gives)")
    merge = ip.merge_size ** 2
    n_tokens = int((batch["input_ids"] == processor.image_token_id).sum())
    n_features = int(batch["image_grid_thw"].prod(-1).sum()) // merge
    assert n_tokens == n_features, f"{n_tokens} image tokens in the prompts, {n_features} features"
    return batch


def prompt_texts(processor, questions):
    """The chat prompts as text: the task's system prompt, then an image and the question."""
    return [processor.apply_chat_template(
        [{"role": "system", "content": SYSTEM_PROMPT},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
        add_generation_prompt=True, tokenize=False) for q in questions]


def end_ids(model):
    """Token ids that end an assistant turn (Qwen: <|im_end|>, <|endoftext|> on some configs)."""
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def completion_mask(ids, end_token_ids):
    """1 for every completion token up to AND including the first end-of-turn token, 0 after.

    ids [N, T] -> mask [N, T] (float). Found by position, not by comparing with the pad id, so
    the end token itself is kept even where pad == eos (masking it would teach "never stop").
    """
    is_end = torch.isin(ids, torch.tensor(end_token_ids, device=ids.device)).long()
    after_end = (is_end.cumsum(1) - is_end) > 0
    return (~after_end).float()


def completion_budget(processor, responses, floor=160, margin=1.25):
    """A generation budget sized from the data: margin x the 99th percentile of the reference
    responses' lengths in tokens, at least `floor`. The synthetic traces are ~50 tokens (budget
    160); the paper's are ~100 words with boxes, and a budget sized for ours would truncate them.
    Prints the percentiles it read, so a reader sees what the budget covers."""
    tokens = processor.tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    lengths = sorted(len(ids) + 1 for ids in tokens)
    pct = {p: lengths[min(len(lengths) - 1, int(p / 100 * len(lengths)))] for p in (50, 90, 99)}
    budget = max(floor, int(math.ceil(margin * pct[99])))
    print(f"reference responses: {pct[50]} / {pct[90]} / {pct[99]} tokens at the 50/90/99th "
          f"percentile (max {lengths[-1]}): generation budget {budget}")
    return budget


def tokenize_completions(processor, texts, end_token_id):
    """Reference responses -> RIGHT-padded completion ids [N, T] ending in the end-of-turn token,
    and their mask [N, T]. The SFT targets are exactly these tokens."""
    tok = processor.tokenizer
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [end_token_id] for t in texts]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1.0
    return ids, mask


# ----------------------------------------------------------------------------- the two operations
# GRPO asks two things of the model: SAMPLE G completions per prompt, and SCORE completions (their
# log-probs, with a graph for the update). Both start the same way: a group's G rows share one
# image and one prompt, so the vision tower and the prompt's transformer pass run ONCE per
# distinct prompt (prefill), and the G rows continue from copies of its KV cache. Invariant: the
# rows of prompt b are rows sum(repeats[:b]) .. sum(repeats[:b+1]) - 1 of every [N, ...] tensor.
def _core(model):
    """The Qwen2(.5)-VL backbone under any DDP wrapper: it owns get_rope_index."""
    return getattr(model, "module", model).model


def prefill(model, prompt):
    """Run B distinct prompts once. -> (logits of the last prompt position [B, V], the KV cache of
    the B prompts, the 1-D position of the first completion token [B]).

    Positions are Qwen's M-RoPE (3-D over the image, 1-D after it), computed here once and passed
    in, so the model keeps no rope state between calls. Text after the image continues from the
    largest position so far, equal in all three dimensions: completion token t sits at next + t.
    """
    pos, _ = _core(model).get_rope_index(prompt["input_ids"], prompt["mm_token_type_ids"],
                                         image_grid_thw=prompt.get("image_grid_thw"),  # text: None
                                         attention_mask=prompt["attention_mask"])      # [3, B, P]
    out = model(**prompt, position_ids=pos, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.past_key_values, pos.amax(dim=(0, 2)) + 1  # [B, V], cache, [B]


def _draw(logits, temperature, top_p):
    """One token per row from softmax(logits / T) within the top-p nucleus. [n, V] -> [n]."""
    logits = logits / temperature
    # drop the tail whose cumulative probability is below 1 - top_p (the top token always stays)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1)
        tail = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        tail[:, -1] = False
        logits = logits.masked_fill(tail.scatter(1, order, tail), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)


def text_support(model, tokenizer):
    """[V] bool over the model's vocabulary: the ids a completion may hold. Out: every id past the
    tokenizer (a real checkpoint's embedding is padded: Qwen2.5 has 151,936 rows for 151,665
    tokens; such an id decodes to nothing, and a table sized by the tokenizer would be indexed
    out of range), and every special token but the end-of-turn ones (a vision placeholder in a
    completion breaks the forward that scores it: "image features and image tokens do not
    match"; <|im_start|> or a pad is no text either). The policy is the softmax over this
    support: sample() draws from it and completion_logprobs(support=...) scores it."""
    V = model.get_output_embeddings().weight.shape[0]
    ok = torch.zeros(V, dtype=torch.bool)
    ok[:min(len(tokenizer), V)] = True
    special = ({i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
               | set(tokenizer.all_special_ids))
    ok[[i for i in special - set(end_ids(model)) if i < V]] = False
    return ok


@torch.no_grad()
def sample(model, processor, images, questions, group_size=1, max_new_tokens=160,
           temperature=1.0, top_p=1.0, greedy=False):
    """Sample `group_size` completions per prompt: one prefill per prompt, then a KV-cached decode
    loop over the B * G rows that drops each row once it has ended.

    B prompts -> N = B * G rows, prompt i's group in rows i*G .. i*G+G-1. Returns a dict:
      prompt           BatchFeature of the B distinct left-padded prompts (scoring reuses it)
      group_size       G
      completion_ids   [N, T] sampled tokens, pad after the end (T = the longest completion)
      completion_mask  [N, T] 1 up to and including the first end-of-turn token
      texts            N decoded completions (think/answer tags kept, end token dropped)
      truncated        [N] bool, True where no end-of-turn token was produced
      support          [V] bool, the ids it could draw (text_support): score with the same
    The loop reads nothing but the logits: generate() would also apply the checkpoint's
    generation_config (Qwen2.5-VL ships repetition_penalty 1.05, top_k 1, top_p 0.001), and then
    the rollouts would come from another distribution than softmax(logits / T), the one scored.
    """
    device = next(model.parameters()).device
    prompt = build_prompts(processor, images, questions).to(device)                   # B prompts
    return decode(model, processor, prompt, group_size, max_new_tokens, temperature, top_p,
                  greedy)


def decode(model, processor, prompt, group_size=1, max_new_tokens=160, temperature=1.0,
           top_p=1.0, greedy=False):
    """sample()'s decode loop from prompts already built and on the model's device (any chat
    prompts: pretrain.py's card also decodes text-only ones) -> sample()'s dict."""
    device, tok = next(model.parameters()).device, processor.tokenizer
    end = torch.tensor(end_ids(model), device=device)
    support = text_support(model, tok)                                                # [V]
    banned = (~support).to(device)
    was_training = model.training
    model.eval()  # with gradient checkpointing on, a training-mode forward would drop its KV cache
    logits, cache, pos = prefill(model, prompt)  # [B, V], cache, [B]
    G, N = group_size, len(prompt["input_ids"]) * group_size
    cache.batch_repeat_interleave(G)                                                   # B -> N rows
    logits, pos = logits.repeat_interleave(G, 0), pos.repeat_interleave(G)             # [N, V], [N]
    attention = prompt["attention_mask"].repeat_interleave(G, 0)                       # [N, P]
    ids = torch.full((N, max_new_tokens), tok.pad_token_id, dtype=torch.long, device=device)
    alive = torch.arange(N, device=device)  # the rows still writing, in the cache's order
    T = 0
    for t in range(max_new_tokens):
        logits = logits.masked_fill(banned, float("-inf"))
        nxt = logits.argmax(-1) if greedy else _draw(logits.float(), temperature, top_p)   # [n]
        ids[alive, t], T = nxt, t + 1
        going = ~torch.isin(nxt, end)
        if not going.all():                            # ended rows leave the batch (and the cache)
            if not going.any():
                break
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, attention, pos, nxt = alive[keep], attention[keep], pos[keep], nxt[keep]
        attention = torch.cat([attention, attention.new_ones(len(alive), 1)], 1)  # [n, P + t + 1]
        logits = model(input_ids=nxt[:, None], attention_mask=attention, past_key_values=cache,
                       use_cache=True, position_ids=(pos + t).view(1, -1, 1).expand(3, -1, 1)
                       ).logits[:, -1]                                               # [n, V]
    model.train(was_training)
    ids = ids[:, :T]                                                                   # [N, T]
    mask = completion_mask(ids, end.tolist())                                          # [N, T]
    texts = tok.batch_decode([row[: int(m.sum())] for row, m in zip(ids, mask)],
                             skip_special_tokens=True)
    return {"prompt": prompt, "group_size": G, "completion_ids": ids, "completion_mask": mask,
            "texts": texts, "truncated": ~torch.isin(ids, end).any(1), "support": support}


def _per_prompt(repeats, prompt):
    """repeats as a [B] tensor: an int means the same for every prompt."""
    B, device = prompt["input_ids"].shape[0], prompt["input_ids"].device
    return (torch.full((B,), repeats, device=device) if isinstance(repeats, int)
            else torch.as_tensor(repeats, device=device))


def expand_prompt(prompt, repeats):
    """B prompts -> N rows, prompt b repeated repeats[b] times (pixel_values by image patches)."""
    repeats = _per_prompt(repeats, prompt)
    out = {k: v.repeat_interleave(repeats, 0) for k, v in prompt.items() if k != "pixel_values"}
    patches = prompt["image_grid_thw"].prod(-1)                                       # [B]
    first = torch.cat([patches.new_zeros(1), patches.cumsum(0)[:-1]])                 # [B]
    rows = torch.cat([torch.arange(f, f + n, device=patches.device).repeat(int(r))
                      for f, n, r in zip(first.tolist(), patches.tolist(), repeats.tolist())])
    out["pixel_values"] = prompt["pixel_values"][rows]
    return out


def completion_logprobs(model, prompt, completion_ids, completion_mask, entropy=False,
                        temperature=1.0, repeats=1, support=None):
    """log pi(y_t | image, prompt, y_<t) for every completion token: [N, T].

    `prompt` holds B distinct prompts; prompt b is followed by `repeats[b]` completions (an int:
    the same for all; N = sum of repeats). The prompts are prefilled once and their KV cache
    repeated for the completions, so gradients reach the prompt pass and the vision tower through
    every row that shares them: the same log-probs and gradient as a forward over N copies of
    [prompt | completion] (tested), for a fraction of the work. Under gradient checkpointing
    (which disables the cache) or DDP (one forward per backward) it runs that per-row forward.
    Logits at position P-1+t predict completion token t: the prefill's last logits predict token 0.
    Values past the end-of-turn token are meaningless: multiply by the mask before using them.
    entropy=True also returns each position's policy entropy in nats, [N, T], without a graph.
    `temperature`: the policy is softmax(logits / T). GRPO samples at --temperature T, so it
    must score at T too, or the ratio, the KL and the gradient belong to another policy than the one
    that wrote the completions (TRL and verl divide the same way). SFT and evaluation use T = 1.
    `support` [V] bool (sample()'s): the softmax is over those ids only, as in sampling.
    """
    T, repeats = completion_ids.shape[1], _per_prompt(repeats, prompt)
    one_each = bool((repeats == 1).all())  # nothing shared: the prompt is already per row
    per_row = (getattr(model, "is_activation_checkpointing", False)
               or isinstance(model, torch.nn.parallel.DistributedDataParallel))
    if per_row or one_each:  # one forward over [prompt | completion] per row
        p = prompt if one_each else expand_prompt(prompt, repeats)
        logits = model(input_ids=torch.cat([p["input_ids"], completion_ids], 1),  # [N, P+T]
                       attention_mask=torch.cat([p["attention_mask"],
                                                 completion_mask.to(p["attention_mask"].dtype)], 1),
                       # zeros (text) over the completion: the 3-D positions come out as in sampling
                       mm_token_type_ids=torch.cat([p["mm_token_type_ids"],
                                                    torch.zeros_like(completion_ids)], 1),
                       pixel_values=p.get("pixel_values"),                     # text only: None
                       image_grid_thw=p.get("image_grid_thw"),
                       logits_to_keep=T + 1, use_cache=False).logits[:, :-1]  # [N, T, V]
    else:                                              # shared prompts: prefill B, continue N
        last, cache, pos = prefill(model, prompt)  # [B, V], cache, [B]
        cache.batch_repeat_interleave(repeats)  # B -> N rows
        pos = pos.repeat_interleave(repeats)[:, None] + torch.arange(T, device=pos.device)  # [N, T]
        attention = torch.cat([prompt["attention_mask"].repeat_interleave(repeats, 0),
                               completion_mask.to(prompt["attention_mask"].dtype)], 1)  # [N, P+T]
        rest = model(input_ids=completion_ids, attention_mask=attention, past_key_values=cache,
                     position_ids=pos.unsqueeze(0).expand(3, -1, -1), use_cache=True
                     ).logits                                                      # [N, T, V]
        first = last.repeat_interleave(repeats, 0).unsqueeze(1)                    # [N, 1, V]
        logits = torch.cat([first, rest[:, :-1]], 1)                                # [N, T, V]
    # The logits stay in the model's dtype; each chunk of positions is made float32, scored and
    # dropped, and recomputed in backward (checkpoint): with a 152k vocabulary a float32 copy of
    # all of them is ~1.2 GiB per 8 x 256 tokens, and log_softmax would keep several.
    hidden = support is not None and (~support).any()
    off = (~support).to(logits.device) if hidden else None
    grad = torch.is_grad_enabled() and logits.requires_grad
    logp, ent = [], []
    for t0 in range(0, T, LOGP_CHUNK):
        x, y = logits[:, t0:t0 + LOGP_CHUNK], completion_ids[:, t0:t0 + LOGP_CHUNK]
        if grad:
            logp.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, x, y, temperature, off,
                                                          use_reentrant=False))
        else:
            logp.append(_chunk_logprobs(x, y, temperature, off))
        if entropy:
            with torch.no_grad():
                z = _scaled(x, temperature, off)  # [N, c, V]
                ent.append(torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1))  # H = lse - E[z]
    logp = torch.cat(logp, 1)  # [N, T]
    return (logp, torch.cat(ent, 1)) if entropy else logp


LOGP_CHUNK = 64   # positions scored at once: the float32 temporaries are [N, 64, V]


def _scaled(logits, temperature, off):
    """Float32 logits / T, with the ids off the support at the lowest float (probability 0)."""
    z = logits.float() / temperature
    return z.masked_fill(off, torch.finfo(z.dtype).min) if off is not None else z


def _chunk_logprobs(logits, ids, temperature, off):
    """log softmax(logits / T) at the chosen ids, as the chosen logit minus a logsumexp: [n, c]."""
    z = _scaled(logits, temperature, off)  # [n, c, V]
    return z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)
