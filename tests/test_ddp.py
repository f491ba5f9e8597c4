"""sft.py and grpo.py under `torchrun --nproc_per_node=2` on CPU (gloo): both finish, the two
ranks end with the same weights (each script asserts it), and rank 0 alone logs and saves."""
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data
import grpo
import pretrain
import model as M
import run


def torchrun(script, *flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           script, *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_sft_then_grpo_on_two_processes(tmp_path):
    sft_out, grpo_out = tmp_path / "sft", tmp_path / "grpo"
    r = torchrun("sft.py", "--max-steps", "3", "--batch-size", "2", "--train-size", "32",
                 "--eval-every", "0", "--eval-n", "2", "--save-every", "2", "--out", str(sft_out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks agree on the weights" in r.stdout and "rank 1 of 2" in r.stdout
    lines = [json.loads(x) for x in (sft_out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]  # one writer: no duplicated lines
    state = run.load_state(sft_out / "checkpoints" / "step_000002")
    assert len(state["rng"]["ranks"]) == 2  # each rank's RNG, for --resume
    M.load(str(sft_out))

    r = torchrun("grpo.py", "--init", str(sft_out), "--out", str(grpo_out), "--max-steps", "2",
                 "--prompts", "2",
                 "--group-size", "2", "--max-new-tokens", "8", "--mu", "2", "--micro-batch", "2",
                 "--eval-every", "0", "--eval-n", "2", "--show-every", "0", "--save-every", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks agree on the weights" in r.stdout
    assert len((grpo_out / "metrics.jsonl").read_text().splitlines()) == 2
    M.load(str(grpo_out))


def _update_gradient(rank, world, B, G):
    """The gradient of one GRPO update (batch-std advantages, token-mean loss) over this rank's B
    prompts of a fixed rollout of world * B prompts: completions, lengths and rewards are drawn
    once for all of them and sliced, so 1 process x 2B prompts sees exactly 2 x B's rollout."""
    policy, processor = pretrain.build()
    gen = torch.Generator().manual_seed(1)
    n, T = world * B * G, 7
    ids = torch.randint(30, 400, (n, T), generator=gen)                          # plain text tokens
    lengths = torch.randint(1, T + 1, (n,), generator=gen)
    rewards = torch.rand(n, generator=gen) * torch.linspace(0.2, 1.0, n)  # ranks differ in spread
    rows = slice(rank * B * G, (rank + 1) * B * G)
    samples = [data.make_sample("train", i) for i in range(rank * B, (rank + 1) * B)]
    roll = {"prompt": M.build_prompts(processor, [s["image"] for s in samples],
                                      [s["question"] for s in samples]),
            "group_size": G, "completion_ids": ids[rows],
            "completion_mask": (torch.arange(T) < lengths[rows, None]).float(),
            "support": M.text_support(policy, processor.tokenizer)}
    cfg = replace(grpo.GRPOConfig(), beta=0.0, loss_agg="token", adv_norm="batch", micro_batch=3)
    adv = grpo.advantages(rewards[rows], G, cfg.adv_norm)
    net = torch.nn.parallel.DistributedDataParallel(policy) if world > 1 else policy
    grpo.accumulate_gradients(net, roll, adv, None, None, cfg)
    return [p.grad.clone() for p in policy.parameters()]


def _rank(rank, world, init, B, G, out):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        grads = _update_gradient(rank, world, B, G)
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_two_ranks_give_the_gradient_of_one_rank_with_both_batches(tmp_path):
    # the batch std of the advantages and the token count of the loss are taken over all ranks,
    # so the GPU count changes the speed, not the update
    B, G = 2, 3
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), B, G, str(tmp_path / "g.pt")), nprocs=2)
    two = torch.load(tmp_path / "g.pt")
    one = _update_gradient(0, 1, 2 * B, G)
    assert sum(float(g.abs().sum()) for g in one) > 0
    for a, b in zip(two, one):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
