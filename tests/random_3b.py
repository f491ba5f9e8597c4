"""Writes a random-init checkpoint with Qwen2.5-VL-3B-Instruct's architecture (the values of its
config.json: 3.75B parameters, 0.67B of them vision) and the tiny processor at Qwen's 224-px frame,
with save_pretrained. The README's GPU memory table was measured on it, through the unchanged
`sft.py --model DIR` and `grpo.py --init DIR` (no Hub access needed):

    python tests/random_3b.py /tmp/q3b          # ~7.5 GB on disk in bf16; builds on CUDA if present
    python tests/random_3b.py /tmp/q3s --small  # the same shapes' wiring at toy widths (for tests)
"""
import argparse
import os
import sys

import torch
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import model as M  # noqa: E402


def build(out, small=False):
    _, proc = M.build_tiny()
    text_ids, vision_ids = M.token_ids(proc.tokenizer)
    H, I, V, VI, heads, vocab, mrope = ((64, 128, 64, 128, 4, 2000, [2, 3, 3]) if small else
                                        (2048, 11008, 1280, 3420, 16, 151936, [16, 24, 24]))
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=H, intermediate_size=I, num_hidden_layers=2 if small else 36,
                         num_attention_heads=heads, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                         max_position_embeddings=128000, hidden_act="silu", tie_word_embeddings=True,
                         rope_scaling={"type": "mrope", "mrope_section": mrope}, **text_ids),
        vision_config=dict(depth=2 if small else 32, hidden_size=V, intermediate_size=VI, num_heads=heads,
                           out_hidden_size=H, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu"),
        **vision_ids, tie_word_embeddings=True)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)          # 7.5 GB instead of 15 GB, built where it will run
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2_5_VLForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    model.generation_config = GenerationConfig(**text_ids)
    proc.image_processor.size = {"shortest_edge": 224 * 224, "longest_edge": 224 * 224}   # Qwen's 224-px frame
    model.save_pretrained(out)
    proc.save_pretrained(out)
    n, nv = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.model.visual.parameters())
    print(f"{out}: {n:,} parameters ({nv:,} vision), frame {M.image_frame(proc, 224)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="directory to write the checkpoint into")
    ap.add_argument("--small", action="store_true", help="toy widths and 2 layers: the wiring only")
    a = ap.parse_args()
    build(a.out, a.small)
