"""Tiny random models of every causal-LM type of the installed transformers, built from each config
class with small sizes (no downloads): the sweep of tests/models/test_every_causal_lm.py."""

from __future__ import annotations

from transformers.models.auto.configuration_auto import CONFIG_MAPPING

VOCAB = 96
LAYERS = 2
# name -> small value, applied to every (sub-)config that has the name
SMALL = {
    "vocab_size": VOCAB, "hidden_size": 32, "d_model": 32, "n_embd": 32, "n_embed": 32, "embed_dim": 32,
    "dim": 32, "embedding_size": 32, "word_embed_proj_dim": 32, "d_embed": 32,
    "num_attention_heads": 2, "n_head": 2, "n_heads": 2, "num_heads": 2, "decoder_attention_heads": 2,
    "encoder_attention_heads": 2, "num_key_value_heads": 1, "n_kv_heads": 1, "head_dim": 16, "kv_channels": 16,
    "intermediate_size": 48, "ffn_dim": 48, "n_inner": 48, "d_ff": 48, "decoder_ffn_dim": 48,
    "encoder_ffn_dim": 48, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 24,
    "expert_intermediate_size": 24, "num_hidden_layers": LAYERS, "n_layer": LAYERS, "num_layers": LAYERS, "n_layers": LAYERS,
    "decoder_layers": LAYERS, "encoder_layers": LAYERS, "num_experts": 4, "n_routed_experts": 4, "num_local_experts": 4,
    "moe_num_experts": 4, "num_experts_per_tok": 2, "moe_topk": 2, "max_position_embeddings": 128,
    "n_positions": 128, "n_ctx": 128, "max_seq_len": 128, "max_sequence_length": 128,
    # multi-head latent attention, partial rotary, grouped routing
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "kv_lora_rank": 16, "q_lora_rank": 16,
    "rotary_dim": 8, "embedding_dim": 32, "emb_dim": 32, "hidden_size_global": 32, "encoder_hash_byte_group_vocab": 500,
    "local_attention_window_len": 64, "sliding_window": 64, "ffn_hidden_size": 48, "expert_ffn_hidden_size": 24,
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8, "linear_head_dim": 16,
    "mamba_d_ssm": 32, "mamba_n_heads": 2, "mamba_d_head": 16, "mamba_chunk_size": 16, "mamba_d_state": 16, "n_mamba_heads": 2, "adapter_rank": 8, "d_state": 16, "state_size": 16, "n_group": 1, "topk_group": 1, "moe_k": 2, "num_experts_per_token": 2, "top_k": 2,
}
# model_type -> extra settings for configs whose shrunk defaults do not build
OVERRIDES: dict[str, dict] = {
    "bamba": {"mamba_n_heads": 4}, "granitemoehybrid": {"mamba_n_heads": 4},
    "deepseek_v2": {"num_experts_per_tok": 2}, "dots1": {"num_experts_per_tok": 2},
    "diffllama": {"num_key_value_heads": 2}, "dots3_note": {"adapter_in_dim": 32},
    "mamba2": {"num_heads": 4, "head_dim": 16, "n_groups": 1}, "nemotron": {"head_dim": 16, "num_key_value_heads": 1},
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [16, 16], "axial_pos_shape": [1, 7],
                 "max_position_embeddings": 7, "attn_layers": ["local", "local"], "local_attn_chunk_length": 8},
    "hunyuan_v1_dense": {"head_dim": 16}, "hunyuan_v1_moe": {"head_dim": 16}, "ministral": {"head_dim": 16},
    "dbrx": {"attn_config": {"kv_n_heads": 1, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1}, "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "dots3_note": {"vision_config": {"adapter_in_dim": 32, "adapter_input_size": 32}}, "gemma3n_text": {"num_kv_shared_layers": 0},
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0}},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "kolibri1_1": {"index_num_heads": 2}, "olmo_hybrid": {"layer_types": ["linear_attention", "full_attention"]},
}



def layer_count(values: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"):
        if isinstance(values.get(key), int):
            return values[key]
    return None


def shrink(values: dict) -> dict:
    """The entries of a config dict to change for a tiny model: SMALL sizes, sub-config dicts the same
    way (with their model_type), per-layer lists cut to the first LAYERS entries and per-layer dicts
    (int keys) to the layers that remain. Values derived from these are left to the config class."""
    out = {}
    layers = layer_count(values)
    for key, value in values.items():
        per_layer = isinstance(value, dict) and value and all(str(k).isdigit() for k in value)
        if isinstance(value, dict) and ("model_type" in value or key.endswith("config")) and not per_layer:
            sub = shrink(value)
            if sub:
                out[key] = dict(sub, **({"model_type": value["model_type"]} if "model_type" in value else {}))
        elif per_layer:
            out[key] = {k: v for k, v in value.items() if int(k) < LAYERS}
        elif isinstance(value, list) and layers and len(value) == layers and layers > LAYERS:
            out[key] = value[:LAYERS]
        elif key in SMALL and isinstance(value, int) and not isinstance(value, bool) and value > SMALL[key]:
            out[key] = SMALL[key]
        elif key.endswith("token_id") and isinstance(value, int) and value >= VOCAB:
            out[key] = 1
    if "qk_rope_head_dim" in out or "qk_rope_head_dim" in values:  # latent attention: one head dim for rope
        out["head_dim"] = SMALL["qk_rope_head_dim"]
        out["num_key_value_heads"] = SMALL["num_attention_heads"]
    return out


def tiny_config(model_type: str, **settings):
    cls = CONFIG_MAPPING[model_type]
    values = shrink(cls().to_dict())
    for key, value in {**OVERRIDES.get(model_type, {}), **settings}.items():
        merge = isinstance(value, dict) and isinstance(values.get(key), dict)
        values[key] = {**values[key], **value} if merge else value
    return cls(**values)
