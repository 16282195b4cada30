"""Config schema: loading, base includes, overrides and one-line errors that name key and file."""

import pytest

from conftest import CONFIGS
from r1jax.config import ConfigError, MeshConfig, load_config


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_base_and_overrides(tmp_path):
    p = write(tmp_path, "run.yaml", f"base: {CONFIGS / 'models' / 'tiny_v3.yaml'}\nmodel: {{n_layers: 6}}\n")
    cfg = load_config(p, ["model.d_model=128", "mesh.expert=2", "model.q_lora_rank=null"])
    assert cfg.model.n_layers == 6 and cfg.model.d_model == 128 and cfg.mesh.expert == 2
    assert cfg.model.q_lora_rank is None
    assert cfg.model.n_routed_experts == 8  # inherited from the base


def test_unknown_key_names_file_and_suggests(tmp_path):
    p = write(tmp_path, "bad.yaml", f"base: {CONFIGS / 'models' / 'tiny_v3.yaml'}\nmodel: {{n_grop: 2}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "bad.yaml" in msg and "model.n_grop" in msg and "did you mean 'n_group'" in msg
    assert "\n" not in msg


def test_unknown_override_names_command_line():
    with pytest.raises(ConfigError, match=r"command line: model\.n_layer: unknown key \(did you mean 'n_layers'\?\)"):
        load_config(CONFIGS / "models" / "tiny_v3.yaml", ["model.n_layer=3"])


def test_scientific_notation_floats():
    cfg = load_config(CONFIGS / "models" / "tiny_v3.yaml", ["optimizer.lr=1e-3", "train.bias_update_speed=5E-4"])
    assert cfg.optimizer.lr == 1e-3 and cfg.train.bias_update_speed == 5e-4
    with pytest.raises(ConfigError, match=r"optimizer\.lr: expected a number, got 'fast'"):
        load_config(CONFIGS / "models" / "tiny_v3.yaml", ["optimizer.lr=fast"])


def test_wrong_type(tmp_path):
    p = write(tmp_path, "t.yaml", f"base: {CONFIGS / 'models' / 'tiny_v3.yaml'}\nmodel: {{n_heads: four}}\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: model\.n_heads: expected an integer, got 'four'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"model\.tie_embeddings: expected true/false"):
        load_config(CONFIGS / "models" / "tiny_v3.yaml", ["model.tie_embeddings=1"])
    with pytest.raises(ConfigError, match=r"model\.score_func: expected one of .* \(did you mean 'sigmoid'\?\)"):
        load_config(CONFIGS / "models" / "tiny_v3.yaml", ["model.score_func=sigmod"])


def test_impossible_combinations_name_the_key_and_its_file(tmp_path):
    base = CONFIGS / "models" / "tiny_v3.yaml"
    with pytest.raises(ConfigError, match=r"command line: model\.topk_group: must be in 1\.\.n_group=4, got 5"):
        load_config(base, ["model.topk_group=5"])
    with pytest.raises(ConfigError, match=r"model\.n_group: 3 does not divide n_routed_experts=8"):
        load_config(base, ["model.n_group=3"])
    with pytest.raises(ConfigError, match=r"model\.num_experts_per_tok: 8 > topk_group\*experts_per_group"):
        load_config(base, ["model.num_experts_per_tok=8"])
    p = write(tmp_path, "m.yaml", f"base: {base}\nmesh: {{tensor: 3}}\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: mesh\.tensor: tensor=3 does not divide model\.n_heads=4"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"mesh\.expert: expert=3 does not divide model\.n_routed_experts=8"):
        load_config(base, ["mesh.expert=3"])
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads: 3 does not divide n_heads=4"):
        load_config(CONFIGS / "models" / "tiny_llama3.yaml", ["model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match=r"mesh\.fsdp: only one mesh axis may be -1"):
        load_config(base, ["mesh.data=-1"])


def test_missing_required_and_missing_file(tmp_path):
    p = write(tmp_path, "empty.yaml", "model: {family: qwen2}\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml: model\.vocab_size: missing required key"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    p = write(tmp_path, "bad_yaml.yaml", "model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad_yaml\.yaml:\d+: not valid YAML"):
        load_config(p)


def test_mesh_resolve():
    assert MeshConfig(data=2, fsdp=-1, expert=2, tensor=1).resolve(8) == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
    with pytest.raises(ConfigError, match="mesh"):
        MeshConfig(data=3, fsdp=-1).resolve(8)


def test_one_sampling_section_and_moved_keys_say_where_they_went(tmp_path):
    base = CONFIGS / "models" / "tiny_v3.yaml"
    cfg = load_config(base, ["sampling.temperature=0.6", "sampling.top_p=0.95", "sampling.max_new_tokens=80"])
    assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.top_k, cfg.sampling.max_new_tokens) == \
        (0.6, 0.95, 0, 80)
    p = write(tmp_path, "old.yaml", f"base: {base}\ngrpo: {{temperature: 0.7}}\n")
    with pytest.raises(ConfigError, match=r"old\.yaml: grpo\.temperature: moved to sampling\.temperature"):
        load_config(p)
    for key in ("eval.max_new_tokens=9", "rejection.top_p=0.9", "grpo.top_k=5"):
        section, name = key.split("=")[0].split(".")
        with pytest.raises(ConfigError, match=rf"command line: {section}\.{name}: moved to sampling\.{name}"):
            load_config(base, [key])
    with pytest.raises(ConfigError, match=r"sampling\.top_p: temperature >= 0 and 0 < top_p <= 1"):
        load_config(base, ["sampling.top_p=0"])
    with pytest.raises(ConfigError, match=r"sampling\.max_new_tokens: must be > 0"):
        load_config(base, ["sampling.max_new_tokens=0"])
