"""model.py -- one loader for the tiny offline Qwen2.5-VL and for real Qwen2(.5)-VL checkpoints,
plus the two operations every training stage needs: batched sampling and per-token log-probs.

    model, processor = load("tiny")                             # random init, built here, offline
    model, processor = load("Qwen/Qwen2.5-VL-3B-Instruct")      # or any local checkpoint directory

The tiny model is the real architecture (transformers' Qwen2_5_VLForConditionalGeneration: a ViT
with 2-D rotary positions and a patch merger, feeding a Qwen2 decoder with 3-D "M-RoPE") at about
2M parameters, and its tokenizer is a byte-level BPE trained here on the synthetic text. It is
wrapped in the real Qwen2.5-VL processor, so each image becomes the right number of
<|image_pad|> tokens exactly as for the 3B model.

Known traps in transformers 5.x, handled once, here:
  * Qwen2_5_VLProcessor insists on a video processor, which needs torchvision (no CPU wheel):
    ImageOnlyProcessor below drops the video half.
  * without torchvision the image processor falls back to its PIL backend (a warning, harmless).
  * `mm_token_type_ids` must reach the model in every forward, for completion tokens too, or the
    3-D rotary positions silently fall back to 1-D and the logits change.
  * `rope_parameters` replaces `rope_scaling`; `mrope_section` must sum to head_dim / 2.
  * bos/eos/pad ids belong on the config *and* the generation config, or generate() guesses.
"""
import argparse
import dataclasses
import functools
import inspect
import json
import math
import os
import random
import re
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import (AutoConfig, GenerationConfig, PreTrainedTokenizerFast, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                          Qwen2VLForConditionalGeneration)
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

SYSTEM_PROMPT = "Reason in <think> naming each region you check with its box, then answer in <answer>."
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]  # never in a completion
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *VISION_TOKENS]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]  # plain added tokens: they survive decoding
CHAT_TEMPLATE = (  # Qwen's ChatML, reduced to what we use: text and image parts
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# The tiny model. Text: head_dim = 128 / 4 = 32, so mrope_section (temporal, height, width
# frequency pairs) must sum to 16. Vision: 14-px patches, 2x2 merged, so a 112-px image is an
# 8x8 patch grid and 16 image tokens.
TINY_TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
TINY_VISION = dict(depth=3, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[2])
TINY_PIXELS = 112 * 112  # the image processor resizes every image to this budget: 16 tokens


class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    """The real Qwen2.5-VL processor without its video processor (which requires torchvision).
    Its __init__ signature defines which sub-processors ProcessorMixin loads and checks."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


# ----------------------------------------------------------------------------- device
def pick_device(name="auto"):
    """CUDA with bf16 autocast when available, else CPU float32. Returns (device, autocast dtype)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    # native bf16 only (Ampere and newer): is_bf16_supported() alone counts emulation, which on a
    # T4 runs bf16 autocast slowly. fp16 is never chosen: Qwen2.5-VL's activations overflow in it.
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return device, torch.bfloat16 if native else torch.float32


def peak_memory(device):
    """', peak GPU memory X GiB' on CUDA (the README's memory table is these figures), else ''."""
    if device.type != "cuda":
        return ""
    return f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


# ----------------------------------------------------------------------------- building and loading
@functools.lru_cache(maxsize=1)
def build_tiny_tokenizer(vocab_size=1024, n_texts=800):
    """A byte-level BPE trained on synthetic questions and traces. Digits are split one per token
    (as Qwen's tokenizer does), so any box coordinate is spelt from the same ten symbols."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    import data
    texts = [SYSTEM_PROMPT]
    for i in range(n_texts):
        s = data.make_sample("train", i)
        texts += [s["question"], s["response"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_tokens(TAGS)
    # each anatomical region name is ONE token (with and without a space before it): sequences get
    # ~15% shorter, and finding an option's letter in the question is matching one token, not
    # four ("left" "upper" "lung" "zone"). Single runs: single-choice 0.40 -> 0.48-0.50 (README)
    tok.add_tokens([AddedToken(w, normalized=False) for r in data.REGIONS for w in (" " + r, r)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", padding_side="left")


def token_ids(tokenizer):
    """The special-token ids a Qwen2.5-VL config needs, read from `tokenizer`: (ids for the text
    config and the GenerationConfig, ids for the top-level config). Shared by build_tiny and
    tests/random_3b.py, so every checkpoint this project writes is wired the same way."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    text = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return text, vision


def build_tiny(seed=0):
    """Random-init tiny Qwen2.5-VL and its processor, entirely offline."""
    tokenizer = build_tiny_tokenizer()
    text_ids, vision_ids = token_ids(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config=dict(TINY_TEXT, vocab_size=len(tokenizer), **text_ids),
        vision_config=dict(TINY_VISION, out_hidden_size=TINY_TEXT["hidden_size"]),
        **vision_ids, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(**text_ids)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=TINY_PIXELS, max_pixels=TINY_PIXELS)
    return model, ImageOnlyProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)


def load(name_or_path="tiny", device="cpu", dtype=torch.float32, seed=0):
    """`tiny` builds the offline model; anything else is a Hub id or a directory holding a
    Qwen2.5-VL or Qwen2-VL checkpoint (including ones this project saved). No remote code.
    A path that is not such a checkpoint exits with one line naming it, not a library traceback."""
    if name_or_path == "tiny":
        model, processor = build_tiny(seed)
        return model.to(device=device, dtype=dtype), processor
    looks_local = os.path.sep in name_or_path or name_or_path.startswith(".") or os.path.exists(name_or_path)
    if looks_local and not os.path.isfile(os.path.join(name_or_path, "config.json")):
        why = "does not exist" if not os.path.exists(name_or_path) else "has no config.json: not a model checkpoint"
        raise SystemExit(f"checkpoint {name_or_path}: {why}")
    try:
        kind = AutoConfig.from_pretrained(name_or_path).model_type
    except (OSError, ValueError) as e:   # offline Hub id, unreadable or foreign config.json
        raise SystemExit(f"checkpoint {name_or_path}: cannot read its config ({str(e).splitlines()[0][:160]})")
    cls = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration}.get(kind)
    if cls is None:
        raise SystemExit(f"checkpoint {name_or_path}: model_type {kind!r} is not qwen2_5_vl or qwen2_vl")
    try:
        # straight onto the device in its dtype: a 7B checkpoint never exists in float32 on the CPU
        model = cls.from_pretrained(name_or_path, dtype=dtype, device_map=torch.device(device))
        processor = ImageOnlyProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError, RuntimeError) as e:   # missing/truncated weights, tokenizer files, ...
        raise SystemExit(f"checkpoint {name_or_path}: cannot load ({str(e).splitlines()[0][:160]})")
    processor.tokenizer.padding_side = "left"
    assert processor.tokenizer.pad_token_id is not None, f"{name_or_path}: tokenizer has no pad token"
    return model.to(device=device, dtype=dtype), processor


# ----------------------------------------------------------------------------- LoRA (peft)
# Full fine-tuning keeps a gradient and two AdamW moments for every weight: 16 bytes a parameter
# in float32, 56 GiB for the 3B model before activations. LoRA (arXiv 2106.09685) freezes W and
# trains W + (alpha / r) B A with A [r, in] and B [out, r], B starting at 0, so training starts
# exactly at the checkpoint. The adapters are injected IN PLACE (peft.inject_adapter_in_model):
# the model is still the same transformers object, so sample() and completion_logprobs() are the
# code paths of full fine-tuning. Adapters stay float32 over a bf16 base: an adapter update of
# lr 1e-4 x a 1e-2 weight is below bf16's resolution.
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
VISION_LORA_TARGETS = ("qkv", "proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model, cfg):
    """Freeze `model` and give it LoRA adapters (cfg.lora_*): the language model's projections
    named in --lora-targets, and the vision tower's attention and MLP with --lora-vision."""
    from peft import LoraConfig, inject_adapter_in_model
    names = "|".join(cfg.lora_targets.split(","))
    pattern = rf".*language_model\.layers\.\d+\.\w+\.({names})"
    if cfg.lora_vision:
        pattern += rf"|.*visual\.blocks\.\d+\.\w+\.({'|'.join(VISION_LORA_TARGETS)})"
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                       target_modules=pattern), model)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    if not adapters:
        raise SystemExit(f"--lora-targets {cfg.lora_targets}: no module of this model has that name")
    for p in adapters:
        p.data = p.data.float()
        p.requires_grad_(True)
    n = sum(p.numel() for p in adapters)
    print(f"LoRA r={cfg.lora_r}: {n:,} trainable adapter parameters ({n / sum(p.numel() for p in model.parameters()):.2%})")


def lora_layers(model):
    from peft.tuners.lora import LoraLayer
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


class adapters_off:
    """`with adapters_off(model):` the base model, i.e. GRPO's frozen reference policy under LoRA:
    the same weights with the adapters switched off, no second copy in memory."""

    def __init__(self, model):
        self.layers = [m for _, m in lora_layers(model)]

    def __enter__(self):
        for m in self.layers:
            m.enable_adapters(False)

    def __exit__(self, *exc):
        for m in self.layers:
            m.enable_adapters(True)


def adapter_state(model):
    """The adapters' weights (what a LoRA run's resumable checkpoint adds to trainer_state.pt)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def load_adapters(model, state):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def merged_state_dict(model):
    """The state dict of plain transformers' model with every adapter merged into its weight,
    W + (alpha / r) B A, under the base layer's name: save_pretrained(state_dict=this) writes a
    checkpoint that AutoModelForImageTextToText.from_pretrained loads with no peft installed."""
    layers = dict(lora_layers(model))
    out = {}
    for name, t in model.state_dict().items():
        if "lora_" not in name:
            out[name.replace(".base_layer.", ".")] = t
    for name, m in layers.items():
        w = m.base_layer.weight
        out[name + ".weight"] = (w.float() + m.get_delta_weight("default").float()).to(w.dtype)
    return out


def apply_memory_plan(model, processor, cfg):
    """The single-GPU memory levers for real checkpoints (README, "Scaling"), flags of sft.py and
    grpo.py. bf16 weights are chosen at load time (--dtype); here: an image pixel budget (fewer
    image tokens), a frozen vision tower (no gradients or AdamW state for it), and gradient
    checkpointing (activations recomputed in backward instead of stored)."""
    if cfg.max_pixels:
        ip = processor.image_processor
        ip.size = SizeDict(shortest_edge=min(ip.size["shortest_edge"], cfg.max_pixels), longest_edge=cfg.max_pixels)
    if cfg.freeze_vision:
        model.model.visual.requires_grad_(False)
    if cfg.lora_r:
        add_lora(model, cfg)
    if cfg.grad_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})


@dataclass
class MemoryFlags:
    """The single-GPU memory levers of sft.py and grpo.py: their configs inherit these fields."""
    dtype: str = "float32"           # weights: float32 (bf16 autocast on CUDA) or bfloat16 (half the memory; AdamW rounds stochastically)
    max_pixels: int = 0              # image pixel budget per image (0: the model's own); fewer pixels, fewer tokens
    freeze_vision: bool = False      # train the language model only (saves the vision tower's grads and AdamW state)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    lora_r: int = 0                  # LoRA rank (0: full fine-tuning); the base is frozen, float32 adapters train
    lora_alpha: float = 32.0         # LoRA scale: the update is (alpha / r) B A
    lora_dropout: float = 0.0        # dropout on the adapters' input (0: GRPO's scored policy must be the sampled one)
    lora_targets: str = LORA_TARGETS  # comma-separated projection names that get adapters, in the language model
    lora_vision: bool = False        # also adapt the vision tower's attention and MLP (frozen otherwise)

    def problems(self):
        """(ok, message) pairs for the check() of each script."""
        return [(self.dtype in ("float32", "bfloat16") and self.max_pixels >= 0,
                 "--dtype must be float32 or bfloat16 and --max-pixels >= 0"),
                (self.lora_r >= 0 and self.lora_alpha > 0 and 0 <= self.lora_dropout < 1,
                 "--lora-r must be >= 0, --lora-alpha > 0 and --lora-dropout in [0, 1)"),
                (bool(re.fullmatch(r"\w+(,\w+)*", self.lora_targets)),
                 "--lora-targets must be comma-separated module names, e.g. q_proj,v_proj")]


# ----------------------------------------------------------------------------- bf16 weights: AdamW that rounds stochastically
# A bf16 weight of magnitude 0.02 has a resolution of 1.2e-4; AdamW's step at lr 1e-6 is ~1e-6,
# and round-to-nearest throws it away every time: in pure bf16, most weights never move at the
# learning rates real models are fine-tuned with. Rounding up or down AT RANDOM, with probability
# in proportion to the distance, keeps every update in expectation (Gupta et al. 2015,
# arXiv 1502.02551): over 100 steps the weights move as float32 master weights would (tested),
# at the memory of pure bf16 (weights, gradients and both moments 2 bytes each: 8 bytes a parameter).
def stochastic_round(x):
    """float32 -> bfloat16, unbiased: add random low bits below bf16's 16 kept bits, then cut them."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class StochasticAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter, arXiv 1711.05101) for bf16 parameters: the step is computed in
    float32, then the weight and the two moments are stored back with stochastic_round."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            (b1, b2), lr = g["betas"], g["lr"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                st["step"] += 1
                grad, w = p.grad.float(), p.float()
                m = st["m"].float().mul_(b1).add_(grad, alpha=1 - b1)
                v = st["v"].float().mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (v / (1 - b2 ** st["step"])).sqrt_().add_(g["eps"])
                w.mul_(1 - lr * g["weight_decay"]).addcdiv_(m, denom, value=-lr / (1 - b1 ** st["step"]))
                for dst, src in ((p, w), (st["m"], m), (st["v"], v)):
                    dst.copy_(stochastic_round(src) if dst.dtype == torch.bfloat16 else src)


def adamw(groups, lr, betas, weight_decay=0.0):
    """torch's AdamW, or StochasticAdamW when the trained weights are bf16 (--dtype bfloat16 and
    full fine-tuning; LoRA's adapters are float32 and take torch's)."""
    groups = list(groups)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    cls = StochasticAdamW if any(p.dtype == torch.bfloat16 for p in params) else torch.optim.AdamW
    return cls(groups, lr=lr, betas=betas, weight_decay=weight_decay)


def weights_dtype(name):
    """--dtype: float32 weights (bf16 autocast on CUDA) or bfloat16 weights (half the memory, and
    AdamW's moments follow the weights' dtype: 8 bytes per trained parameter instead of 16)."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


# ----------------------------------------------------------------------------- several GPUs (torchrun)
# nanoGPT's recipe: `torchrun --nproc_per_node=N sft.py` sets RANK/WORLD_SIZE/LOCAL_RANK; each
# process joins one group, owns one device, wraps the model in DistributedDataParallel (gradients
# are averaged in backward) and works on its own share of the data. Rank 0 logs and saves.
def ddp_init(device):
    """Returns (rank, world_size, device); (0, 1, device) outside torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def ddp_mean(value):
    """A float averaged over ranks (for logging one number per step); unchanged outside DDP."""
    if not dist.is_initialized():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)   # a sum over ranks
    return t.item() / dist.get_world_size()


def ddp_check_in_sync(model):
    """Assert every rank holds the same weights (DDP's whole promise) and say so. A weighted sum of
    all parameters is a cheap fingerprint: any rank that drifted would show a different one."""
    if not dist.is_initialized():
        return
    fp = sum(float((p.detach().double() * (i + 1)).sum()) for i, p in enumerate(model.parameters()))
    prints = [None] * dist.get_world_size()
    dist.all_gather_object(prints, fp)
    assert all(abs(x - prints[0]) <= 1e-9 * max(1.0, abs(prints[0])) for x in prints), f"ranks disagree on the weights: {prints}"
    if is_main():
        print(f"ddp: {len(prints)} ranks agree on the weights (fingerprint {fp:.6e})")


def save(model, processor, out, state=None, into=False):
    """save_pretrained for model and processor (weights in safetensors), ATOMICALLY: everything
    is written to a temporary sibling directory on the same filesystem, then renamed into place,
    so a kill or a full disk mid-save leaves whatever was at `out` before intact and loadable.
    `state` (optimizer, step, data position, RNG states: tensors and plain Python only) goes to
    trainer_state.pt, read back with torch.load(weights_only=True). into=True writes into an
    existing run directory (metrics.jsonl stays), replacing each file atomically.
    The processor class is renamed to plain Qwen2_5_VLProcessor (with a video-processor entry), so
    AutoProcessor.from_pretrained(out) works wherever torchvision is installed."""
    out = os.path.normpath(out)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=merged_state_dict(model) if lora_layers(model) else None)
        processor.save_pretrained(tmp)
        for name in ("processor_config.json", "tokenizer_config.json"):
            path = os.path.join(tmp, name)
            cfg = json.load(open(path))
            cfg["processor_class"] = "Qwen2_5_VLProcessor"
            if name == "processor_config.json":
                cfg.setdefault("video_processor", dict(cfg["image_processor"], video_processor_type="Qwen2VLVideoProcessor"))
            json.dump(cfg, open(path, "w"), indent=2)
        if state is not None:
            torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        _before_rename(tmp)
        if into:                         # a run directory with logs in it: replace file by file
            os.makedirs(out, exist_ok=True)
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(out, name))
            os.rmdir(tmp)
        else:                            # swap: old -> .old, tmp -> out (both renames are atomic)
            if os.path.isdir(out):
                os.rename(out, out + ".old")
            os.rename(tmp, out)
            shutil.rmtree(out + ".old", ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(out) and os.path.isdir(out + ".old"):
            os.rename(out + ".old", out)
        raise SystemExit(f"cannot save to {out}: {e.strerror or e} (the previous checkpoint, if any, is intact)")


def _before_rename(tmp):
    """A seam for the test that kills a save between writing and renaming."""


def save_checkpoint(out, step, model, processor, state, keep=2):
    """OUT/checkpoints/step_000123, written atomically; only the `keep` newest are kept."""
    root = os.path.join(out, "checkpoints")
    os.makedirs(root, exist_ok=True)
    save(model, processor, os.path.join(root, f"step_{step:06d}"), dict(state, step=step))
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(out):
    """Complete checkpoints under OUT/checkpoints, oldest first (half-written .tmp-* never match)."""
    root = os.path.join(out, "checkpoints")
    names = sorted(n for n in os.listdir(root) if re.fullmatch(r"step_\d{6}", n)) if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in names]


def load_state(path):
    """trainer_state.pt of a checkpoint directory: plain data only, never arbitrary pickles."""
    return torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)


def rng_state():
    """Every random state the next step depends on; under DDP a list with one entry per rank."""
    s = {"torch": torch.get_rng_state(), "python": random.getstate(),
         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if not dist.is_initialized():
        return s
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, s)
    return {"ranks": every}


def set_rng_state(s):
    if "ranks" in s:
        assert dist.is_initialized() and len(s["ranks"]) == dist.get_world_size(), (
            f"this checkpoint was written by {len(s['ranks'])} ranks: resume with the same --nproc_per_node")
        s = s["ranks"][dist.get_rank()]
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def open_run(out, resume):
    """Make sure OUT is a writable run directory and say where training starts.

    Fresh run: the previous run's metrics.jsonl and periodic checkpoints in OUT are removed (OUT
    is this run's directory). resume=True: the newest complete checkpoint is found and its
    state loaded, and log lines of steps after it are dropped, since those steps are redone.
    Returns (checkpoint dir or None, its state or None)."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--out {out}: not writable ({e.strerror or e})")
    metrics = os.path.join(out, "metrics.jsonl")
    found = list_checkpoints(out) if resume else []
    if resume and not found:   # e.g. a cluster job preempted before its first checkpoint, re-run as it was
        if is_main():
            print(f"--resume: no checkpoint in {os.path.join(out, 'checkpoints')} yet: starting from step 0")
        resume = False
    if not resume:
        if is_main():                                  # under DDP only rank 0 touches the run directory
            if os.path.exists(metrics) or list_checkpoints(out):
                print(f"{out}: starting afresh (previous metrics and checkpoints removed; --resume continues instead)")
            shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
            open(metrics, "w").close()
        _barrier()
        return None, None
    state = load_state(found[-1])
    if is_main():
        lines = open(metrics).readlines() if os.path.exists(metrics) else []
        kept = [x for x in lines if x.strip() and json.loads(x)["step"] <= state["step"]]
        with open(metrics + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics + ".tmp", metrics)
        print(f"resuming from {found[-1]} (step {state['step']})")
    _barrier()
    return found[-1], state


def _barrier():
    if dist.is_initialized():
        dist.barrier()


class StopOnCtrlC:
    """The first Ctrl-C asks the training loop to stop after the current step (it then saves a
    checkpoint and exits cleanly); a second one interrupts at once."""

    def __init__(self):
        import signal
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort now)", flush=True)


def after_step(script, cfg, step, bad, stop, model, processor, state):
    """The run-safety tail of every training step, shared by sft.py and grpo.py: stop on too many
    non-finite updates in a row, save a periodic (or Ctrl-C) checkpoint, and say how to resume.
    `state` is a function, so the optimizer state is only gathered when a checkpoint is written.
    Returns True when the run should stop here."""
    if bad >= cfg.max_bad_steps:
        raise SystemExit(f"{script}: {bad} non-finite losses or gradients in a row (step {step}); no update "
                         f"was applied for them. Lower --lr, or resume from the last checkpoint with --resume.")
    if (cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps) or stop.requested:
        snapshot = state()                      # on every rank: it gathers each rank's RNG state
        if is_main():
            save_checkpoint(cfg.out, step, model, processor, snapshot, keep=cfg.keep)
        _barrier()
    if stop.requested:
        print(f"stopped at step {step}; continue with the same command plus --resume")
    return stop.requested


# ----------------------------------------------------------------------------- prompts and completions
def image_frame(processor, side):
    """The side of the square image the model sees when handed a side x side image: Qwen's
    smart_resize rounds to whole 28-px merged patches within the pixel budget. Data is loaded
    at this frame, so boxes are written in the frame the model sees (224 -> 112 for tiny)."""
    ip = processor.image_processor
    return smart_resize(side, side, ip.patch_size * ip.merge_size, ip.size["shortest_edge"], ip.size["longest_edge"])[0]


def build_prompts(processor, images, questions):
    """Chat-formatted, LEFT-padded prompts with their images, ready for generate() or a forward.

    Returns a BatchFeature: input_ids / attention_mask / mm_token_type_ids [N, P],
    pixel_values [sum of patches, 3*2*14*14], image_grid_thw [N, 3]. Never truncated: cutting a
    prompt would cut image tokens and break the token/feature correspondence asserted below.
    """
    texts = [processor.apply_chat_template(
        [{"role": "system", "content": SYSTEM_PROMPT},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
        add_generation_prompt=True, tokenize=False) for q in questions]
    batch = processor(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True)
    ip = processor.image_processor
    for im, (_, h, w) in zip(images, batch["image_grid_thw"].tolist()):
        assert (h * ip.patch_size, w * ip.patch_size) == (im.height, im.width), (
            f"the processor resized a {im.width}x{im.height} image to {w * ip.patch_size}x{h * ip.patch_size}: "
            f"its boxes would be in another frame (load data at the frame image_frame() gives)")
    merge = ip.merge_size ** 2
    n_tokens = int((batch["input_ids"] == processor.image_token_id).sum())
    n_features = int(batch["image_grid_thw"].prod(-1).sum()) // merge
    assert n_tokens == n_features, f"{n_tokens} image tokens in the prompts but {n_features} image features"
    return batch


def end_ids(model):
    """Token ids that end an assistant turn (Qwen: <|im_end|>, and <|endoftext|> on some configs)."""
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
    lengths = sorted(len(ids) + 1 for ids in processor.tokenizer(list(responses), add_special_tokens=False)["input_ids"])
    pct = {p: lengths[min(len(lengths) - 1, int(p / 100 * len(lengths)))] for p in (50, 90, 99)}
    budget = max(floor, int(math.ceil(margin * pct[99])))
    print(f"reference responses: {pct[50]} / {pct[90]} / {pct[99]} tokens at the 50/90/99th percentile "
          f"(max {lengths[-1]}): generation budget {budget}")
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
                                         image_grid_thw=prompt["image_grid_thw"],
                                         attention_mask=prompt["attention_mask"])      # [3, B, P]
    out = model(**prompt, position_ids=pos, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.past_key_values, pos.amax(dim=(0, 2)) + 1           # [B, V], cache, [B]


def _draw(logits, temperature, top_p):
    """One token per row from softmax(logits / T), restricted to the top-p nucleus. [n, V] -> [n]."""
    logits = logits / temperature
    if top_p < 1.0:   # drop the tail whose cumulative probability is below 1 - top_p (the top token always stays)
        sorted_logits, order = logits.sort(-1)
        tail = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        tail[:, -1] = False
        logits = logits.masked_fill(tail.scatter(1, order, tail), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)


@torch.no_grad()
def sample(model, processor, images, questions, group_size=1, max_new_tokens=160,
           temperature=1.0, top_p=1.0, greedy=False):
    """Sample `group_size` completions per prompt: one prefill per prompt, then a KV-cached decode
    loop over the B * G rows that drops each row once it has ended.

    B prompts -> N = B * G rows, prompt i's group in rows i*G .. i*G+G-1. Returns a dict:
      prompt           BatchFeature of the B distinct left-padded prompts (the scoring forward reuses it)
      group_size       G
      completion_ids   [N, T] sampled tokens, pad after the end (T = longest completion in the batch)
      completion_mask  [N, T] 1 up to and including the first end-of-turn token
      texts            N decoded completions (think/answer tags kept, end token dropped)
      truncated        [N] bool, True where no end-of-turn token was produced
    The loop reads nothing but the logits: generate() would also apply the checkpoint's
    generation_config (Qwen2.5-VL ships repetition_penalty 1.05, top_k 1, top_p 0.001), and then
    the rollouts would come from another distribution than softmax(logits / T), the one scored.
    """
    device, tok = next(model.parameters()).device, processor.tokenizer
    end = torch.tensor(end_ids(model), device=device)
    # a completion must never hold a vision placeholder: the forward that scores it would count an
    # <|image_pad|> there as an image token with no image feature and fail (a random-init model
    # does sample them). Suppressed, they get probability 0 here and ~0 in a trained model anyway.
    banned = [i for i in tok.convert_tokens_to_ids(VISION_TOKENS) if i not in (None, tok.unk_token_id)]
    prompt = build_prompts(processor, images, questions).to(device)                   # B prompts
    was_training = model.training
    model.eval()      # with gradient checkpointing on, a training-mode forward would drop its KV cache
    logits, cache, pos = prefill(model, prompt)                                        # [B, V], cache, [B]
    G, N = group_size, len(images) * group_size
    cache.batch_repeat_interleave(G)                                                   # B -> N rows
    logits, pos = logits.repeat_interleave(G, 0), pos.repeat_interleave(G)             # [N, V], [N]
    attention = prompt["attention_mask"].repeat_interleave(G, 0)                       # [N, P]
    ids = torch.full((N, max_new_tokens), tok.pad_token_id, dtype=torch.long, device=device)
    alive = torch.arange(N, device=device)             # the rows still writing, in the cache's order
    T = 0
    for t in range(max_new_tokens):
        logits[:, banned] = float("-inf")
        nxt = logits.argmax(-1) if greedy else _draw(logits.float(), temperature, top_p)   # [n]
        ids[alive, t], T = nxt, t + 1
        going = ~torch.isin(nxt, end)
        if not going.all():                            # ended rows leave the batch (and the cache)
            if not going.any():
                break
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, attention, pos, nxt = alive[keep], attention[keep], pos[keep], nxt[keep]
        attention = torch.cat([attention, attention.new_ones(len(alive), 1)], 1)     # [n, P + t + 1]
        logits = model(input_ids=nxt[:, None], attention_mask=attention, past_key_values=cache, use_cache=True,
                       position_ids=(pos + t).view(1, -1, 1).expand(3, -1, 1)).logits[:, -1]   # [n, V]
    model.train(was_training)
    ids = ids[:, :T]                                                                   # [N, T]
    mask = completion_mask(ids, end.tolist())                                          # [N, T]
    texts = tok.batch_decode([row[: int(m.sum())] for row, m in zip(ids, mask)], skip_special_tokens=True)
    return {"prompt": prompt, "group_size": G, "completion_ids": ids, "completion_mask": mask, "texts": texts,
            "truncated": ~torch.isin(ids, end).any(1)}


def _per_prompt(repeats, prompt):
    """repeats as a [B] tensor: an int means the same for every prompt."""
    B, device = prompt["input_ids"].shape[0], prompt["input_ids"].device
    return torch.full((B,), repeats, device=device) if isinstance(repeats, int) else torch.as_tensor(repeats, device=device)


def expand_prompt(prompt, repeats):
    """B prompts -> N rows, prompt b repeated repeats[b] times (pixel_values by each image's patches)."""
    repeats = _per_prompt(repeats, prompt)
    out = {k: v.repeat_interleave(repeats, 0) for k, v in prompt.items() if k != "pixel_values"}
    patches = prompt["image_grid_thw"].prod(-1)                                       # [B]
    first = torch.cat([patches.new_zeros(1), patches.cumsum(0)[:-1]])                 # [B]
    rows = torch.cat([torch.arange(f, f + n, device=patches.device).repeat(int(r))
                      for f, n, r in zip(first.tolist(), patches.tolist(), repeats.tolist())])
    out["pixel_values"] = prompt["pixel_values"][rows]
    return out


def completion_logprobs(model, prompt, completion_ids, completion_mask, entropy=False, temperature=1.0, repeats=1):
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
    `temperature`: the policy is softmax(logits / T). GRPO samples at T = 0.7, so it must score
    at T = 0.7 too, or the ratio, the KL and the gradient belong to another policy than the one
    that wrote the completions (TRL and verl divide the same way). SFT and evaluation use T = 1.
    """
    T, repeats = completion_ids.shape[1], _per_prompt(repeats, prompt)
    per_row = getattr(model, "is_activation_checkpointing", False) or isinstance(model, torch.nn.parallel.DistributedDataParallel)
    if per_row or bool((repeats == 1).all()):          # one forward over [prompt | completion] per row
        p = expand_prompt(prompt, repeats) if not bool((repeats == 1).all()) else prompt
        logits = model(input_ids=torch.cat([p["input_ids"], completion_ids], 1),                    # [N, P+T]
                       attention_mask=torch.cat([p["attention_mask"], completion_mask.to(p["attention_mask"].dtype)], 1),
                       # zeros (text) over the completion: the 3-D positions come out as in sampling
                       mm_token_type_ids=torch.cat([p["mm_token_type_ids"], torch.zeros_like(completion_ids)], 1),
                       pixel_values=p["pixel_values"], image_grid_thw=p["image_grid_thw"],
                       logits_to_keep=T + 1, use_cache=False).logits[:, :-1]                       # [N, T, V]
    else:                                              # shared prompts: prefill B, continue N
        last, cache, pos = prefill(model, prompt)                                                  # [B, V], cache, [B]
        cache.batch_repeat_interleave(repeats)                                                     # B -> N rows
        pos = pos.repeat_interleave(repeats)[:, None] + torch.arange(T, device=pos.device)        # [N, T]
        attention = torch.cat([prompt["attention_mask"].repeat_interleave(repeats, 0),
                               completion_mask.to(prompt["attention_mask"].dtype)], 1)            # [N, P+T]
        rest = model(input_ids=completion_ids, attention_mask=attention, past_key_values=cache,
                     position_ids=pos.unsqueeze(0).expand(3, -1, -1), use_cache=True).logits     # [N, T, V]
        logits = torch.cat([last.repeat_interleave(repeats, 0).unsqueeze(1), rest[:, :-1]], 1)    # [N, T, V]
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)                    # [N, T]
    logp = picked - torch.logsumexp(logits, dim=-1)                                          # [N, T]
    if not entropy:
        return logp
    with torch.no_grad():   # row by row: a [T, V] temporary, not two more [N, T, V] float32 copies
        return logp, torch.stack([-(d.exp() * d).sum(-1) for d in map(lambda x: torch.log_softmax(x, -1), logits)])


# ----------------------------------------------------------------------------- plumbing
def _flag_bool(text):
    """argparse's bool("False") is True; accept the usual spellings instead."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise ValueError(text)   # argparse turns this into "invalid _flag_bool value: 'text'"
    return value


def parse_config(cls, doc="", nargs=None):
    """Expose a config dataclass as command-line flags (max_steps -> --max-steps). Each flag's help
    is the one-line comment written after its field, so the dataclass stays the single source.
    `nargs` maps a field to argparse's nargs (e.g. {"checkpoint": "+"}): that field becomes a list."""
    source = "".join(inspect.getsource(c) for c in cls.__mro__ if dataclasses.is_dataclass(c))  # inherited flags too
    comments = dict(re.findall(r"^\s+(\w+):[^=\n]+=[^#\n]+#\s*(.+)$", source, re.M))
    ap = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
    own_first = sorted(dataclasses.fields(cls), key=lambda f: f.name not in vars(cls).get("__annotations__", {}))
    for f in own_first:                  # the script's own flags, then the inherited ones
        flag, is_bool = "--" + f.name.replace("_", "-"), isinstance(f.default, bool)
        ap.add_argument(flag, type=_flag_bool if is_bool else type(f.default), default=f.default,
                        nargs="?" if is_bool else (nargs or {}).get(f.name),
                        const=True if is_bool else None,   # a bare `--resume` means `--resume true`
                        help=f"{comments.get(f.name, '')} (default: {f.default})".replace("%", "%%"))
    return cls(**vars(ap.parse_args()))
