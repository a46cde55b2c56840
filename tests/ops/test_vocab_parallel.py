"""The vocab-parallel fused loss (weight split by vocabulary rows over gloo ranks on CPU) against
the single-process op on the full weight: loss, log-probs, dH, each rank's dW and bias rows; the
inputs it refuses, on every rank; the bytes it communicates and the largest buffer it allocates.

The ranks run in one subprocess per world size (tests/tp_worker.py: every case, results saved
to files); the tests here compute the single-process values themselves and compare.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from helpers_tiny import run_in_session
from tp_worker import CASES, MEMORY_CHUNK_ELEMENTS, call, hf_loss, make_case

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parents[1] / "tp_worker.py"
# float32: the ranks sum dH over the vocabulary in another order than one process does.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-6, atol=2e-6)}


def assert_close(got, want, dtype):
    """To the rounding of `dtype`. bfloat16 GEMMs round each vocabulary chunk's product to 8
    mantissa bits, and the chunks differ between one process and the shards: one unit in the
    last place of the tensor's scale, absolute, where terms cancel."""
    if dtype == torch.bfloat16:
        tol = dict(rtol=1.6e-2, atol=2.0 ** -8 * want.abs().max().item())
    else:
        tol = TOL[dtype]
    torch.testing.assert_close(got, want.to(got.dtype), **tol)


def _launch(world: int, out: Path, timeout: float = 300) -> None:
    """The ranks in their own session, so a timeout also ends every spawned rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = run_in_session([sys.executable, str(WORKER), str(world), str(out)], env, timeout)
    if res.returncode != 0:
        pytest.fail(f"{world} ranks failed (exit {res.returncode}):\n{res.stderr[-4000:]}")


_RUNS: dict[int, list[dict]] = {}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """ranks(world) -> one result dict per rank (the run happens once per world size)."""
    def get(world: int) -> list[dict]:
        if world not in _RUNS:
            out = tmp_path_factory.mktemp(f"tp{world}")
            _launch(world, out)
            _RUNS[world] = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
        return _RUNS[world]
    return get


def _params(kinds):
    return [pytest.param(world, name, opts, id=f"{world}ranks-{name}")
            for name, worlds, kind, opts in CASES if kind in kinds for world in worlds]


def _single_process(kind: str, case: dict) -> dict:
    """The same call on the full weight in this process."""
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in (case["hidden"], case["weight"],
                                                                                case["bias"])]
    loss, lp, mean_logits = call(kind, case, *leaves)
    loss.backward()
    return dict(loss=loss.detach(), logps=lp.detach(), mean_logits=mean_logits, hidden_grad=leaves[0].grad,
                weight_grad=leaves[1].grad, bias_grad=None if leaves[2] is None else leaves[2].grad)


def _result(results: list[dict], name: str) -> list[dict]:
    for r in results:
        assert "crash" not in r[name], r[name].get("crash")
    return [r[name] for r in results]


@pytest.mark.parametrize("world,name,opts", _params(("loss", "logprobs")))
def test_matches_single_process(ranks, world, name, opts):
    kind = next(k for n, _, k, _ in CASES if n == name)
    case = make_case(opts)
    per_rank = _result(ranks(world), name)
    want = _single_process(kind, case)
    dtype = case["hidden"].dtype
    V = case["weight"].shape[0]
    labels = case["labels"][case["labels"] >= 0]
    covered = torch.zeros(V, dtype=torch.bool)
    for rank, got in enumerate(per_rank):
        assert_close(got["loss"], want["loss"], dtype)
        assert_close(got["logps"], want["logps"], dtype)
        assert_close(got["hidden_grad"], want["hidden_grad"], dtype)
        if kind == "loss":  # the logit sums, merged across ranks like the log-sum-exp
            assert_close(got["mean_logits"], want["mean_logits"], torch.float32 if dtype == torch.float64 else dtype)
        rows = got["weight_grad"].shape[0]
        a = got["start"]
        assert rows == 0 or ((labels >= a) & (labels < a + rows)).any(), f"rank {rank} scores no target of its own"
        covered[a:a + rows] = True
        assert_close(got["weight_grad"], want["weight_grad"][a:a + rows], dtype)
        if case["bias"] is not None:
            assert_close(got["bias_grad"], want["bias_grad"][a:a + rows], dtype)
        if not opts.get("explicit"):  # a DTensor weight gets a DTensor gradient of the same layout
            assert got["grad_placements"] == ("(Replicate(), Shard(dim=0))" if opts.get("mesh_2d")
                                              else "(Shard(dim=0),)")
        # The values every rank derives from the merged statistics are the same bits everywhere.
        for key in ("loss", "logps", "hidden_grad"):
            assert torch.equal(got[key], per_rank[0][key]), f"{key} differs between rank 0 and rank {rank}"
    assert covered.all()
    if not opts.get("packed"):
        assert per_rank[0]["logps"][1] == 0  # the sequence with every token ignored


def test_reference_pass_without_grad(ranks):
    got = _result(ranks(2), "reference_pass_no_grad")
    case = make_case(dict(V=29, cap=3.0))
    with torch.no_grad():
        want = call("loss", case, case["hidden"], case["weight"], None)[1]
    for r in got:
        assert r["requires_grad"] is False
        assert_close(r["logps"], want, torch.float64)


def test_hf_tp_plan_auto_matches_one_process(ranks):
    """transformers' tp_plan="auto" on a tiny Llama (2 ranks): lm_head.weight is a DTensor
    Shard(0) (31 + 30 rows), the final hidden states a plain tensor equal on both ranks, and the
    vocab-parallel loss on them gives the single-process loss and every parameter's gradient
    (the model's own TP all-reduces round differently: float32 rounding through 2 layers)."""
    from transformers import AutoModelForCausalLM
    per_rank = _result(ranks(2), "hf_tp_plan")
    assert [r["weight_placements"] for r in per_rank] == ["(Shard(dim=0),)"] * 2
    assert [r["local_rows"] for r in per_rank] == [31, 30]
    assert not per_rank[0]["hidden_is_dtensor"] and torch.equal(per_rank[0]["hidden"], per_rank[1]["hidden"])
    model = AutoModelForCausalLM.from_pretrained(per_rank[0]["path"], dtype=torch.float32)
    _, out = hf_loss(model)
    out.loss.backward()
    torch.testing.assert_close(per_rank[0]["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
    got = per_rank[0]["grads"]
    for n, p in model.named_parameters():
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{n}: {m}")


BAD = {
    "bad_shard_dim": "sharded on dim 1",
    "bad_mesh_2d": "say which one is tensor-parallel",
    "bad_hidden_shape": "hidden has different shapes across the tensor-parallel group",
    "bad_label": "labels: scored label(s) outside [0, 29)",
    "bad_labels_one_rank": "labels (or sequence_ids / num_sequences) differ across",
    "bad_dtype_one_rank": "rank 1 of the tensor-parallel group: labels must be int64 or int32",
    "bad_tiling": "the weight shards do not tile the vocabulary",
    "bad_grad_one_rank": "hidden requires grad on some ranks and not on others",
}


@pytest.mark.parametrize("world,name,opts", _params(("bad",)))
def test_bad_input_raises_on_every_rank(ranks, world, name, opts):
    """Every rank raises the same clear error, and then still completes a good call with the
    others (the worker runs one after each case: a rank left behind would hang it)."""
    per_rank = _result(ranks(world), name)
    errors = [r["error"] for r in per_rank]
    assert all(e is not None for e in errors), errors
    assert errors[0][0] == "ValueError" and BAD[name] in errors[0][1], errors[0]
    assert all(e == errors[0] for e in errors), errors


def test_no_full_size_buffer_and_bytes_communicated(ranks):
    """V = 32767, H = 64, 2 ranks, 132 tokens: the largest buffer any op allocates during forward
    + backward is the rank's own dW rows (half the weight, a quarter of the logits here), and each
    rank hands the collectives exactly the planned bytes: the agreement row, 3 floats per scored
    token in the forward, the scored rows' dH in the backward."""
    opts = next(o for n, _, _, o in CASES if n == "memory")
    case = make_case(opts)
    V, H = case["weight"].shape
    tokens = case["hidden"].shape[0] * case["hidden"].shape[1]
    M = int((case["labels"][:, 1:] >= 0).sum())  # the shift: position t scores label t + 1
    full_weight, full_logits = V * H * 4, tokens * V * 4
    from dpo_fast.tensor_parallel import _FIELDS
    for r in _result(ranks(2), "memory"):
        local_rows = -(-V // 2) if r["start"] == 0 else V // 2
        assert r["largest"] <= max(local_rows * H, MEMORY_CHUNK_ELEMENTS) * 4, r
        assert r["largest"] < full_weight and r["largest"] < full_logits / 3, r
        assert r["sent"] == 8 * len(_FIELDS) + 3 * 4 * M + 4 * M * H, r
