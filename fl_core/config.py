"""Typed configuration: Hydra structured-config schemas, composition and start-up validation.

Every entry point (local job, simulation, Flower apps) composes the same tree under `conf/` and calls
`validate` before any data or model is loaded, so a bad value costs nothing but a one-line error.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


def _conf_dir() -> Path:
    """The Hydra tree: FEDERATED_DP_LLM_CONF if set, else the copy an installed wheel carries (fl_core/conf), else
    the source tree's conf/ beside the packages (a checkout, an editable install, the app bundle). The package's
    own copy comes first: in site-packages, a `conf/` beside it could be another distribution's."""
    if "FEDERATED_DP_LLM_CONF" in os.environ:
        return Path(os.environ["FEDERATED_DP_LLM_CONF"])
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if (packaged / "config.yaml").is_file() else Path(__file__).resolve().parents[1] / "conf"


CONF_DIR = _conf_dir()

MODELS = ("tiny", "smollm2-135m", "minilm")
PRETRAINED_LAYERS = {"smollm2-135m": 30, "minilm": 6}  # transformer layers of the packaged models
CLASSIFICATION_ONLY_MODELS = ("minilm",)
DATASETS = ("icd10", "drugreview")
TASKS = ("classification", "causal-lm", "chat")  # chat: a diagnosis in, its label's name out (fl_core.chat)
ANSWERS = ("title", "code_range")
ACCOUNTANTS = ("pld", "rdp")  # privacy.accountant.ACCOUNTANTS, without importing the accountants to check config
GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch")
OPTIMIZERS = ("sgd", "adam")
PRECISIONS = ("fp32", "bf16")
PARTITIONINGS = ("iid", "dirichlet")
STRATEGIES = ("fedprox",)
SERVER_OPTIMIZERS = ("none", "momentum", "adam", "yogi")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""

    def __init__(self, field_path: str, problem: str) -> None:
        super().__init__(f"{field_path}: {problem}")
        self.field_path = field_path


@dataclass
class ModelConfig:
    name: str = "tiny"
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Shape of the random-initialised `tiny` model; ignored for pretrained models.
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4


@dataclass
class DataConfig:
    name: str = "icd10"
    test_fraction: float = 0.2
    max_train_examples: int | None = None
    max_test_examples: int | None = None
    seed: int = 0


@dataclass
class TaskConfig:
    name: str = "classification"
    # chat: what the assistant answers for a label (fl_core.chat.answer_of): its name without the code range
    # ("title") or the code range alone ("code_range", ICD-10-CM only)
    answer: str = "title"


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: the model's `lora_targets`
    exclude_modules: list[str] | None = None  # modules the targets would match that take no adapter
    # Adapters on the top `layers` transformer layers only (None: every layer). MiniLM's frozen lower layers then run
    # once per example, not every step (fl_core.encoder).
    layers: int | None = None
    # FFA-LoRA (Sun et al., ICLR 2024): A stays at its initialisation, the same on every node (seeded by train.seed),
    # and only B trains. The update is then linear in what trains, so averaging the hospitals' B averages their
    # updates exactly (the mean of products B_i A_i is not the product of means), and DP noise falls on half the
    # parameters.
    freeze_a: bool = False


@dataclass
class ClientLevelDPConfig:
    """Hospital-level DP on top of DP-SGD (unit: a hospital's whole dataset, replaced by any other): each update
    clipped on its node, Gaussian noise added by the server after secure aggregation, scaled to the updates actually
    aggregated, hospitals weighted equally. Reported beside the record-level epsilon."""

    enabled: bool = False
    clipping_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5


@dataclass
class PrivacyConfig:
    """Record-level DP-SGD per hospital. sigma is calibrated once for everything the run releases: every round's
    DP-SGD steps and, with strategy.federated_evaluation, every noised evaluation. The guarantee is replace-one (one
    record replaced by another; dataset sizes are public by the plan)."""

    enabled: bool = True
    target_epsilon: float = 8.0  # replace-one epsilon of everything a hospital releases in the run
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    # Clip the classifier head and the adapters separately: the head to sqrt(share) * max_grad_norm, the adapters to
    # sqrt(1 - share) * max_grad_norm, so the whole stays within max_grad_norm (None: flat clipping).
    head_clip_share: float | None = None
    accountant: str = "pld"  # replace-one: pld (dp-accounting, tight) or rdp (Renyi, weak triangle; looser)
    noise_multiplier: float | None = None  # fixed sigma instead of calibrating to target_epsilon
    grad_sample_mode: str = "hooks"
    client_level: ClientLevelDPConfig = field(default_factory=ClientLevelDPConfig)
    # Federated evaluation (strategy.federated_evaluation) is a Gaussian release of each hospital's held-out scores:
    # noise std on the count of correct answers and on the sum of losses, each loss clipped to loss_bound.
    evaluation_noise: float = 30.0
    evaluation_loss_bound: float = 5.0


@dataclass
class TrainConfig:
    local_epochs: int = 1
    batch_size: int = 64  # the expected Poisson batch
    lr: float = 5e-3
    head_lr: float | None = None  # the classifier head's learning rate (None: lr); the adapters take lr
    optimizer: str = "adam"
    # Each hospital's Adam moments carried from its round to its next, kept in its node's state folder, instead of a
    # fresh Adam every round, whose bias-corrected first steps under DP-SGD are mostly the noise's signs.
    keep_optimizer_state: bool = False
    max_seq_len: int = 32
    device: str = "auto"  # auto picks CUDA when present
    # bf16: a causal LM's frozen weights (embeddings, layers, output layer) and its cached prefixes in bfloat16, for
    # about twice the matmul speed; the adapters and Adam stay fp32. Runs without DP only: bf16's rounding depends on
    # the batch's shape, so one record moves the others' gradients (README, "What this does not protect").
    precision: str = "fp32"  # one of PRECISIONS, whose dtypes are fl_core.model.PRECISION_DTYPES
    seed: int = 0
    num_threads: int | None = None  # None: torch's default; simulations set one thread per simulated hospital


@dataclass
class FederationConfig:
    num_clients: int = 3
    num_rounds: int = 3
    partitioning: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    min_participants: int = 3
    join_timeout: float = 300.0  # seconds the server waits for every hospital to connect before admission
    rejoin_timeout: float = 30.0  # seconds a round waits for an admitted hospital that is offline (restarting)


@dataclass
class SecAggConfig:
    enabled: bool = True
    # Values up to 1 are fractions of the sampled hospitals; larger values are counts.
    num_shares: float = 1.0
    reconstruction_threshold: float = 0.67
    clipping_range: float = 8.0
    quantization_range: int = 4194304
    modulus_range: int = 4294967296
    max_weight: float = 100000.0
    timeout: float | None = None


@dataclass
class ServerOptimizerConfig:
    """What the server does with each round's aggregate (`strategies/server_optimizer.py`): `none` takes it as the
    new model, as FedProx does; `momentum`, `adam` and `yogi` step towards it as FedAvgM, FedAdam and FedYogi do."""

    name: str = "none"
    lr: float = 1.0
    momentum: float = 0.9  # momentum only
    beta_1: float = 0.9  # adam, yogi
    beta_2: float = 0.99
    tau: float = 1e-3  # adam, yogi: the smallest per-coordinate scale


@dataclass
class StrategyConfig:
    name: str = "fedprox"
    proximal_mu: float = 0.001  # chosen on a validation split: 0.01 held the main job back (README)
    server_optimizer: ServerOptimizerConfig = field(default_factory=ServerOptimizerConfig)
    # Hospitals also score each round's model on their own held-out records, a noised release charged to their
    # ledgers (privacy.evaluation_noise); off by default.
    federated_evaluation: bool = False
    convergence_threshold: float = 0.001  # stop when the relative change of the evaluation loss stays below this...
    patience: int = 2  # ...for this many rounds
    secagg: SecAggConfig = field(default_factory=SecAggConfig)


@dataclass
class TrackingConfig:
    mlflow_uri: str = "sqlite:///mlflow.db"
    experiment: str = "federated-dp-llm"
    registered_model: str = "federated-dp-llm"  # each finished run becomes a version the gateway can serve
    metrics_port: int | None = None  # the ServerApp serves Prometheus metrics (training_epsilon...) here; None: off
    metrics_host: str = "127.0.0.1"


@dataclass
class AppConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str | None = None  # None: a new folder per run, outputs/<date>/<time> (fl_core.artifacts.run_folder)
    resume_from: str | None = None  # a run's folder: continue from its last checkpoint, writing there
    verbose: bool = False  # fl-simulate, fl-train-local: Flower's, MLflow's and the hospitals' logs on the console
    log_format: str = "text"  # json: also <command>.jsonl in the run folder, a JSON line per record (fl_core/logs.py)


def register_schemas() -> None:
    """Make the schema the base of `conf/config.yaml` so Hydra type-checks every override."""
    ConfigStore.instance().store(name="base_config", node=AppConfig)


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `conf/` with Hydra overrides, as `fl-simulate` and the Flower apps all do."""
    register_schemas()
    try:
        if GlobalHydra.instance().is_initialized():  # inside `@hydra.main` (fl-simulate): same conf/ tree
            return compose(config_name="config", overrides=list(overrides))
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise composition_error(err) from err


def override_key(override: str) -> str:
    """The config path a Hydra override sets: `+train.lr=0.1` and `~train.lr` set `train.lr`."""
    return override.split("=", 1)[0].lstrip("+~")


def composition_error(err: BaseException) -> ConfigError:
    """Reduce Hydra's multi-line composition errors to one line that names the field."""
    if isinstance(err, MissingConfigException):
        group, _, option = (err.missing_cfg_file or "config/?").rpartition("/")
        choice = f"; choose one of {', '.join(err.options)}" if err.options else ""
        return ConfigError(group or "config", f"unknown option {option!r}{choice}")
    cause: BaseException = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    full_key = getattr(cause, "full_key", None) or "config"
    return ConfigError(str(full_key), str(cause).splitlines()[0])


def to_app_config(cfg: DictConfig | AppConfig) -> AppConfig:
    """Validate, then turn a composed config into typed dataclasses."""
    if isinstance(cfg, AppConfig):
        validate(cfg)
        return cfg
    app = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AppConfig), cfg))
    assert isinstance(app, AppConfig)
    validate(app)
    return app


def layer_count(model: ModelConfig) -> int:
    """Transformer layers of the model: the packaged models' own, or the tiny model's configured count."""
    return PRETRAINED_LAYERS.get(model.name, model.num_layers)


def require(ok: bool, field_path: str, problem: str) -> None:
    """Raise ConfigError naming `field_path` unless `ok`."""
    if not ok:
        raise ConfigError(field_path, problem)


def _one_of(value: str, options: Sequence[str], field_path: str) -> None:
    require(value in options, field_path, f"unknown value {value!r}; choose one of {', '.join(options)}")


def positive(value: float, field_path: str) -> None:
    require(math.isfinite(value) and value > 0, field_path, f"must be > 0 (got {value})")


LOG_FORMATS = ("text", "json")


def validate(cfg: AppConfig) -> None:
    """Check every value before any work starts; raise ConfigError naming the first bad field."""
    _one_of(cfg.log_format, LOG_FORMATS, "log_format")
    _one_of(cfg.model.name, MODELS, "model.name")
    _one_of(cfg.data.name, DATASETS, "data.name")
    _one_of(cfg.task.name, TASKS, "task.name")
    _one_of(cfg.task.answer, ANSWERS, "task.answer")
    require(cfg.task.name != "chat" or cfg.task.answer != "code_range" or cfg.data.name == "icd10", "task.answer",
            f"'code_range' needs ICD-10-CM labels; data {cfg.data.name!r} has none")
    require(
        not (cfg.task.name != "classification" and cfg.model.name in CLASSIFICATION_ONLY_MODELS),
        "task.name",
        f"model {cfg.model.name!r} is an encoder and supports only 'classification'",
    )
    for name in ("hidden_size", "num_layers", "num_heads"):
        positive(getattr(cfg.model, name), f"model.{name}")
    require(cfg.model.hidden_size % cfg.model.num_heads == 0, "model.hidden_size",
             "must be divisible by model.num_heads")
    require(0 < cfg.data.test_fraction < 1, "data.test_fraction",
             f"must be in (0, 1) (got {cfg.data.test_fraction})")
    for name in ("max_train_examples", "max_test_examples"):
        value = getattr(cfg.data, name)
        require(value is None or value >= 1, f"data.{name}", f"must be >= 1 or null (got {value})")
    port = cfg.tracking.metrics_port
    require(port is None or 1 <= port <= 65535, "tracking.metrics_port", f"must be a port 1-65535 or null (got {port})")

    positive(cfg.lora.r, "lora.r")
    positive(cfg.lora.alpha, "lora.alpha")
    require(0 <= cfg.lora.dropout < 1, "lora.dropout", f"must be in [0, 1) (got {cfg.lora.dropout})")
    targets = cfg.lora.target_modules if cfg.lora.target_modules is not None else cfg.model.lora_targets
    require(len(targets) > 0, "lora.target_modules", "must name at least one module")
    if cfg.lora.layers is not None:
        layers = layer_count(cfg.model)
        require(1 <= cfg.lora.layers <= layers, "lora.layers",
                f"must be between 1 and {layers}, the layers of model {cfg.model.name!r} (got {cfg.lora.layers})")

    p = cfg.privacy
    require(0 < p.delta < 1, "privacy.delta", f"must be in (0, 1) (got {p.delta})")
    positive(p.max_grad_norm, "privacy.max_grad_norm")
    require(p.accountant in ACCOUNTANTS, "privacy.accountant",
            f"unknown value {p.accountant!r}; choose one of {', '.join(ACCOUNTANTS)}"
            + (" (Opacus's PRV accounts add/remove-one only; pld is the numerical accountant for replace-one)"
               if p.accountant == "prv" else ""))
    _one_of(p.grad_sample_mode, GRAD_SAMPLE_MODES, "privacy.grad_sample_mode")
    if p.head_clip_share is not None:
        require(0 < p.head_clip_share < 1, "privacy.head_clip_share", f"must be in (0, 1) (got {p.head_clip_share})")
        require(p.grad_sample_mode != "ghost", "privacy.head_clip_share",
                "needs per-sample gradients: privacy.grad_sample_mode hooks or functorch, not ghost")
    if p.noise_multiplier is None:
        positive(p.target_epsilon, "privacy.target_epsilon")
    else:
        require(p.noise_multiplier >= 0, "privacy.noise_multiplier", f"must be >= 0 (got {p.noise_multiplier})")

    positive(p.evaluation_noise, "privacy.evaluation_noise")
    positive(p.evaluation_loss_bound, "privacy.evaluation_loss_bound")
    c = p.client_level
    if c.enabled:
        positive(c.clipping_norm, "privacy.client_level.clipping_norm")
        require(c.noise_multiplier >= 0, "privacy.client_level.noise_multiplier",
                 f"must be >= 0 (got {c.noise_multiplier})")
        require(0 < c.delta < 1, "privacy.client_level.delta", f"must be in (0, 1) (got {c.delta})")

    t = cfg.train
    positive(t.batch_size, "train.batch_size")
    positive(t.local_epochs, "train.local_epochs")
    positive(t.lr, "train.lr")
    if t.head_lr is not None:
        positive(t.head_lr, "train.head_lr")
    require(4 <= t.max_seq_len <= 512, "train.max_seq_len",
            f"must be between 4 and 512, the packaged models' positions (got {t.max_seq_len})")
    _one_of(t.optimizer, OPTIMIZERS, "train.optimizer")
    require(t.optimizer == "adam" or not t.keep_optimizer_state, "train.keep_optimizer_state",
            "needs train.optimizer=adam: plain SGD keeps no state between steps")
    _one_of(t.precision, PRECISIONS, "train.precision")
    require(t.precision == "fp32" or cfg.task.name != "classification",
            "train.precision", "bf16 is for a causal LM (task chat or causal-lm); classifiers train in fp32")
    require(t.precision == "fp32" or not (cfg.privacy.enabled or cfg.strategy.federated_evaluation),
            "train.precision", "bf16 is for runs without DP (privacy.enabled=false, no strategy.federated_evaluation): "
            "its rounding lets one record move the others' gradients and scores beyond what the accountant assumes")
    require(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", t.device) is not None, "train.device",
             f"must be auto, cpu, cuda, cuda:N or mps (got {t.device!r})")
    require(t.num_threads is None or t.num_threads >= 1, "train.num_threads",
             f"must be >= 1 or null (got {t.num_threads})")

    f = cfg.federation
    positive(f.num_clients, "federation.num_clients")
    positive(f.num_rounds, "federation.num_rounds")
    _one_of(f.partitioning, PARTITIONINGS, "federation.partitioning")
    positive(f.dirichlet_alpha, "federation.dirichlet_alpha")
    require(1 <= f.min_participants <= f.num_clients, "federation.min_participants",
             f"must be between 1 and federation.num_clients={f.num_clients} (got {f.min_participants})")
    positive(f.join_timeout, "federation.join_timeout")
    require(f.rejoin_timeout >= 0, "federation.rejoin_timeout", f"must be >= 0 (got {f.rejoin_timeout})")

    s = cfg.strategy
    _one_of(s.name, STRATEGIES, "strategy.name")
    require(s.proximal_mu >= 0, "strategy.proximal_mu", f"must be >= 0 (got {s.proximal_mu})")
    require(s.convergence_threshold >= 0, "strategy.convergence_threshold",
             f"must be >= 0 (got {s.convergence_threshold})")
    positive(s.patience, "strategy.patience")
    _validate_server_optimizer(s.server_optimizer)
    if s.secagg.enabled:
        _validate_secagg(s.secagg, f.min_participants)


def _validate_server_optimizer(o: ServerOptimizerConfig) -> None:
    _one_of(o.name, SERVER_OPTIMIZERS, "strategy.server_optimizer.name")
    positive(o.lr, "strategy.server_optimizer.lr")
    for name, value in (("momentum", o.momentum), ("beta_1", o.beta_1), ("beta_2", o.beta_2)):
        require(0 <= value < 1, f"strategy.server_optimizer.{name}", f"must be in [0, 1) (got {value})")
    positive(o.tau, "strategy.server_optimizer.tau")


def _validate_secagg(sa: SecAggConfig, min_participants: int) -> None:
    require(min_participants >= 2, "federation.min_participants",
             "SecAgg+ needs at least 2 hospitals per round (or strategy.secagg.enabled=false)")
    positive(sa.num_shares, "strategy.secagg.num_shares")
    require(sa.num_shares <= 1 or (float(sa.num_shares).is_integer() and sa.num_shares > 2),
             "strategy.secagg.num_shares", f"a count must be an integer > 2 (got {sa.num_shares})")
    require(sa.reconstruction_threshold > 0, "strategy.secagg.reconstruction_threshold",
             f"must be > 0 (got {sa.reconstruction_threshold})")
    if sa.num_shares > 1 and sa.reconstruction_threshold > 1:
        require(sa.reconstruction_threshold < sa.num_shares, "strategy.secagg.reconstruction_threshold",
                 "must be less than strategy.secagg.num_shares")
    positive(sa.clipping_range, "strategy.secagg.clipping_range")
    positive(sa.quantization_range, "strategy.secagg.quantization_range")
    positive(sa.max_weight, "strategy.secagg.max_weight")
    mod = sa.modulus_range
    require(mod > sa.quantization_range and mod & (mod - 1) == 0 and mod <= 2**32,
             "strategy.secagg.modulus_range",
             "must be a power of 2, at most 2**32, above strategy.secagg.quantization_range")


def validate_delta(delta: float, smallest_partition: int) -> None:
    """delta must be below 1/n for the smallest hospital dataset, or DP says little about a record."""
    require(delta < 1 / smallest_partition, "privacy.delta",
             f"must be < 1/n = {1 / smallest_partition:.3g} for the smallest hospital "
             f"dataset (n={smallest_partition}); got {delta}")


def secagg_count_or_fraction(value: float) -> int | float:
    """Flower reads ints as counts and floats as fractions of the sampled hospitals."""
    return int(value) if value > 1 else float(value)


def config_as_dict(cfg: AppConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}
