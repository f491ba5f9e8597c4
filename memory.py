"""memory.py -- what it takes to fit a real checkpoint in one GPU's memory, shared by sft.py,
grpo.py and evaluate.py. None of it is needed by the tiny model; all of it is one flag away.

  * LoRA         add_lora (peft adapters injected in place), adapters_off (the reference of
                 --beta > 0 is the policy with its adapters off), save_merged (a merged bf16 save
                 on the CPU, shard by shard)
  * the plan     MemoryFlags / apply_memory_plan: bf16 weights, a pixel budget, a frozen vision
                 tower, gradient checkpointing, LoRA
  * bf16 AdamW   StochasticAdamW: full fine-tuning in bf16 without losing the small updates
"""
import json
import os
import re
from dataclasses import dataclass

import torch
from transformers.image_utils import SizeDict

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
    inject_adapter_in_model(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                       lora_dropout=cfg.lora_dropout,
                                       target_modules=pattern), model)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    if not adapters:
        raise SystemExit(f"--lora-targets {cfg.lora_targets}: no module of this model has it")
    for p in adapters:
        p.data = p.data.float()
        p.requires_grad_(True)
    n = sum(p.numel() for p in adapters)
    print(f"LoRA r={cfg.lora_r}: {n:,} trainable adapter parameters "
          f"({n / sum(p.numel() for p in model.parameters()):.2%})")


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


def save_merged(model, out, shard_bytes=2 * 2**30):
    """Write `model` as a plain transformers checkpoint with every LoRA adapter merged into its
    weight, W + (alpha / r) B A, under the base layer's name: loadable by
    AutoModelForImageTextToText.from_pretrained with no peft installed. Streamed: shards are
    planned from the shapes, then each tensor is copied to the CPU (and merged there) only when
    its shard is written, so neither the GPU nor the host ever holds a second copy of the model
    (merging on the GPU cost +5.2 GiB for the 3B, +12.2 GiB for the 7B at the first save).
    A bf16 weight is rounded stochastically from the float32 sum: rounding to nearest drops most
    of a small fine-tuning update (measured: ~29% of a GRPO update at lr 1e-5 is lost)."""
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    layers = dict(lora_layers(model))
    tied = (set(getattr(model, "_tied_weights_keys", None) or ())
            if model.config.tie_word_embeddings else set())
    names = [n for n in model.state_dict() if "lora_" not in n
             and n not in tied]  # references, no copies
    params = model.state_dict()
    # a saved file does not depend on, nor move, the run's RNG
    gen = torch.Generator().manual_seed(0)

    def cpu_tensor(name):
        t = params[name].detach().to("cpu")
        owner = name.rsplit(".base_layer.", 1)[0]
        if owner in layers and name.endswith(".base_layer.weight"):
            m = layers[owner]
            a = m.lora_A["default"].weight.detach().float().cpu()
            b = m.lora_B["default"].weight.detach().float().cpu()
            w = t.float() + m.scaling["default"] * (b @ a)                      # [out, in]
            t = stochastic_round(w, gen) if t.dtype == torch.bfloat16 else w.to(t.dtype)
        return t.contiguous()

    shards, size = [[]], 0
    for n in names:  # plan: shards of at most shard_bytes
        nbytes = params[n].numel() * params[n].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, part in zip(files, shards):
        save_file({n.replace(".base_layer.", "."): cpu_tensor(n) for n in part},
                  os.path.join(out, file), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {n.replace(".base_layer.", "."): f for f, part in zip(files, shards)
                      for n in part}
        total = sum(params[n].numel() * params[n].element_size() for n in names)
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
                  open(os.path.join(out, "model.safetensors.index.json"), "w"), indent=2)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def apply_memory_plan(model, processor, cfg):
    """The single-GPU memory levers for real checkpoints (README, "Scaling"), flags of sft.py and
    grpo.py. bf16 weights are chosen at load time (--dtype); here: an image pixel budget (fewer
    image tokens), a frozen vision tower (no gradients or AdamW state for it), and gradient
    checkpointing (activations recomputed in backward instead of stored)."""
    if cfg.max_pixels:
        ip = processor.image_processor
        ip.size = SizeDict(shortest_edge=min(ip.size["shortest_edge"], cfg.max_pixels),
                           longest_edge=cfg.max_pixels)
    if cfg.freeze_vision:
        model.model.visual.requires_grad_(False)
    if cfg.lora_r:
        add_lora(model, cfg)
    if cfg.grad_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        # transformers makes the output of EVERY input embedding require grad, the vision tower's
        # patch embedding too: a frozen tower's activations would then be kept for backward (and,
        # checkpointed, recomputed) for a gradient that reaches no trainable weight. Unhook it.
        if not any(p.requires_grad for p in model.model.visual.parameters()):
            for hook in getattr(model, "_require_grads_hooks", []):
                hook.remove()
            model._require_grads_hooks = [model.get_input_embeddings().register_forward_hook(
                lambda module, args, out: out.requires_grad_(True))]     # the text embedding's only


@dataclass
class MemoryFlags:
    """The single-GPU memory levers of sft.py and grpo.py: their configs inherit these fields."""
    dtype: str = "float32"           # weights: float32 (bf16 autocast on CUDA) or bfloat16 (half)
    max_pixels: int = 0              # pixel budget per image (0: the model's own): fewer tokens
    freeze_vision: bool = False      # train the language model only (no tower grads or AdamW state)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    lora_r: int = 0  # LoRA rank (0: full fine-tuning); the base is frozen, float32 adapters train
    lora_alpha: float = 32.0         # LoRA scale: the update is (alpha / r) B A
    lora_dropout: float = 0.0        # dropout on adapters' input (0: GRPO scores what it sampled)
    lora_targets: str = LORA_TARGETS  # comma-separated language-model projections that get adapters
    lora_vision: bool = False  # also adapt the vision tower's attention and MLP (frozen otherwise)

    def problems(self):
        """(ok, message) pairs for the check() of each script."""
        return [(self.dtype in ("float32", "bfloat16") and self.max_pixels >= 0,
                 "--dtype must be float32 or bfloat16 and --max-pixels >= 0"),
                (self.lora_r >= 0 and self.lora_alpha > 0 and 0 <= self.lora_dropout < 1,
                 "--lora-r must be >= 0, --lora-alpha > 0 and --lora-dropout in [0, 1)"),
                (bool(re.fullmatch(r"\w+(,\w+)*", self.lora_targets)),
                 "--lora-targets must be comma-separated module names, e.g. q_proj,v_proj")]


# --------------------------------------------------- bf16 weights: AdamW that rounds stochastically
# A bf16 weight of magnitude 0.02 has a resolution of 1.2e-4; AdamW's step at lr 1e-6 is ~1e-6,
# and round-to-nearest throws it away every time: in pure bf16, most weights never move at the
# learning rates real models are fine-tuned with. Rounding up or down AT RANDOM, with probability
# in proportion to the distance, keeps every update in expectation (Gupta et al. 2015,
# arXiv 1502.02551): over 100 steps the weights move as float32 master weights would (tested),
# at the memory of pure bf16 (weights, gradients and both moments 2 bytes each: 8 bytes a
# parameter).
def stochastic_round(x, generator=None):
    """float32 -> bfloat16, unbiased: add random bits below bf16's 16 kept bits, then cut them."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device,
                          generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class StochasticAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter, arXiv 1711.05101) for bf16 parameters: the step is computed in
    float32, then the weight and the two moments are stored back with stochastic_round. The
    float32 work needs ~32 bytes of temporaries per element, so a tensor is updated in slices of
    SLICE elements: unsliced, the 3B's tied embedding alone took 9.3 GiB of temporaries."""
    SLICE = 2 ** 24   # elements per slice: ~0.5 GiB of float32 temporaries

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
                flat = [t.view(-1) for t in (p.data, p.grad, st["m"], st["v"])]
                for i in range(0, p.numel(), self.SLICE):
                    self._update(*(t[i:i + self.SLICE] for t in flat), g, st["step"])

    @staticmethod
    def _update(p, grad, m_stored, v_stored, g, step):
        """One slice of AdamW, in float32, stored back into the slice's tensors."""
        (b1, b2), lr = g["betas"], g["lr"]
        grad, w = grad.float(), p.float()
        m = m_stored.float().mul_(b1).add_(grad, alpha=1 - b1)
        v = v_stored.float().mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v / (1 - b2 ** step)).sqrt_().add_(g["eps"])
        w.mul_(1 - lr * g["weight_decay"]).addcdiv_(m, denom, value=-lr / (1 - b1 ** step))
        for dst, src in ((p, w), (m_stored, m), (v_stored, v)):
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
