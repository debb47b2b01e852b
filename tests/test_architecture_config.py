import json

import pytest
import torch

import architecture as A
import config


def test_spec_json_roundtrip_and_id():
    s = A.cnn_spec((1, 8, 8), [8, 16], 3, 10, "relu", hidden=[12])
    s2 = A.ArchitectureSpec.from_json(s.to_json())
    assert s2 == s and s2.arch_id == s.arch_id
    assert A.mlp_spec(64, [32], 10, "relu").arch_id != A.mlp_spec(64, [32], 10, "tanh").arch_id


def test_spec_rejects_inconsistent_layers():
    with pytest.raises(ValueError, match="layer 0 outputs 32 but layer 1 expects 16"):
        A.ArchitectureSpec((64,), (A.LayerSpec("linear", 64, 32, "relu"), A.LayerSpec("linear", 16, 10, "identity")))
    with pytest.raises(ValueError, match="unknown activation"):
        A.LayerSpec("linear", 3, 3, "swish")


def test_validate_state_dict_names_cause():
    s = A.mlp_spec(4, [3], 2, "relu")
    sd = A.build_model(s).state_dict()
    sd["layers.0.weight"] = torch.full((3, 4), float("nan"))
    with pytest.raises(ValueError, match="f.pt: layers.0.weight contains NaN"):
        s.validate_state_dict(sd, "f.pt")


def test_specnet_matches_functional(trained_models, model_inputs):
    for spec, sd in trained_models.values():
        net = A.build_model(spec, sd)
        x = model_inputs(spec)
        assert torch.allclose(net(x), A.forward(spec, sd, x))


def test_config_rejects_unknown_and_mistyped_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("encoder:\n  hiden_dim: 3\n")
    with pytest.raises(SystemExit):
        config.parse_args(["--config", str(bad)])
    with pytest.raises(config.ConfigError, match="unknown key encoder.hiden_dim"):
        config.apply_overrides(config.ExperimentConfig(), {"encoder": {"hiden_dim": 3}}, "bad.yaml")
    with pytest.raises(config.ConfigError, match="expected int, got str"):
        config.apply_overrides(config.ExperimentConfig(), {"encoder": {"hidden_dim": "3"}}, "bad.yaml")
    with pytest.raises(config.ConfigError, match="unknown key 'nope'"):
        config.apply_overrides(config.ExperimentConfig(), {"nope": 1}, "x.json")


def test_config_precedence_and_save(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"encoder": {"hidden_dim": 48}, "train": {"epochs": 7}}))
    cfg = config.parse_args(["--small", "--config", str(f), "--epochs", "9"])
    assert cfg.zoo.zoo_tasks == config.SMALL_PRESET["zoo"]["zoo_tasks"]  # from --small
    assert cfg.encoder.hidden_dim == 48  # file beats preset
    assert cfg.train.epochs == 9  # flag beats file
    assert cfg.experiment_name == "small"  # a quick run never overwrites results/default ...
    assert config.parse_args(["--small", "--experiment_name", "mine"]).experiment_name == "mine"  # ... unless asked
    assert config.parse_args([]).experiment_name == "default"
    cfg.save(tmp_path / "resolved.json")
    again = config.config_from_dict(json.loads((tmp_path / "resolved.json").read_text()))
    assert again == cfg
