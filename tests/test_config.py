import json

import pytest

from dsvl2_cli.errors import ConfigError
from dsvl2_cli.model.config import ModelConfig


def test_real_27b_config_takes_reference_defaults(shared_dir):
    cfg = ModelConfig.from_dir(shared_dir / "reference" / "deepseek-vl2")
    lm = cfg.language
    assert lm.num_hidden_layers == 30 and lm.num_attention_heads == 32
    assert (lm.kv_lora_rank, lm.qk_rope_head_dim, lm.qk_nope_head_dim, lm.v_head_dim) == (512, 64, 128, 128)
    assert lm.n_routed_experts == 72 and lm.n_shared_experts == 2 and lm.num_experts_per_tok == 6
    assert (lm.scoring_func, lm.topk_method, lm.norm_topk_prob, lm.routed_scaling_factor) == ("sigmoid", "noaux_tc", True, 2.0)
    assert lm.use_mla and lm.q_lora_rank is None and lm.vocab_size == 129280
    assert cfg.vision.mlp_hidden == 4304 and cfg.vision.heads == 16 and cfg.vision.grid == 27
    assert cfg.tokens_per_tile_side == 14 and len(cfg.candidate_resolutions) == 23
    # MLA caches 576 values per token and layer instead of 32 heads x (192 + 128).
    assert lm.cache_values_per_token() == 576 and lm.full_kv_values_per_token() == 32 * 320


def test_fixture_families_parse(ckpt_tiny, ckpt_small, ckpt_vl2):
    tiny, small, vl2 = (ModelConfig.from_dir(p) for p in (ckpt_tiny, ckpt_small, ckpt_vl2))
    assert not tiny.language.use_mla and tiny.language.head_dim * tiny.language.num_attention_heads == tiny.language.hidden_size
    assert small.language.use_mla and small.language.scoring_func == "softmax"
    # small-like omits bos/eos like the real file: the reference defaults apply
    assert small.language.bos_token_id == 100000
    assert vl2.language.topk_method == "noaux_tc"
    for cfg in (tiny, small, vl2):
        assert not cfg.language.is_moe_layer(0) and cfg.language.is_moe_layer(1)


def _write(tmp_path, mutate):
    from dsvl2_cli.dev.synthetic import write_checkpoint

    folder = write_checkpoint(tmp_path / "m", "vl2-like")
    raw = json.loads((folder / "config.json").read_text())
    mutate(raw)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.update(model_type="llava"), "not a DeepSeek-VL2 checkpoint"),
    (lambda c: c.pop("language_config"), "language_config"),
    (lambda c: c["language_config"].update(hidden_act="gelu"), "hidden_act"),
    (lambda c: c["language_config"].update(rope_scaling={"type": "yarn", "factor": 4}), "rope_scaling"),
    (lambda c: c["language_config"].update(q_lora_rank=1536), "q_lora_rank"),
    (lambda c: c["language_config"].update(scoring_func="relu"), "scoring_func"),
    (lambda c: c["language_config"].update(topk_method="random"), "topk_method"),
    (lambda c: c["language_config"].update(num_experts_per_tok=99), "num_experts_per_tok"),
    (lambda c: c["language_config"].update(hidden_size=-1), "hidden_size"),
    (lambda c: c.update(tile_tag="1D"), "tile_tag"),
    (lambda c: c["projector_config"].update(n_embed=12), "n_embed"),
    (lambda c: c.update(candidate_resolutions=[[100, 384]]), "candidate resolution"),
])
def test_unrunnable_values_are_refused_by_name(tmp_path, mutate, needle):
    folder = _write(tmp_path, mutate)
    with pytest.raises(ConfigError, match=needle) as err:
        ModelConfig.from_dir(folder)
    assert "config.json" in str(err.value) and "\n" not in str(err.value)


def test_missing_and_invalid_config(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)
