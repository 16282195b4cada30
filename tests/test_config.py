"""Config schema: loading, base includes, overrides and one-line errors that name key and file."""

import re
from pathlib import Path

import pytest

from conftest import CONFIGS
from r1jax.config import Config, ConfigError, MeshConfig, load_config


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


# --------------------------------------------------------------------------------------------------
# Refused in one line: non-finite floats, counts, lengths, duplicate keys, files that are not YAML
# --------------------------------------------------------------------------------------------------

TINY_QWEN2 = CONFIGS / "models" / "tiny_qwen2.yaml"


def _float_keys(cls=Config, prefix=""):
    """Every float field of the schema, dotted (nested sections walked, optional ones included)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        inner = [a for a in typing.get_args(t) if dataclasses.is_dataclass(a)]  # `RopeScaling | None`
        if t is float:
            yield f"{prefix}{f.name}"
        elif dataclasses.is_dataclass(t) or inner:
            yield from _float_keys(t if dataclasses.is_dataclass(t) else inner[0], f"{prefix}{f.name}.")


FLOAT_KEYS = sorted(_float_keys())
YARN = "model.rope_scaling={type: yarn, factor: 2.0, original_max_position_embeddings: 64}"


def test_the_schema_walk_finds_the_floats_the_issue_names():
    named = {"optimizer.lr", "optimizer.weight_decay", "optimizer.grad_clip", "model.init_std", "model.rope_theta",
             "model.routed_scaling_factor", "model.rope_scaling.factor"}
    assert named <= set(FLOAT_KEYS) and len(FLOAT_KEYS) >= 37


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_floats_are_refused_naming_the_key(key):
    before = [YARN] if key.startswith("model.rope_scaling.") else []
    for text, shown in (("nan", "nan"), (".nan", "nan"), ("inf", "inf"), ("-.inf", "-inf"), ("1e400", "inf")):
        with pytest.raises(ConfigError) as e:
            load_config(TINY_QWEN2, [*before, f"{key}={text}"])
        assert str(e.value) == f"command line: {key}: must be a finite number, got {shown}"


def test_non_finite_floats_in_files_and_nested_sections(tmp_path):
    p = write(tmp_path, "nan.yaml", f"base: {TINY_QWEN2}\noptimizer:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=r"^.*nan\.yaml: optimizer\.lr: must be a finite number, got nan$"):
        load_config(p)
    rope = "{type: yarn, factor: .inf, original_max_position_embeddings: 64}"
    with pytest.raises(ConfigError, match=r"command line: model\.rope_scaling\.factor: must be a finite number"):
        load_config(TINY_QWEN2, [f"model.rope_scaling={rope}"])
    with pytest.raises(ConfigError, match=r"model\.rope_theta: must be a finite number, got an integer of 400 digits"):
        load_config(TINY_QWEN2, ["model.rope_theta=" + "9" * 400])
    cfg = load_config(TINY_QWEN2, ["optimizer.lr=1e-3", "model.rope_theta=500000"])  # finite ones still load
    assert cfg.optimizer.lr == 1e-3 and cfg.model.rope_theta == 500000.0


@pytest.mark.parametrize("override, message", [
    ("checkpoint.every=0", "checkpoint.every: must be > 0, got 0"),
    ("checkpoint.every=-5", "checkpoint.every: must be > 0, got -5"),
    ("checkpoint.keep=0", "checkpoint.keep: must be > 0, got 0"),
    ("checkpoint.keep=-1", "checkpoint.keep: must be > 0, got -1"),
    ("train.eval_max_new_tokens=0", "train.eval_max_new_tokens: must be > 0, got 0"),
    ("train.eval_every=-1", "train.eval_every: must be >= 0, got -1"),
    ("train.eval_examples=-1", "train.eval_examples: must be >= 0, got -1"),
    ("data.packing_bins=0", "data.packing_bins: must be > 0, got 0"),
    ("data.size=0", "data.size: must be > 0, got 0"),
    ("data.n_numbers=1", "data.n_numbers: must be >= 2"),
    ("data.num_shards=-1", "data.num_shards: must be >= 0, got -1"),
    ("data.worker_count=-2", "data.worker_count: must be >= 0, got -2"),
    ("data.max_record_bytes=0", "data.max_record_bytes: must be > 0, got 0"),
    ("tokenizer.train_vocab_size=-3", "tokenizer.train_vocab_size: must be >= 0"),
    ("tokenizer.train_examples=0", "tokenizer.train_examples: must be > 0 to train a tokenizer, got 0"),
    ("grpo.reward_timeout=0", "grpo.reward_timeout: must be > 0 seconds, got 0.0"),
    ("grpo.reward_workers=-1", "grpo.reward_workers: must be >= 0, got -1"),
    ("grpo.beta=-0.1", "grpo.beta: must be >= 0, got -0.1"),
    ("distributed.heartbeat_timeout=0", "distributed.heartbeat_timeout: must be > 0 seconds, got 0"),
    ("distributed.initialization_timeout=-1", "distributed.initialization_timeout: must be > 0 seconds"),
    ("optimizer.b2=1.0", "optimizer.b2: must be in [0, 1), got 1.0"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay: must be >= 0, got -0.1"),
    ("model.rope_theta=0", "model.rope_theta: must be > 0, got 0.0"),
    ("model.norm_eps=0", "model.norm_eps: must be > 0, got 0.0"),
    ("model.init_std=-0.02", "model.init_std: must be >= 0, got -0.02"),
])
def test_counts_out_of_range_name_the_key(override, message):
    overrides = [override] + (["tokenizer.train_vocab_size=300"] if override.startswith("tokenizer.train_ex") else [])
    with pytest.raises(ConfigError) as e:
        load_config(TINY_QWEN2, overrides)
    assert str(e.value).startswith(f"command line: {message}") and "\n" not in str(e.value)


def test_sequence_lengths_must_fit_the_model(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(TINY_QWEN2, ["train.seq_len=100000"])
    assert str(e.value).startswith("command line: train.seq_len: 100000 exceeds model.max_seq_len=1024")
    p = write(tmp_path, "long.yaml", f"base: {TINY_QWEN2}\ntrain: {{seq_len: 2048}}\n")
    with pytest.raises(ConfigError, match=r"long\.yaml: train\.seq_len: 2048 exceeds model\.max_seq_len=1024"):
        load_config(p)
    # the model's limit set elsewhere (the command line) is checked against the file's length too
    with pytest.raises(ConfigError, match=r"long\.yaml: train\.seq_len: 2048 exceeds model\.max_seq_len=256"):
        load_config(p, ["model.max_seq_len=256"])
    assert load_config(TINY_QWEN2, ["train.seq_len=1024"]).train.seq_len == 1024  # the limit itself fits
    for key in ("sampling.max_new_tokens", "train.eval_max_new_tokens"):  # must leave room for a prompt
        with pytest.raises(ConfigError, match=rf"command line: {key}: 1024 leaves no room for a prompt within "
                                              r"model\.max_seq_len=1024"):
            load_config(TINY_QWEN2, [f"{key}=1024"])
        assert load_config(TINY_QWEN2, [f"{key}=1023"])
    # lengths left at their defaults do not hold back a model with a short context (a converted HF model)
    short = load_config(TINY_QWEN2, ["model.max_seq_len=128"])
    assert short.train.seq_len == 512 and short.model.max_seq_len == 128


def test_duplicate_yaml_keys_name_the_key_and_file_line(tmp_path):
    p = write(tmp_path, "dup.yaml", f"base: {TINY_QWEN2}\nmodel:\n  n_layers: 2\n  d_model: 64\n  n_layers: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == (f"{p}:5: model.n_layers: duplicate key (first given on line 3); give each key once")
    p = write(tmp_path, "top.yaml", f"base: {TINY_QWEN2}\ntrain: {{steps: 1}}\ntrain: {{steps: 2}}\n")
    with pytest.raises(ConfigError, match=r"top\.yaml:3: train: duplicate key \(first given on line 2\)"):
        load_config(p)
    p = write(tmp_path, "flow.yaml", f"base: {TINY_QWEN2}\ndata: {{ops: ['+'], seed: 1, seed: 2}}\n")
    with pytest.raises(ConfigError, match=r"flow\.yaml:2: data\.seed: duplicate key"):
        load_config(p)
    p = write(tmp_path, "base_dup.yaml", "model:\n  family: qwen2\n  family: llama3\n")
    child = write(tmp_path, "child.yaml", "base: base_dup.yaml\n")
    with pytest.raises(ConfigError, match=r"base_dup\.yaml:3: model\.family: duplicate key"):
        load_config(child)  # found in the base file, named as such
    with pytest.raises(ConfigError, match=r"^command line: train\.steps: duplicate key; give each key once$"):
        load_config(TINY_QWEN2, ["train={steps: 1, steps: 2}"])
    # the same key in two different mappings, and YAML merge keys overridden, are fine
    p = write(tmp_path, "ok.yaml", f"base: {TINY_QWEN2}\ntrain: {{seed: 1}}\ndata: {{seed: 2}}\n"
                                   "optimizer: &opt {lr: 0.1, b1: 0.8}\ndistill:\n  <<: {temperature: 2.0}\n"
                                   "  temperature: 3.0\n")
    cfg = load_config(p)
    assert (cfg.train.seed, cfg.data.seed, cfg.distill.temperature) == (1, 2, 3.0)


def test_files_that_are_not_yaml_text_are_one_line(tmp_path, monkeypatch):
    def refused(path, pattern, named=None):
        with pytest.raises(ConfigError) as e:
            load_config(path)
        msg = str(e.value)
        assert "\n" not in msg and str(named or path) in msg, msg
        assert re.search(pattern, msg), msg

    png = tmp_path / "binary.yaml"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    refused(png, r"binary\.yaml: not a UTF-8 text file \(byte 0x89 at offset 0\)")
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"model: {family: qwen2}\n\x00\x01\x02")
    refused(nul, r"nul\.yaml: not a text file \(character #x0000 at offset 23\)")
    refused(tmp_path, r"is a directory, not a config file")
    refused(tmp_path / "absent.yaml", r"absent\.yaml: config file not found")
    child = write(tmp_path, "child.yaml", "base: binary.yaml\n")
    refused(child, r"binary\.yaml: not a UTF-8 text file", named=png)  # a bad base is named itself
    locked = write(tmp_path, "locked.yaml", "model: {family: qwen2}\n")
    real = Path.read_bytes

    def read_bytes(self):  # tests run as root here, where chmod 000 does not stop a read
        if self.name == "locked.yaml":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    refused(locked, r"locked\.yaml: cannot read the config file \(Permission denied\)")
