"""Typed configuration: one dataclass tree, loadable from CLI flags and YAML/JSON files.

Every field carries a one-line doc (``metadata={"help": ...}``) that becomes its ``--help``
text. Field names are unique across sections, so each one is a flat CLI flag
(``--hidden_dim 64``) and a nested key in a config file (``encoder: {hidden_dim: 64}``).
Unknown or mistyped keys are errors, never silent defaults.

Precedence: dataclass defaults < ``--small`` preset (and ``--experiment scaling``'s folder name) < ``--config FILE``
< explicit CLI flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a one-line doc."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ZooConfig:
    """The trained model zoo (data_prep.py)."""

    zoo_dir: str = _f("zoo/default", "directory of the generated zoo (reused when it exists and matches)")
    runs_per_task: int = _f(6, "training runs of every task (with 2 checkpoints per run, 6 runs give each model "
                               "10 same-task models of other runs: P@10 can reach 1)")
    zoo_scale: int = _f(1, "multiplies runs_per_task: 9 makes ~33k checkpoints (shard it: data_prep.py --shard)")
    zoo_tasks: int = _f(0, "train the zoo on this many tasks spread over every shape group (0 = every task)")
    num_models: int = _f(0, "instead of runs per task: about this many checkpoints, spread evenly over the tasks "
                            "(0 = runs_per_task x zoo_scale runs of every task)")
    zoo_epochs: int = _f(30, "training epochs of each zoo model")
    checkpoints_per_run: int = _f(2, "checkpoints saved per training run (early and final epoch)")
    card_task_fraction: float = _f(0.0, "fraction of model cards that name the task (> 0 makes the metadata "
                                        "baselines partial label oracles, reported as such)")
    zoo_seed: int = _f(0, "seed of zoo generation (independent of the experiment seed)")
    cnn_fraction: float = _f(0.1, "fraction of zoo runs that are CNNs (on the 8x8 image tasks)")
    cnn_bn_fraction: float = _f(0.02, "fraction of zoo runs that are Conv-BN-ReLU-MaxPool CNNs with a flatten head "
                                      "(digits and MNIST tasks; stored BN-folded)")
    resnet_fraction: float = _f(0.02, "fraction of zoo runs that are small residual CNNs (digits and MNIST tasks)")
    zoo_group_size: int = _f(64, "zoo runs of one architecture trained together as one stacked batch")
    zoo_workers: int = _f(2, "worker processes (one per core) training zoo groups in parallel")


@dataclass
class GraphConfig:
    """Neuron graphs and symmetry handling (weight_to_graph.py)."""

    canonicalize: bool = _f(True, "feed encoders the canonical form (removes scaling/sign freedom exactly)")
    graph_cache_dir: str = _f("", "graph cache directory; empty = <zoo_dir>/graph_cache")
    max_kernel: int = _f(5, "K: conv kernels are zero-padded centred to KxK edge features (odd, >= zoo's largest)")


@dataclass
class AugmentConfig:
    """Contrastive views (SymmetryAugmenter)."""

    permute: bool = _f(True, "random hidden-neuron permutation view")
    rescale: bool = _f(True, "random positive per-neuron rescaling (ReLU/LeakyReLU) view")
    sign_flip: bool = _f(True, "random sign flips (tanh) view")
    noise_std: float = _f(0.05, "multiplicative weight noise strength (0 disables)")
    edge_dropout: float = _f(0.1, "fraction of edges zeroed (0 disables)")
    prune_fraction: float = _f(0.0, "fraction of smallest-magnitude weights pruned (0 disables)")
    rescale_low: float = _f(0.5, "smallest per-neuron scaling factor of the rescale view (log-uniform)")
    rescale_high: float = _f(2.0, "largest per-neuron scaling factor of the rescale view (log-uniform)")
    erase_fraction: float = _f(0.0, "length of one random contiguous span of weights zeroed per view, as a fraction "
                                    "of all weights and biases (seed 004's erasing; 0 disables)")
    pair_views: str = _f("symmetry", "views of the pair recipes (checkpoint, seed, supcon): symmetry (exact, "
                                     "function-preserving) or perturb (also noise, edge dropout, pruning)",
                         choices=["symmetry", "perturb"])


@dataclass
class EncoderConfig:
    """Encoders (gnn_encoder.py)."""

    model: str = _f("gnn", "encoder: gnn|nonequivariant_gnn|weightnet|pca_mlp|mlp",
                    choices=["gnn", "nonequivariant_gnn", "weightnet", "pca_mlp", "mlp"])
    hidden_dim: int = _f(32, "hidden width of the encoder (CPU default; the GPU setting is 256)")
    global_dim: int = _f(128, "size of the model embedding")
    projection_dim: int = _f(64, "size of the contrastive projection head output")
    message_passing_steps: int = _f(2, "message-passing layers (WeightNet: intra-layer attention blocks); GPU setting 4")
    dropout: float = _f(0.0, "dropout in the encoder")
    attention_heads: int = _f(4, "WeightNet attention heads (must divide hidden_dim)")
    canonical_order: bool = _f(False, "WeightNet: add embeddings of each hidden neuron's canonical rank in its layer")
    io_slots: int = _f(4, "GNN readout (gnn, nonequivariant_gnn): numbers per input/output position slot "
                          "(0 = attention pooling only)")
    num_probes: int = _f(128, "GNN encoders: probe inputs per kind and input size whose responses are node features "
                         "(probes.py; 0 = no probe features)")
    probe_kinds: list = _f(["gauss", "data"], "probe kinds: gauss (seeded Gaussian), data (unlabeled source inputs), "
                                              "learned (ProbeGen-style generator trained with the encoder)")
    probe_saliency: bool = _f(True, "input neurons carry the input gradient (saliency) on the probes")
    fingerprint_weight: float = _f(1.0, "weight of the raw probe fingerprint kept in the GNN embedding beside the "
                                        "learned part (0 = learned part only)")
    metric_dims: list = _f([64, 128, 256, 512], "metric head (within-group whitening fit after training) sizes tried; chosen on "
                                       "val-unseen tasks (empty = no metric head)")
    metric_regs: list = _f([0.1], "metric head ridge values tried (times the mean within-group variance)")
    learned_weights: list = _f([0.0, 0.5, 1.0], "weights of the GNN's learned part beside the fingerprint tried "
                                                "with the metric head (0 = fingerprint alone), chosen on val-unseen")


@dataclass
class TrainConfig:
    """Contrastive training (contrastive_learning.py, dataloader.py)."""

    epochs: int = _f(2, "training epochs of the encoder (2: the default run on 2 CPU cores, 3 seeds x 2 recipes; more on a GPU)")
    batch_size: int = _f(32, "graphs per global batch (two views each); small batches give more steps per CPU-second")
    learning_rate: float = _f(1e-3, "AdamW learning rate")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    temperature: float = _f(0.1, "NT-Xent temperature")
    weak_supervision: float = _f(0.0, "lambda of the auxiliary task loss (0 = purely self-supervised)")
    weak_targets: str = _f("acc+task", "what the weak-supervision head predicts from the embedding",
                           choices=["acc", "task", "acc+task"])
    view_recipe: str = _f("checkpoint", "positive pairs: symmetry|noise|checkpoint|seed (self-supervised), "
                          "supcon (same-task positives, weakly supervised)",
                          choices=["symmetry", "noise", "checkpoint", "seed", "supcon"])
    compare_recipes: list = _f(["noise", "checkpoint", "supcon"],
                               "view recipes compared on validation (seen tasks) before training")
    compare_epochs: int = _f(0, "training epochs per recipe in the comparison (0 skips it: view_recipe is trained, "
                                "and supcon beside it with train_supcon)")
    train_supcon: bool = _f(True, "without a comparison, also train the weakly supervised supcon recipe beside "
                                  "view_recipe")
    hard_negative_beta: float = _f(0.0, "hardness weighting of cross-family negatives (0 = plain NT-Xent)")
    batch_within: str = _f("shape_group", "draw every training batch within one value of this metadata column "
                                          "(shape_group: negatives differ in function, not in node counts; '' = mixed)",
                           choices=["shape_group", ""])
    val_fraction: float = _f(0.34, "fraction of each seen task's training runs used for validation (the "
                                   "validation P@10 needs >= 2 val runs per task: 2 of the zoo's 6)")
    test_fraction: float = _f(0.15, "fraction of each seen task's training runs held out for testing")
    grad_clip: float = _f(1.0, "max gradient norm (0 disables clipping)")
    lr_schedule: str = _f("cosine", "learning-rate schedule over epochs", choices=["cosine", "none"])
    num_workers: int = _f(0, "DataLoader workers")
    recon_beta: float = _f(0.0, "weight beta of the weight-reconstruction loss: L = (1 - beta) L_con + beta L_rec "
                                "(0 = contrastive only, 1 = reconstruction only; graph encoders; reconstruction.py)")
    decoder_dim: int = _f(64, "width of the weight-reconstruction decoder (with recon_beta > 0)")


@dataclass
class EvalConfig:
    """Evaluation protocols (evaluation.py, baselines.py)."""

    methods: list = _f(["pca", "statnn", "shape_only", "input_profile", "probe_fingerprint", "probe_fingerprint_data",
                        "metadata_tfidf"],
                       "baselines evaluated beside the trained encoder (shape_only, a constant and a random "
                       "embedding are always evaluated: every table's references)")
    eval_seeds: int = _f(3, "repetitions (seeds) for every reported number; each seed draws its own split")
    property_oracles: bool = _f(True, "also score the property oracles (evaluation.PROPERTY_ORACLES: training-set "
                                      "accuracy, training recipe, test loss read from the metadata), listed as oracles")
    heldout_task_fraction: float = _f(0.25, "fraction of each shape group's tasks held out as test-unseen tasks "
                                            "(reported, never read by any choice); redrawn per seed")
    val_unseen_task_fraction: float = _f(0.2, "fraction of each shape group's tasks held out as val-unseen tasks "
                                              "(model selection on unseen tasks); redrawn per seed")
    unseen_kind: str = _f("auto", "task kind held out of training whole (unseen_kinds protocol): auto = drawn per "
                                  "seed among the eligible kinds, '' = none, else a kind name")
    unseen_kind_max_fraction: float = _f(0.34, "auto draws among kinds with >= 2 tasks and at most this fraction of "
                                               "the zoo's tasks")
    k_values: list = _f([1, 5, 10], "k for precision/recall/F1@k")
    property_targets: list = _f(["test_acc", "gen_gap", "epoch", "log_lr"],
                                "metadata columns predicted by the probes (log_<col> = log10 of col)")
    probes: list = _f(["ridge", "mlp"], "property-prediction probes: ridge (RidgeCV) and/or mlp (MLPRegressor)")
    within_task_min_models: int = _f(5, "a task enters the within-task Kendall tau with at least this many test models")
    symmetry_queries: int = _f(200, "queries transformed in the symmetry-robustness check (0 = all)")
    merge_pairs: int = _f(3, "model pairs (same architecture and task) merged per seed")
    merge_alphas: int = _f(11, "points on the interpolation path alpha in [0, 1]")
    transfer_tasks: int = _f(5, "test-unseen tasks per seed in the transfer protocol (seeded draw spread over the "
                                "shape groups)")
    transfer_k: int = _f(5, "models fine-tuned per arm (top-k retrieved, k random) in the transfer protocol")
    transfer_steps: int = _f(200, "fine-tuning budget in minibatch steps (same for every model)")
    transfer_lr: float = _f(1e-3, "Adam learning rate of transfer fine-tuning")
    transfer_batch_size: int = _f(64, "minibatch size of transfer fine-tuning")
    transfer_eval_every: int = _f(10, "evaluate test accuracy every this many fine-tuning steps")
    transfer_target_fraction: float = _f(0.9, "target accuracy = this fraction of the query model's test accuracy")
    same_arch_subzoos: int = _f(3, "K largest same-architecture sub-zoos for the NFN comparison (0 skips it)")
    same_arch_min_tasks: int = _f(4, "a same-architecture sub-zoo must span at least this many tasks")
    same_arch_min_models: int = _f(20, "a same-architecture sub-zoo must hold at least this many models")
    nfn_epochs: int = _f(0, "contrastive epochs of the per-sub-zoo NFN encoder (0 = training-free NFN only)")
    nfn_hidden_channels: int = _f(16, "channels of the NFN HNP layers")
    nfn_layers: int = _f(2, "NFN HNP layers")
    scaling_tasks: list = _f([8, 32, 96, 0], "--experiment scaling: numbers of training tasks (0 = every seen task)")
    scaling_recipes: list = _f(["supcon"], "--experiment scaling: view recipes the encoder trains with (supcon: the "
                                           "one trained on task labels; add e.g. checkpoint for a self-supervised one)")
    scaling_epochs: int = _f(2, "--experiment scaling: encoder epochs over the full training set (a smaller set "
                                "trains for the same optimizer steps with --scaling_equal_steps)")
    scaling_equal_steps: bool = _f(True, "--experiment scaling: every number of tasks gets the optimizer steps of "
                                         "the full training set (more epochs over fewer tasks)")


@dataclass
class ReconConfig:
    """The hyper-representation ablation (seed 004): reconstruction + contrast, judged by property prediction."""

    hyperreps: bool = _f(False, "also train the hyperreps encoder once per beta of hyperreps_betas and seed, and report "
                                "the beta ablation and reconstruction quality (not in the default run: its time)")
    hyperreps_betas: list = _f([0.0, 0.5, 1.0], "reconstruction weights beta of the ablation (0 = contrastive only)")
    hyperreps_model: str = _f("weightnet", "encoder of the ablation (its per-neuron states feed the decoder)",
                              choices=["weightnet", "gnn", "nonequivariant_gnn"])
    hyperreps_row_codes: bool = _f(True, "WeightNet of the ablation: address-coded row and column sums in its neuron "
                                         "tokens (seed 004's weight-row tokens, made equivariant; weightnet.AddressCodes)")
    hyperreps_hidden_dim: int = _f(128, "token width of the ablation's encoder and of its decoder (a neuron's token "
                                        "must hold its row: up to 100 weights in this zoo; the encoder's CPU default "
                                        "32 keeps at most R^2 0.53-0.58 of the 64/100-input rows)")
    hyperreps_epochs: int = _f(3, "training epochs of each ablation encoder (the last epoch is kept)")
    hyperreps_learning_rate: float = _f(3e-3, "AdamW learning rate of the ablation's encoder and decoder "
                                              "(benchmarks/bench_reconstruction.py: 3e-3 with batch 16 learns the weights "
                                              "several times faster per CPU second than the GNN's 1e-3 with batch 32-64)")
    hyperreps_batch_size: int = _f(16, "graphs per global batch of the ablation's training (two views each)")
    hyperreps_noise_std: float = _f(0.05, "multiplicative Gaussian weight noise of the ablation's views")
    hyperreps_erase_fraction: float = _f(0.1, "erased span of the ablation's views (fraction of all weights)")


@dataclass
class ExperimentConfig:
    """Everything one run of run_experiment.py needs."""

    seed: int = _f(42, "experiment seed (encoder init, splits, views)")
    experiment: str = _f("main", "main: the whole pipeline; scaling: unseen-task retrieval against the number of "
                                 "training tasks (scaling.py; results/scaling unless --experiment_name)",
                         choices=["main", "scaling"])
    experiment_name: str = _f("default", "name of the results folder results/<experiment_name>")
    results_dir: str = _f("results", "parent directory of experiment folders")
    device: str = _f("auto", "auto|cpu|cuda", choices=["auto", "cpu", "cuda"])
    small: bool = _f(False, "quick run (~1 minute): small zoo, few epochs")
    skip_training: bool = _f(False, "evaluate randomly initialised encoders (clearly labelled)")
    resume: bool = _f(False, "resume every encoder training of this run from its own checkpoint "
                             "(<results_dir>/<experiment_name>/checkpoints/<model>_<recipe>_seed<seed>/last.pt); "
                             "a finished training is loaded, not redone; a checkpoint of other settings "
                             "(--epochs included) is refused")
    zoo: ZooConfig = field(default_factory=ZooConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))


# Values applied by --small before the config file and explicit flags.
SMALL_PRESET: dict[str, Any] = {
    "experiment_name": "small",  # a quick run never overwrites results/default (--experiment_name still wins)
    "zoo": {"zoo_dir": "zoo/small", "zoo_tasks": 48},  # 3-4 tasks of each shape group, 6 runs each
    "encoder": {"hidden_dim": 32, "global_dim": 64, "message_passing_steps": 2},
    "train": {"epochs": 2, "batch_size": 64, "compare_epochs": 0},
    "eval": {"eval_seeds": 1, "transfer_tasks": 1, "transfer_steps": 60, "transfer_k": 3, "merge_pairs": 2,
             "symmetry_queries": 100},
}


class ConfigError(ValueError):
    """A config key or value that does not fit the schema."""


def _sections(cls: type = ExperimentConfig) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _leaf_fields() -> dict[str, tuple[str | None, dataclasses.Field, type]]:
    """flat name -> (section or None, field, type). Asserts names are unique."""
    out: dict[str, tuple[str | None, dataclasses.Field, type]] = {}
    top_hints = typing.get_type_hints(ExperimentConfig)
    sections = _sections()
    for f in dataclasses.fields(ExperimentConfig):
        if f.name not in sections:
            out[f.name] = (None, f, top_hints[f.name])
    for sec, cls in sections.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in out, f"config field name {f.name!r} is not unique across sections"
            out[f.name] = (sec, f, hints[f.name])
    return out


def _check_value(where: str, value: Any, typ: type, f: dataclasses.Field) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: expected {typ.__name__}, got {type(value).__name__} ({value!r})")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {choices}")
    return value


def apply_overrides(cfg: ExperimentConfig, overrides: dict, source: str) -> ExperimentConfig:
    """Apply a nested dict (as in a config file) onto ``cfg``; unknown keys raise ConfigError."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(overrides).__name__}")
    sections = _sections()
    leaves = _leaf_fields()
    for key, value in overrides.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section {key!r} must be a mapping")
            sub = getattr(cfg, key)
            for k, v in value.items():
                if k not in leaves or leaves[k][0] != key:
                    raise ConfigError(f"{source}: unknown key {key}.{k}; known: "
                                      f"{sorted(n for n, (s, _, _) in leaves.items() if s == key)}")
                _, f, typ = leaves[k]
                setattr(sub, k, _check_value(f"{source}: {key}.{k}", v, typ, f))
        elif key in leaves and leaves[key][0] is None:
            _, f, typ = leaves[key]
            setattr(cfg, key, _check_value(f"{source}: {key}", value, typ, f))
        else:
            raise ConfigError(f"{source}: unknown key {key!r}; known top-level keys: "
                              f"{sorted([n for n, (s, _, _) in leaves.items() if s is None] + list(sections))}")
    return cfg


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file (safe loader); errors name the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e})") from e
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({e})") from e
    return data or {}


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="weightzoo: learn embeddings of trained networks from their weights, evaluate, report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default="", help="YAML/JSON config file (nested by section)")
    p.add_argument("--gpu", action="store_true", help="alias of --device cuda")
    for name, (sec, f, typ) in _leaf_fields().items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: {default})"}
        if typ is bool:
            kw.update(type=_bool, nargs="?", const=True, metavar="BOOL")
        elif typ is list:
            kw.update(nargs="+", type=type(default[0]) if default else str)
        else:
            kw["type"] = typ
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        p.add_argument(*flags, dest=name, **kw)
    return p


def _nest(flat: dict) -> dict:
    leaves = _leaf_fields()
    nested: dict = {}
    for k, v in flat.items():
        sec = leaves[k][0]
        (nested.setdefault(sec, {}) if sec else nested)[k] = v
    return nested


def parse_args(argv: Sequence[str] | None = None) -> ExperimentConfig:
    """CLI -> resolved ExperimentConfig (defaults < --small < --config < flags)."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    config_file = ns.pop("config")
    if ns.pop("gpu"):
        ns["device"] = "cuda"
    cfg = ExperimentConfig()
    try:
        small = ns.get("small", False)
        file_overrides = load_config_file(config_file) if config_file else {}
        if not small and isinstance(file_overrides, dict):
            small = bool(file_overrides.get("small", False))
        if small:
            apply_overrides(cfg, SMALL_PRESET, "--small preset")
        experiment = ns.get("experiment", file_overrides.get("experiment") if isinstance(file_overrides, dict) else None)
        if experiment == "scaling":  # its own results folder unless named (a later --experiment_name wins)
            apply_overrides(cfg, {"experiment_name": "small_scaling" if small else "scaling"}, "--experiment scaling")
        if file_overrides:
            apply_overrides(cfg, file_overrides, config_file)
        apply_overrides(cfg, _nest(ns), "command line")
    except ConfigError as e:
        parser.error(str(e))
    return cfg


def config_from_dict(d: dict, source: str = "dict") -> ExperimentConfig:
    """Build a config from a nested dict (e.g. a saved results.json config)."""
    return apply_overrides(ExperimentConfig(), d, source)
