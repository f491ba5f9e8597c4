"""run.py -- everything a training script needs around its loop, shared by sft.py and grpo.py
(which never import each other): the flag parser, the device, several GPUs and a run that loses
nothing (the memory levers of a real checkpoint are in memory.py).

  * flags        parse_config: a config dataclass becomes --help (each field's comment is its help)
  * DDP          ddp_init / ddp_mean / ddp_check_in_sync under torchrun, no-ops without it
  * safety       save: atomic (write to a temporary directory, then rename); periodic resumable
                 checkpoints with optimizer, data order and RNG; open_run starts afresh or, with
                 --resume, from the newest checkpoint (from step 0 if none yet, so a command with
                 --resume can simply be re-run); Ctrl-C saves first
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import time

import torch
import torch.distributed as dist

import memory


# ----------------------------------------------------------------------------- device
def pick_device(name="auto"):
    """CUDA with bf16 autocast when available, else CPU float32 -> (device, autocast dtype)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    # native bf16 only (Ampere and newer): is_bf16_supported() alone counts emulation, which on a
    # T4 runs bf16 autocast slowly. fp16 is never chosen: Qwen2.5-VL's activations overflow in it.
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return device, torch.bfloat16 if native else torch.float32


def warn_tiny_lr(script, lr, default, model):
    """One line when a real checkpoint is about to train at the tiny model's default --lr (a 3B at
    SFT's 2e-3 diverges; pretrained models fine-tune at ~1e-5 in full, ~1e-4 with LoRA). A real
    checkpoint: Qwen's 152k vocabulary (the tiny model's is ~560 tokens), or over 50M parameters."""
    n = sum(p.numel() for p in model.parameters())
    vocab = model.get_output_embeddings().weight.shape[0]
    if lr == default and (vocab > 100_000 or n > 50e6):
        print(f"{script}: warning: --lr {lr:g} is the tiny model's default; a pretrained "
              f"checkpoint ({n / 1e6:,.0f}M parameters, {vocab:,} tokens) fine-tunes at ~1e-5 "
              f"(full) or ~1e-4 (LoRA): pass --lr")


def peak_memory(device):
    """', peak GPU memory X GiB' on CUDA (the README's memory table is these figures), else ''."""
    if device.type != "cuda":
        return ""
    return f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def provenance():
    """Where a run is made: the commit of this code, the processor, the threads, the date."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"commit": commit, "machine": f"{os.cpu_count()} x {cpu}",
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}


def cosine(progress):
    """The learning-rate decay factor at `progress` in [0, 1]: from 1 down to 0.1 along half a
    cosine (sft.py's schedule after its warm-up, and pretrain.py's)."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# -------------------------------------------------------------------------- several GPUs (torchrun)
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
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)   # a sum over ranks
    return t.item() / dist.get_world_size()


def ddp_std(x):
    """The unbiased std of a tensor's values pooled over all ranks (x.std() outside DDP): what a
    batch-level scale must use, or the result would change with the number of GPUs."""
    if not dist.is_initialized():
        return x.std() if x.numel() > 1 else x.new_zeros(())
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    s = torch.tensor([x.numel(), float(x.sum()), float((x.double() ** 2).sum())],
                     dtype=torch.float64, device=device)
    dist.all_reduce(s)   # count, sum and sum of squares over ranks
    n, total, squares = s.tolist()
    return x.new_tensor(max(squares - total * total / n, 0.0) / (n - 1) if n > 1 else 0.0).sqrt()


def ddp_check_in_sync(model):
    """Assert every rank holds the same weights (DDP's whole promise) and say so. A weighted sum of
    all parameters is a cheap fingerprint: any rank that drifted would show a different one."""
    if not dist.is_initialized():
        return
    fp = sum(float((p.detach().double() * (i + 1)).sum()) for i, p in enumerate(model.parameters()))
    prints = [None] * dist.get_world_size()
    dist.all_gather_object(prints, fp)
    assert all(abs(x - prints[0]) <= 1e-9 * max(1.0, abs(prints[0])) for x in prints), (
        f"ranks disagree on the weights: {prints}")
    if is_main():
        print(f"ddp: {len(prints)} ranks agree on the weights (fingerprint {fp:.6e})")


def save(model, processor, out, state=None, into=False, weights=True):
    """save_pretrained for model and processor (weights in safetensors), ATOMICALLY: everything
    is written to a temporary sibling directory on the same filesystem, then renamed into place,
    so a kill or a full disk mid-save leaves whatever was at `out` before intact and loadable.
    `state` (optimizer, step, data position, RNG states: tensors and plain Python only) goes to
    trainer_state.pt, read back with torch.load(weights_only=True). into=True writes into an
    existing run directory (metrics.jsonl stays), replacing each file atomically.
    The processor class is renamed to plain Qwen2_5_VLProcessor (with a video-processor entry), so
    AutoProcessor.from_pretrained(out) works wherever torchvision is installed. A LoRA model is
    written merged (memory.save_merged); weights=False writes no weights at all (a LoRA run's
    periodic checkpoint: its adapters are in `state`, and resuming rebuilds from the base)."""
    out = os.path.normpath(out)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if weights and memory.lora_layers(model):
            memory.save_merged(model, tmp)
        elif weights:
            model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        for name in ("processor_config.json", "tokenizer_config.json"):
            path = os.path.join(tmp, name)
            cfg = json.load(open(path))
            cfg["processor_class"] = "Qwen2_5_VLProcessor"
            if name == "processor_config.json":
                video = dict(cfg["image_processor"], video_processor_type="Qwen2VLVideoProcessor")
                cfg.setdefault("video_processor", video)
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
        raise SystemExit(f"cannot save to {out}: {e.strerror or e} (the previous checkpoint, if "
                         f"any, is intact)")


def _before_rename(tmp):
    """A seam for the test that kills a save between writing and renaming."""


def save_checkpoint(out, step, model, processor, state, keep=2):
    """OUT/checkpoints/step_000123, written atomically; only the `keep` newest are kept."""
    root = os.path.join(out, "checkpoints")
    os.makedirs(root, exist_ok=True)
    save(model, processor, os.path.join(root, f"step_{step:06d}"), dict(state, step=step),
         weights=not memory.lora_layers(model))       # LoRA: the adapters are in the state
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(out):
    """Complete checkpoints under OUT/checkpoints, oldest first (half-written .tmp-* never do)."""
    root = os.path.join(out, "checkpoints")
    names = (sorted(n for n in os.listdir(root) if re.fullmatch(r"step_\d{6}", n))
             if os.path.isdir(root) else [])
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
            f"this checkpoint was written by {len(s['ranks'])} ranks: resume with the same "
            f"--nproc_per_node")
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
    # e.g. a cluster job preempted before its first checkpoint, re-run as it was
    if resume and not found:
        if is_main():
            print(f"--resume: no checkpoint in {os.path.join(out, 'checkpoints')} yet: starting "
                  f"from step 0")
        resume = False
    if not resume:
        if is_main():  # under DDP only rank 0 touches the run directory
            if os.path.exists(metrics) or list_checkpoints(out):
                print(f"{out}: starting afresh (previous metrics and checkpoints removed; --resume "
                      f"continues instead)")
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
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort now)",
              flush=True)


def after_step(script, cfg, step, nonfinite, stop, model, processor, state):
    """The run-safety tail of every training step, shared by sft.py and grpo.py: stop on too many
    non-finite updates in a row, save a periodic (or Ctrl-C) checkpoint, and say how to resume.
    `state` is a function, so the optimizer state is only gathered when a checkpoint is written.
    Returns True when the run should stop here."""
    if nonfinite >= cfg.max_bad_steps:
        raise SystemExit(f"{script}: {nonfinite} non-finite losses or gradients in a row "
                         f"(step {step}); no update was applied for them. Lower --lr, or resume "
                         f"from the last checkpoint with --resume.")
    if (cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps) or stop.requested:
        snapshot = state()                      # on every rank: it gathers each rank's RNG state
        if is_main():
            save_checkpoint(cfg.out, step, model, processor, snapshot, keep=cfg.keep)
        _barrier()
    if stop.requested:
        print(f"stopped at step {step}; continue with the same command plus --resume")
    return stop.requested


# ----------------------------------------------------------------------------- plumbing
def _flag_bool(text):
    """argparse's bool("False") is True; accept the usual spellings instead."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False,
             "no": False}.get(text.lower())
    if value is None:
        raise ValueError(text)   # argparse turns this into "invalid _flag_bool value: 'text'"
    return value


def parse_config(cls, doc="", nargs=None):
    """Expose a config dataclass as command-line flags (max_steps -> --max-steps). Each flag's help
    is the one-line comment written after its field, so the dataclass stays the single source.
    `nargs` maps a field to argparse's nargs (e.g. {"checkpoint": "+"}): that field becomes a
    list."""
    source = "".join(inspect.getsource(c) for c in reversed(cls.__mro__)
                     if dataclasses.is_dataclass(c))  # inherited flags too; a subclass's wins
    comments = dict(re.findall(r"^\s+(\w+):[^=\n]+=[^#\n]+#\s*(.+)$", source, re.M))
    ap = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
    own_first = sorted(dataclasses.fields(cls),
                       key=lambda f: f.name not in vars(cls).get("__annotations__", {}))
    for f in own_first:                  # the script's own flags, then the inherited ones
        flag, is_bool = "--" + f.name.replace("_", "-"), isinstance(f.default, bool)
        ap.add_argument(flag, type=_flag_bool if is_bool else type(f.default), default=f.default,
                        nargs="?" if is_bool else (nargs or {}).get(f.name),
                        const=True if is_bool else None,   # a bare `--resume` means `--resume true`
                        help=f"{comments.get(f.name, '')} (default: {f.default})".replace(
                            "%", "%%"))
    return cls(**vars(ap.parse_args()))
