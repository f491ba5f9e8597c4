"""A hub-format lookalike of Qwen/Qwen2.5-VL-3B-Instruct (or -7B-Instruct), written without the
hub: the files a user downloads, in their real layout, with the real token ids and settings; only
the weights are random and, for the tests, the widths toy-sized.

  config.json             the flat legacy layout: text fields at the top, `rope_scaling` mrope,
                          vision_config nested, vocab_size 151,936
  model.safetensors       legacy weight names (model.layers.*, visual.*), as the hub's files
  tokenizer.json          151,665 entries: Qwen2.5's 22 special tokens at their real ids
                          151,643-151,664, so the embedding has 271 rows no token decodes to
  tokenizer_config.json   eos <|im_end|>, pad <|endoftext|> (also an end token), no bos
  chat_template.json      Qwen2.5-VL's template (a default system prompt, vision placeholders)
  generation_config.json  the real one: repetition_penalty 1.05, top_k 1, top_p 0.001
  preprocessor_config.json  min_pixels 3,136, max_pixels 12,845,056 (a 112-px film stays 112)

    python tests/qwen_lookalike.py /tmp/q3s             # toy widths: what the tests load (~40 MB)
    python tests/qwen_lookalike.py /tmp/q3b --size 3b   # the real 3B shapes, random (~7.5 GB)

The tail rows of the (tied) embedding are scaled up, so that a sampler which does not exclude
them draws them, as one loaded from real Qwen2.5 weights sometimes does.
"""
import argparse
import json
import os
import sys

import torch
from transformers import AutoConfig, GenerationConfig, Qwen2_5_VLForConditionalGeneration

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import model as M  # noqa: E402
import pretrain  # noqa: E402

VOCAB, N_TOKENS = 151_936, 151_665          # embedding rows; tokenizer entries
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
           "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
           "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
           "</tool_call>",
           "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
           "<|file_sep|>"]
ID = {t: N_TOKENS - len(SPECIAL) + i for i, t in enumerate(SPECIAL)}  # <|endoftext|> = 151643
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|fim_pad|>", "<|repo_name|>",
               "<|file_sep|>"}  # added tokens Qwen marks special: false
# text: hidden, intermediate, layers, heads, kv heads; vision: hidden, intermediate, depth
SHAPES = {
    "toy": dict(text=(64, 128, 2, 4, 2), vision=(64, 128, 2, 4), mrope=[2, 3, 3], full=[1],
                tie=True),
    "3b": dict(text=(2048, 11008, 36, 16, 2), vision=(1280, 3420, 32, 16), mrope=[16, 24, 24],
               full=[7, 15, 23, 31], tie=True),
    "7b": dict(text=(3584, 18944, 28, 28, 4), vision=(1280, 3420, 32, 16), mrope=[16, 24, 24],
               full=[7, 15, 23, 31], tie=False),
}
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' "
    "%}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ "
    "message['role'] }}\n{% if message['content'] is string %}{{ message['content'] "
    "}}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ "
    "image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif "
    "%}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] "
    "}}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt "
    "%}<|im_start|>assistant\n{% endif %}")


def config_json(size):
    """config.json as the hub ships it for Qwen2.5-VL-3B/7B-Instruct (flat, legacy rope_scaling)."""
    s = SHAPES[size]
    (h, inter, layers, heads, kv), (vh, vinter, depth, vheads) = s["text"], s["vision"]
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
            "bos_token_id": ID["<|endoftext|>"], "eos_token_id": ID["<|im_end|>"],
            "vision_start_token_id": ID["<|vision_start|>"],
            "vision_end_token_id": ID["<|vision_end|>"],
            "vision_token_id": ID["<|vision_pad|>"], "image_token_id": ID["<|image_pad|>"],
            "video_token_id": ID["<|video_pad|>"], "hidden_act": "silu", "hidden_size": h,
            "initializer_range": 0.02, "intermediate_size": inter,
            "max_position_embeddings": 128000,
            "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": heads,
            "num_hidden_layers": layers, "num_key_value_heads": kv, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": s["tie"],
            "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
            "use_sliding_window": False,
            "vision_config": {"depth": depth, "hidden_act": "silu", "hidden_size": vh,
                              "intermediate_size": vinter,
                              "num_heads": vheads, "in_chans": 3, "out_hidden_size": h,
                              "patch_size": 14,
                              "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                              "fullatt_block_indexes": s["full"], "tokens_per_second": 2,
                              "temporal_patch_size": 2},
            "rope_scaling": {"type": "mrope", "mrope_section": s["mrope"]}, "vocab_size": VOCAB}


def tokenizer_json():
    """Qwen2.5's tokenizer layout on the tiny model's byte-level BPE: its merges and regular tokens,
    filler tokens (decodable, never produced by a merge) up to id 151,642, then the 22 special
    tokens at their real ids. Digits are split one per token, as Qwen's pre-tokenizer does."""
    tiny = json.loads(pretrain.build_tokenizer().backend_tokenizer.to_str())
    ours = {t["content"] for t in tiny["added_tokens"]}
    regular = [t for t, _ in sorted(tiny["model"]["vocab"].items(), key=lambda kv: kv[1])
               if t not in ours]
    vocab = {t: i for i, t in enumerate(regular)}
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(vocab) < ID["<|endoftext|>"]:
        word, k = "", i
        for _ in range(4):
            word, k = word + letters[k % 26], k // 26
        vocab.setdefault("~" + word, len(vocab))
        i += 1
    tiny["model"]["vocab"] = vocab
    tiny["added_tokens"] = [{"id": ID[t], "content": t, "single_word": False, "lstrip": False,
                             "rstrip": False,
                             "normalized": False, "special": t not in NOT_SPECIAL} for t in SPECIAL]
    return tiny


def write_tokenizer(out):
    json.dump(tokenizer_json(), open(os.path.join(out, "tokenizer.json"), "w"))
    decoder = {str(ID[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": t not in NOT_SPECIAL} for t in SPECIAL}
    json.dump({"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
               "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                                             "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                                             "<|quad_start|>",
                                             "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                                             "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"],
               "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
               "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
               "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
               "unk_token": None},
              open(os.path.join(out, "tokenizer_config.json"), "w"), indent=2)
    json.dump({"chat_template": CHAT_TEMPLATE}, open(os.path.join(out, "chat_template.json"), "w"))
    json.dump({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
               "temporal_patch_size": 2,
               "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
               "image_std": [0.26862954, 0.26130258, 0.27577711],
               "image_processor_type": "Qwen2VLImageProcessor",
               "processor_class": "Qwen2_5_VLProcessor"},
              open(os.path.join(out, "preprocessor_config.json"), "w"), indent=2)


def generation_config():
    """Qwen2.5-VL-Instruct's generation_config.json (what generate() would apply unasked)."""
    return GenerationConfig(bos_token_id=ID["<|endoftext|>"], pad_token_id=ID["<|endoftext|>"],
                            do_sample=True,
                            eos_token_id=[ID["<|im_end|>"], ID["<|endoftext|>"]],
                            repetition_penalty=1.05, temperature=0.1, top_p=0.001, top_k=1)


def build_model(size="toy", device="cpu", dtype=torch.float32, tail_scale=20.0, seed=0):
    """The lookalike's model in memory, random-init, from the hub-format config."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        json.dump(config_json(size), open(os.path.join(tmp, "config.json"), "w"))
        config = AutoConfig.from_pretrained(tmp)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built where it will run, in its dtype (7B: 15 GB in bf16)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():  # give the 271 ids past the tokenizer real probability
        model.get_output_embeddings().weight[N_TOKENS:] *= tail_scale
    model.generation_config = generation_config()
    return model


def build(out, size="toy", tail_scale=20.0):
    """Write the lookalike checkpoint into `out`."""
    os.makedirs(out, exist_ok=True)
    model = build_model(size, "cuda" if size != "toy" and torch.cuda.is_available() else "cpu",
                        torch.float32 if size == "toy" else torch.bfloat16, tail_scale)
    model.save_pretrained(out)                   # legacy weight names, as on the hub
    # the hub's layout
    json.dump(config_json(size), open(os.path.join(out, "config.json"), "w"), indent=2)
    write_tokenizer(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: Qwen2.5-VL-{size} lookalike, {n:,} parameters, vocabulary {VOCAB:,} rows / "
          f"{N_TOKENS:,} tokens")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="directory to write the checkpoint into")
    ap.add_argument("--size", default="toy", choices=list(SHAPES),
                    help="toy widths, or the real 3B / 7B shapes")
    a = ap.parse_args()
    build(a.out, a.size)
