"""The work of `dpo-fast eval` (eval_command.py is the command, eval_config.py its options): the reference cache opened and
checked against what it can be checked against, the data tokenized as the cache was made, the
model loaded (a LoRA output merged onto its base), and the trainer's evaluation loop."""

from __future__ import annotations

import logging
from pathlib import Path

from .. import distributed, hf
from ..data import PreferenceCollator, TokenizationSettings, load_and_tokenize, tokenizer_fingerprint
from ..prefix_sharing import check_prefix_sharing
from ..refcache import CacheMismatchError, ReferenceCache, compute_fingerprint, diff_fingerprints
from . import evaluation, lora, precision, rankings
from .config import TrainConfig, TrainError
from .eval_config import EvalConfig, resolve
from .policy import PolicyLoss
from ..loss import DPOLoss
from .references import References

logger = logging.getLogger(__name__)


def _check_trusted(cache: ReferenceCache, tokenizer, settings: TokenizationSettings, kind: str) -> None:
    """What a cache can be checked against without its reference model: the tokenizer, the
    tokenization settings and the kind of data. Its weights are trusted (logged)."""
    current = {"tokenizer": tokenizer_fingerprint(tokenizer), "tokenization": settings.as_dict(), "data_kind": kind}
    diffs = diff_fingerprints({k: cache.fingerprint.get(k) for k in current}, current)
    if diffs:
        raise CacheMismatchError(cache.path, diffs)
    made_from = (cache.manifest.get("info") or {}).get("model", "an unrecorded model")
    logger.info("reference log-probs from %s, made from %s: its weights are trusted (pass --ref-model to check "
                "them)", cache.path, made_from)


def _check_against(cache: ReferenceCache, ref_model, tokenizer, settings, kind: str, device) -> None:
    """The cache's whole fingerprint against the reference model the user names."""
    module = hf.load_causal_lm(ref_model, device=device, check_head=False)  # its weights are hashed, never run
    local = Path(str(ref_model)) if Path(str(ref_model)).is_dir() else None
    expected = compute_fingerprint(module, tokenizer, **settings.arguments(), dtype="float32", data_kind=kind,
                                   model_path=local)
    del module
    diffs = diff_fingerprints(cache.fingerprint, expected, ignore=("dtype",))
    if diffs:
        raise CacheMismatchError(cache.path, diffs)
    logger.info("reference log-probs from %s, checked against --ref-model %s", cache.path, ref_model)


def _check_covers(cache: ReferenceCache, tokenized, cfg: EvalConfig) -> None:
    missing = set(cache.missing(tokenized["example_id"]))
    if not missing:
        return
    found = [(r, e) for r, e in zip(tokenized["row_index"], tokenized["example_id"]) if e in missing]
    rows = ", ".join(str(r) for r, _ in found[:10]) + (", ..." if len(found) > 10 else "")
    raise TrainError(f"--ref-cache {cache.path} has no reference log-probs for {len(found)} of {len(tokenized)} "
                     f"example(s) of --data {cfg.data} (rows {rows}; e.g. id {found[0][1]}): it was made from other "
                     "data. Run dpo-fast precompute-ref on this data, or evaluate on the data the cache holds")


def _references(cfg: EvalConfig, tcfg: TrainConfig, cache, tokenizer, settings, kind, tokenized, device):
    if cfg.reference_free:
        return References()
    if cache is not None:
        if cfg.ref_model is not None:
            _check_against(cache, cfg.ref_model, tokenizer, settings, kind, device)
        else:
            _check_trusted(cache, tokenizer, settings, kind)
        _check_covers(cache, tokenized, cfg)
        return References(cache=cache)
    ref = hf.load_causal_lm(cfg.ref_model, device=device, attn=cfg.attn_implementation,
                            check_head=not cfg.skip_head_check).eval()
    ref.requires_grad_(False)
    hf.disable_dropout(ref)
    if cfg.prefix_sharing:
        check_prefix_sharing(ref)
    return References(head=hf.lm_head_parts(ref), compute_dtype=precision.compute_dtype(tcfg, device),
                      backend=cfg.backend, ranked=kind == "ranked")


def _load_model(cfg: EvalConfig, device):
    if lora.is_adapter_dir(cfg.model):
        model = lora.load_merged_for_eval(cfg.model, device, cfg.attn_implementation,
                                          check_head=not cfg.skip_head_check)
    else:
        model = hf.load_causal_lm(cfg.model, device=device, attn=cfg.attn_implementation,
                                  check_head=not cfg.skip_head_check)
    hf.disable_dropout(model)
    return model


def run_evaluation(cfg: EvalConfig) -> dict | None:
    device = hf.resolve_device(cfg.device)
    cache = ReferenceCache.open(cfg.ref_cache) if cfg.ref_cache is not None else None
    cache_settings = None if cache is None else \
        TokenizationSettings.from_dict(cache.fingerprint["tokenization"]).arguments()
    tcfg = resolve(cfg, cache_settings)
    dist = distributed.setup(device)
    tokenizer = hf.load_tokenizer(cfg.tokenizer if cfg.tokenizer is not None else cfg.model)
    settings = TokenizationSettings(tcfg.max_length, tcfg.max_prompt_length, tcfg.truncation_side,
                                    tcfg.max_completion_length)
    try:
        tokenized, report, fmt = load_and_tokenize(cfg.data, tokenizer, split=cfg.split, **settings.arguments())
    except ValueError as e:
        if type(e) is not ValueError:
            raise
        raise TrainError(f"--data {cfg.data}: {e}") from None
    if len(tokenized) == 0:
        raise TrainError(f"--data {cfg.data}: no usable examples ({report})")
    kind = "ranked" if fmt == "ranked" else "paired"
    responses = None
    if kind == "ranked":
        rankings.check_settings(tcfg)
        responses = rankings.responses_per_example(tokenized, "--data")
    refs = _references(cfg, tcfg, cache, tokenizer, settings, kind, tokenized, device)
    model = _load_model(cfg, device)
    compute_dtype = precision.compute_dtype(tcfg, device)
    loss = DPOLoss(tcfg.loss_settings().replace(logits_memory_mb=None))  # the O(tokens) path: no gradients here
    policy = PolicyLoss(model, loss, compute_dtype, ranked=kind == "ranked")
    packing = cfg.packing if cfg.packing is not None else \
        hf.attn_implementation(model.config, device, cfg.attn_implementation) == "flash_attention_2"
    if cfg.prefix_sharing:
        check_prefix_sharing(model)
    collator = PreferenceCollator(tokenizer.pad_token_id, packing=packing, prefix_sharing=cfg.prefix_sharing)
    metrics = evaluation.evaluate(policy, model, tokenized, refs, collator, batch_size=cfg.batch_size, dist=dist,
                                  device=device, vocab_size=policy.head.vocab_size, num_responses=responses)
    if not dist.main:
        return None
    return {"model": str(cfg.model), "data": str(cfg.data), "split": cfg.split,
            "reference": {"ref_cache": cfg.ref_cache, "ref_model": cfg.ref_model, "reference_free": cfg.reference_free,
                          "cache_weights_checked": cache is not None and cfg.ref_model is not None},
            "settings": {k: getattr(tcfg, k) for k in ("beta", "loss_type", "loss_weights", "label_smoothing",
                                                       "sft_weight", *settings.arguments())},
            "tokenization": str(report), "metrics": metrics}
