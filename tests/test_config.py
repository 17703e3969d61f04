import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_core.config import ConfigError, compose_config, to_app_config, validate_delta


@pytest.mark.parametrize(("override", "field"), [
    ("privacy.target_epsilon=0", "privacy.target_epsilon"),
    ("privacy.target_epsilon=-1", "privacy.target_epsilon"),
    ("privacy.delta=1", "privacy.delta"),
    ("privacy.accountant=gdp", "privacy.accountant"),
    ("log_format=xml", "log_format"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=abc", "train.batch_size"),
    ("train.device=tpu", "train.device"),
    ("model=gpt5", "model"),
    ("federation.min_participants=5", "federation.min_participants"),
    ("privacy.bogus=1", "privacy.bogus"),
    ("strategy.secagg.modulus_range=1000", "strategy.secagg.modulus_range"),
    ("lora.layers=3", "lora.layers"),  # the tiny model has 2
    ("train.head_lr=0", "train.head_lr"),
    ("privacy.head_clip_share=1", "privacy.head_clip_share"),
    ("train.max_seq_len=4096", "train.max_seq_len"),
])
def test_bad_value_names_its_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        to_app_config(compose_config(["model=tiny", override]))
    assert err.value.field_path == field
    assert "\n" not in str(err.value)


def test_keeping_the_optimiser_state_needs_an_optimiser_that_has_one() -> None:
    with pytest.raises(ConfigError, match=r"^train\.keep_optimizer_state: needs train\.optimizer=adam"):
        to_app_config(compose_config(["model=tiny", "train.optimizer=sgd", "train.keep_optimizer_state=true"]))


def test_encoder_model_refuses_causal_lm() -> None:
    with pytest.raises(ConfigError, match=r"task\.name"):
        to_app_config(compose_config(["model=minilm", "task=causal-lm"]))


def test_minilm_layer_count_bounds_adapted_layers() -> None:
    assert to_app_config(compose_config(["lora.layers=6"])).lora.layers == 6
    with pytest.raises(ConfigError, match=r"^lora\.layers: must be between 1 and 6"):
        to_app_config(compose_config(["lora.layers=7"]))


def test_delta_must_be_below_one_over_n() -> None:
    validate_delta(1e-5, 1000)
    with pytest.raises(ConfigError, match=r"privacy\.delta"):
        validate_delta(1e-2, 1000)


def test_production_preset_carries_reference_values() -> None:
    cfg = to_app_config(compose_config(["+preset=production"]))
    assert (cfg.privacy.delta, cfg.privacy.noise_multiplier, cfg.privacy.accountant) == (1e-6, 1.5, "rdp")
    assert cfg.federation.min_participants >= 3 and cfg.federation.num_rounds == 100
    assert cfg.strategy.name == "fedprox" and cfg.strategy.convergence_threshold == 0.001
    assert cfg.strategy.server_optimizer.name == "none"  # the main job's server step is for its 3 rounds


def test_cli_bad_config_fails_in_one_line_before_loading_anything() -> None:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fl_client.local_job", "model=tiny", "privacy.target_epsilon=-2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["fl-train-local: config error: privacy.target_epsilon: must be > 0 (got -2.0)"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert time.perf_counter() - start < 60
    # a hospital's run alone is tracked on its node: a tracking server elsewhere is refused, naming the setting
    remote = subprocess.run([sys.executable, "-m", "fl_client.local_job", "model=tiny"], capture_output=True,
                            text=True, timeout=120,
                            env={**os.environ, "MLFLOW_TRACKING_URI": "https://user:token@mlflow.example.org"})
    assert remote.returncode == 2 and remote.stderr.strip() == (
        "fl-train-local: config error: tracking.mlflow_uri: fl-train-local tracks on the hospital's node only: a "
        "sqlite:/// or file store, not a https:// server (MLFLOW_TRACKING_URI?)")  # the address is not echoed


def test_the_tracking_server_comes_from_the_environment_unless_the_run_names_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert to_app_config(compose_config([])).tracking.mlflow_uri == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # as the ServerApp runner's container sets it
    assert to_app_config(compose_config([])).tracking.mlflow_uri == "http://mlflow:5000"
    named = to_app_config(compose_config(["tracking.mlflow_uri=sqlite:///run.db"]))
    assert named.tracking.mlflow_uri == "sqlite:///run.db"


def test_llm_experiment_overrides_the_main_jobs_model_and_its_training_defaults() -> None:
    """`+experiment=llm` comes after the model file in the defaults list, so its batch and learning rate win over
    MiniLM's and SmolLM2's, and a command-line override still wins over it."""
    cfg = to_app_config(compose_config(["+experiment=llm"]))
    assert (cfg.model.name, cfg.task.name, cfg.lora.layers, cfg.train.batch_size) == ("smollm2-135m", "chat", 4, 64)
    assert (cfg.train.lr, cfg.privacy.max_grad_norm) == (0.02, 0.3)  # chosen on the validation split (README)
    assert (cfg.task.answer, cfg.federation.num_rounds, cfg.train.keep_optimizer_state) == ("code_range", 8, True)
    assert cfg.privacy.target_epsilon == 8.0 and cfg.strategy.secagg.enabled and cfg.federation.num_clients == 3
    assert cfg.privacy.head_clip_share is None  # MiniLM's head split does not follow it: a chat model has no head
    assert to_app_config(compose_config(["+experiment=llm", "train.batch_size=8"])).train.batch_size == 8


def _leaves(tree: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() if key != "defaults"
            for k, v in _leaves(value, f"{prefix}{key}.").items()}


def test_the_schemas_are_the_one_source_of_defaults_and_conf_files_only_choose_or_differ() -> None:
    """A conf file that restated a default drifted from it (batch 64 in conf, 32 in the schema); presets and
    experiments state a deployment's or a job's values on purpose and are left out."""
    import dataclasses

    import yaml

    from fl_core.config import CONF_DIR, AppConfig, config_as_dict
    from gateway.config import GatewayConfig

    schemas = {"": _leaves(config_as_dict(AppConfig())), "gateway": _leaves(dataclasses.asdict(GatewayConfig()))}
    restated = []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        parts = path.relative_to(CONF_DIR).parts
        if {"preset", "experiment"} & set(parts):
            continue
        tree = "gateway" if parts[0] == "gateway" else ""
        text = path.read_text()
        group = "" if "@package _global_" in text or path.name == "config.yaml" else parts[-2]
        for key, value in _leaves(yaml.safe_load(text) or {}, f"{group}." if group else "").items():
            assert key in schemas[tree], f"{path}: {key} is not in the schema"
            if value == schemas[tree][key] and not key.endswith("name"):
                restated.append(f"{path.relative_to(CONF_DIR)}: {key}")
    assert restated == []


def test_typed_run_config_keys_map_onto_the_config_and_pyproject_leaves_it_alone() -> None:
    import tomllib

    from fl_core.run_config import OVERRIDES_KEY, TYPED_KEYS, run_overrides

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    declared = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(declared) == {*TYPED_KEYS, OVERRIDES_KEY}
    assert run_overrides(declared) == []  # every key at its neutral value: conf/ and the schema decide
    overrides = run_overrides({**declared, "num-rounds": 5, "target-epsilon": 4, "model": "tiny",
                               "secure-aggregation": "off", "overrides": "federation.num_rounds=2 train.lr=0.01"})
    assert overrides == ["train.lr=0.01", "federation.num_rounds=5", "privacy.target_epsilon=4.0", "model=tiny",
                         "strategy.secagg.enabled=false"]  # a typed key wins over the same path in `overrides`
    cfg = to_app_config(compose_config(overrides))
    assert (cfg.federation.num_rounds, cfg.privacy.target_epsilon, cfg.model.name) == (5, 4.0, "tiny")
    assert not cfg.strategy.secagg.enabled
    for key, value, problem in (("num-rounds", "five", "must be a int"), ("delta", True, "must be a float"),
                                ("secure-aggregation", "yes", "must be one of on, off"),
                                ("model", "null", "must be one of tiny, smollm2-135m, minilm")):
        with pytest.raises(ConfigError, match=f"run-config {key}: {problem}"):
            run_overrides({key: value})


def test_a_run_without_a_folder_gets_a_new_one_and_latest_follows_it(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from fl_core.artifacts import run_folder

    monkeypatch.chdir(tmp_path)
    first, second = run_folder(None, None), run_folder(None, None)
    assert first != second and first.is_dir() and second.is_dir()  # two runs in one second: -2
    assert (tmp_path / "outputs" / "latest").resolve() == second.resolve()
    assert run_folder("mine", None) == Path("mine") and run_folder("mine", str(first)) == first  # resume writes there
    (tmp_path / "outputs" / "latest").unlink()
    (tmp_path / "outputs" / "latest").mkdir()  # an older layout's folder is never replaced
    assert run_folder(None, None).is_dir() and (tmp_path / "outputs" / "latest").is_dir()
    shutil.rmtree(tmp_path / "outputs")
    (tmp_path / "outputs").symlink_to(tmp_path / "unmounted")  # a dangling volume: one error, not a loop
    with pytest.raises(FileExistsError):
        run_folder(None, None)
