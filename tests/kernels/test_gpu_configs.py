"""The Triton dispatcher's tile configs and the GPU compile audit's arithmetic (no GPU needed).

The audit itself (scripts/check_gpu_compile.py, run by .ci/run) compiles every config for real
targets; here: every (GPU, dtype) gets a config that exists, the autotune candidates are pruned
per target, and the occupancy / ptxas-log readers the audit's verdicts rest on are right."""

import importlib.util
import pathlib
import sys

import pytest
import torch

triton_linear = pytest.importorskip("dpo_fast.kernels.triton_linear")

ROOT = pathlib.Path(__file__).resolve().parents[2]
CAPABILITIES = [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def audit():
    spec = importlib.util.spec_from_file_location("check_gpu_compile", ROOT / "scripts" / "check_gpu_compile.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_gpu_and_dtype_has_a_config(capability, dtype):
    for kernel in triton_linear.KERNELS:
        cfg = triton_linear.config_for(kernel, dtype, capability)
        assert isinstance(cfg, triton_linear.TileConfig)
        # Powers of two, tl.dot's minimum of 16, and a warp count Triton accepts.
        for block in (cfg.block_n, cfg.block_v, cfg.block_h):
            assert block >= 16 and block & (block - 1) == 0
        assert cfg.num_warps in (1, 2, 4, 8, 16) and cfg.num_stages >= 1


def test_autotune_candidates_are_pruned_per_target(monkeypatch):
    full = triton_linear.autotune_configs(torch.bfloat16, (9, 0), pruned=False)
    assert full == list(triton_linear.AUTOTUNE_CONFIGS)
    dropped = full[0]
    monkeypatch.setitem(triton_linear._AUTOTUNE_PRUNED, ("sm80", 2), frozenset({dropped}))
    assert dropped not in triton_linear.autotune_configs(torch.bfloat16, (8, 0))
    assert dropped in triton_linear.autotune_configs(torch.float16, (9, 0))  # other GPU class: kept
    assert dropped in triton_linear.autotune_configs(torch.float32, (8, 0))  # other operand size: kept


def test_kernel_constants_follow_the_dtype():
    c = triton_linear.kernel_constants(torch.bfloat16, True, False, on_gpu=True, tf32=True)
    assert (c["UPCAST"], c["PREC"], c["HAS_BIAS"], c["HAS_SOFTCAP"]) == (False, "ieee", True, False)
    assert triton_linear.kernel_constants(torch.float32, False, False, on_gpu=True, tf32=True)["PREC"] == "tf32"
    assert triton_linear.kernel_constants(torch.bfloat16, False, False, on_gpu=False, tf32=False)["UPCAST"]


def test_occupancy_from_target_limits():
    a = audit()
    h100 = a.TARGETS[90]
    # 255 registers round to 256 per thread: 8 warps' worth of the 64K register file.
    assert a.occupancy(h100, 255, 0, 8) == (1, "registers")
    assert a.occupancy(h100, 128, 0, 8) == (2, "registers")
    # 100 KB of shared memory per block: two fit in 228 KB, with 1 KB reserved per block.
    assert a.occupancy(h100, 64, 100 * 1024, 4) == (2, "shared memory")
    assert a.occupancy(a.TARGETS[86], 32, 0, 1) == (16, "blocks")
    # A shipped config below 2 blocks and 8 warps per SM fails on a gated target.
    r = {"registers": 255, "spill_bytes": 0, "shared_bytes": 0, "blocks": 1, "limiter": "registers"}
    assert a.verdict(h100, r, 4, shipped=True)[0] == "FAIL"
    assert a.verdict(h100, r, 8, shipped=True)[0] == "ok"
    assert a.verdict(h100, {**r, "spill_bytes": 8}, 8, shipped=True)[0] == "FAIL"
    assert a.verdict(h100, {**r, "spill_bytes": 8}, 8, shipped=False)[0] == "ok"  # the tuner times it
    assert a.verdict(h100, {**r, "shared_bytes": 240000}, 8, shipped=False)[0] == "pruned"


def test_ptxas_log_is_read_per_kernel():
    a = audit()
    log = """ptxas info    : Compiling entry function '_ZN8dpo_fast4cuda17token_grad_kernelIfLi32ELi256EEEvNS0_15TokenGradParamsE' for 'sm_80'
ptxas info    : Function properties for _ZN8dpo_fast4cuda17token_grad_kernelIfLi32ELi256EEEvNS0_15TokenGradParamsE
    16 bytes stack frame, 24 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]
"""
    (row,) = a._parse_ptxas(log, "token_ops.cu", 80, 1.0)
    assert row["kernel"].startswith("token_grad_kernel")
    assert (row["registers"], row["spill_bytes"], row["shared_bytes"], row["threads"]) == (64, 24, 2048, 256)
