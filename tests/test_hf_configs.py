"""The released checkpoints' config.json files map onto the r1jax presets (values copied from the
public model cards' config.json; no download)."""

import pytest

from conftest import CONFIGS
from r1jax.config import ConfigError, load_config
from r1jax.convert import hf_config_from_model, model_config_from_hf

YARN_V3 = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
           "original_max_position_embeddings": 4096, "type": "yarn"}
RELEASED = {
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "first_k_dense_replace": 3,
        "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
        "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06, "rope_scaling": YARN_V3, "rope_theta": 10000, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280},
    "deepseek_v2_lite": {
        "first_k_dense_replace": 1, "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
        "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
        "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
        "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": dict(YARN_V3, mscale=0.707, mscale_all_dim=0.707), "rope_theta": 10000,
        "routed_scaling_factor": 1.0, "scoring_func": "softmax", "tie_word_embeddings": False, "topk_group": 1,
        "topk_method": "greedy", "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 102400},
    "qwen2.5-1.5b": {
        "hidden_size": 1536, "intermediate_size": 8960, "max_position_embeddings": 32768, "model_type": "qwen2",
        "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_sliding_window": False, "vocab_size": 151936},
    "llama3.1-8b": {
        "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
        "attention_bias": False, "mlp_bias": False, "head_dim": 128},
}


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_released_config_maps_to_preset(preset):
    ours = load_config(CONFIGS / "models" / f"{preset}.yaml").model
    # the released bfloat16 weights; the presets train them as float32 master params, bfloat16 compute
    assert model_config_from_hf(RELEASED[preset]).param_dtype == "bfloat16"
    assert (ours.param_dtype, ours.dtype) == ("float32", "bfloat16")
    assert model_config_from_hf(RELEASED[preset], param_dtype="float32", dtype="bfloat16") == ours
    # and our exported config.json maps back to the same model
    assert model_config_from_hf(hf_config_from_model(ours), dtype="bfloat16") == ours


def test_unsupported_hf_configs_fail_clearly():
    with pytest.raises(ConfigError, match="model_type 'mixtral' is not supported"):
        model_config_from_hf({"model_type": "mixtral"})
    with pytest.raises(ConfigError, match="moe_layer_freq=2 is not supported"):
        model_config_from_hf(dict(RELEASED["deepseek_v3"], moe_layer_freq=2))
    with pytest.raises(ConfigError, match="use_sliding_window=true is not supported"):
        model_config_from_hf(dict(RELEASED["qwen2.5-1.5b"], use_sliding_window=True))
