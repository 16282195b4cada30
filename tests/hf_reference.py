"""Tiny HF transformers models: the outside numerical reference for r1jax.

Used by scripts/make_golden.py (which writes tests/golden/) and by the live parity tests. Imports
torch/transformers lazily: nothing here is needed when only the golden outputs are checked.
"""

from __future__ import annotations

import numpy as np

_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0,
         "beta_slow": 1.0, "rope_theta": 10000.0}
_MLA = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=12,
            qk_nope_head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-6)

# Each config exercises what the issue asks of the reference comparison:
TINY: dict[str, dict] = {
    # group-limited sigmoid routing (4 groups, top-2), shared expert, first dense layer, q_lora, YaRN
    "deepseek_v3": dict(_MLA, model_type="deepseek_v3", q_lora_rank=24, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                        norm_topk_prob=True, routed_scaling_factor=2.5,
                        rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=1.0), tie_word_embeddings=False),
    # full query projection (q_lora unset), softmax greedy routing, 2 shared experts, V2-Lite YaRN
    "deepseek_v2_lite": dict(_MLA, model_type="deepseek_v2", q_lora_rank=None, n_routed_experts=8,
                             n_shared_experts=2, num_experts_per_tok=2, topk_method="greedy", n_group=None,
                             topk_group=None, first_k_dense_replace=1, norm_topk_prob=False,
                             routed_scaling_factor=1.0,
                             rope_parameters=dict(_YARN, mscale=0.707, mscale_all_dim=0.707), tie_word_embeddings=False),
    # DeepSeek-V2 (full) routing: softmax, group_limited_greedy (max per group), q_lora set
    "deepseek_v2_grouped": dict(_MLA, model_type="deepseek_v2", q_lora_rank=24, n_routed_experts=8,
                                n_shared_experts=1, num_experts_per_tok=3, topk_method="group_limited_greedy",
                                n_group=4, topk_group=2, first_k_dense_replace=2, norm_topk_prob=False,
                                routed_scaling_factor=16.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                tie_word_embeddings=False),
    # Qwen2.5-1.5B shape family: GQA 4/2, qkv bias, tied embeddings
    "qwen2_tied": dict(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rope_parameters={"rope_type": "default",
                       "rope_theta": 1000000.0}, tie_word_embeddings=True, max_position_embeddings=128,
                       rms_norm_eps=1e-6, use_sliding_window=False),
    # Qwen2.5-7B shape family: untied embeddings
    "qwen2_untied": dict(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, rope_parameters={"rope_type": "default",
                         "rope_theta": 1000000.0}, tie_word_embeddings=False, max_position_embeddings=128,
                         rms_norm_eps=1e-6, use_sliding_window=False),
    # Llama 3.1: GQA 4/2, llama3 rope scaling, untied
    "llama3": dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128,
                   rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                    "rope_theta": 500000.0}, tie_word_embeddings=False),
}

LENGTHS = (16, 11, 5)  # a batch of varied-length sequences, right-padded to 16


def sample_batch(vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids [3, 16] int32, attention_mask [3, 16] int32), padding with id 0."""
    rng = np.random.default_rng(seed)
    s = max(LENGTHS)
    ids = rng.integers(1, vocab, size=(len(LENGTHS), s)).astype(np.int32)
    mask = (np.arange(s)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int32)
    return ids * mask, mask


def available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def build_hf_model(name: str, seed: int = 0):
    """A transformers model of TINY[name] with random weights (norms around 1, router bias random)."""
    import torch
    import transformers

    cfg = dict(TINY[name])
    mt = cfg.pop("model_type")
    cls = {"deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
           "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[mt]
    config = cls[0](**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls[1](config).to(torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight") or "layernorm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))  # exercises selection-only bias
    return model


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(input_ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(attention_mask.astype(np.int64)))
    return out.logits.float().numpy()


def load_hf_model(path):
    """A checkpoint directory loaded by transformers itself (float32, eager attention)."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def hf_logits_from_dir(path, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Logits of a checkpoint directory loaded by transformers itself (float32, eager attention)."""
    return hf_logits(load_hf_model(path), input_ids, attention_mask)


GEN_LENGTHS = (9, 4, 6)  # prompt lengths of the greedy-generation comparison
GEN_NEW = 12  # new tokens per prompt
MIN_MARGIN = 1e-3  # top-1 minus top-2 logit along the greedy path: 10x the logits tolerance


def sample_prompts(vocab: int, seed: int) -> list[list[int]]:
    """Prompts of GEN_LENGTHS tokens drawn from ids 1..vocab-1."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in GEN_LENGTHS]


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, return_margins: bool = False):
    """The new tokens of HF `generate` (greedy, no eos: every prompt runs to max_new_tokens).

    Each prompt is generated alone (batch 1), so HF's own padding conventions play no part.
    With return_margins, also the gap between the largest and second-largest logit at each step
    (a near-zero gap is a numerical tie that float32 noise may break either way).
    """
    import torch
    import transformers

    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None,
                                        pad_token_id=0, bos_token_id=None, return_dict_in_generate=True,
                                        output_logits=True)
    tokens, margins = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([list(p)], dtype=torch.int64)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            tokens.append([int(x) for x in out.sequences[0, len(p):]])
            top2 = torch.stack(out.logits)[:, 0].float().topk(2, dim=-1).values  # [new, 2]
            margins.append((top2[:, 0] - top2[:, 1]).tolist())
    return (tokens, margins) if return_margins else tokens


def decisive_prompts(model, seed: int, tries: int = 50):
    """(seed, prompts, HF greedy continuations, their margins) for the first prompt seed from `seed`
    on whose greedy paths have no near-tie (every top-1/top-2 logit gap >= MIN_MARGIN)."""
    for s in range(seed, seed + tries):
        prompts = sample_prompts(model.config.vocab_size, s)
        tokens, margins = hf_greedy(model, prompts, GEN_NEW, return_margins=True)
        if min(min(m) for m in margins) >= MIN_MARGIN:
            return s, prompts, tokens, margins
    raise RuntimeError(f"no prompt seed in [{seed}, {seed + tries}) avoids greedy near-ties")
