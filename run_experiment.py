"""weightzoo experiment: zoo -> graphs -> contrastive encoder -> embeddings -> evaluation -> report.

    python run_experiment.py --seed 42 --epochs 50
    python run_experiment.py --small --epochs 1          # about a minute
    python run_experiment.py --small --resume            # after a crash: each training from its own last.pt
    python run_experiment.py --experiment scaling        # unseen-task P@10 against the number of training tasks
    python run_experiment.py --hyperreps --experiment_name hyperreps   # + the seed-004 beta ablation (hyperreps.py)
    torchrun --standalone --nproc_per_node=2 run_experiment.py --small

Every stage is recorded in results/<experiment>/results.json with its status and time;
a stage that fails is reported as failed and the stages that need it as skipped.
The stage functions live in stages.py; main() below is the whole pipeline: each stage's
value is passed to the stages that use it, and ``depends_on`` names those producers.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from config import parse_args
from report import RunRecorder, git_commit, package_versions, setup_logging

log = logging.getLogger("weightzoo")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    import hyperreps as H  # heavy imports (torch, PyG) after argument parsing, so --help is instant
    import stages as S

    dist = S.setup(cfg)
    run_dir = Path(cfg.results_dir) / cfg.experiment_name
    if dist.is_master:
        (run_dir / "figures").mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir / "log.txt")
    results = {"experiment": cfg.experiment_name, "config": cfg.to_dict(), "seed": cfg.seed,
               "seeds": S.eval_seeds(cfg), "versions": package_versions(), "git_commit": git_commit(Path(__file__).parent),
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(dist.device),
               "world_size": dist.world_size, "skip_training": cfg.skip_training}
    rec = RunRecorder(run_dir, results, write=dist.is_master)
    if dist.is_master:
        cfg.save(run_dir / "config.json")
    t0 = time.perf_counter()

    zoo = rec.run("zoo", S.make_zoo, cfg, dist, rec)
    graphs = rec.run("graphs", S.make_graphs, cfg, zoo, dist, depends_on=("zoo",))
    if cfg.experiment == "scaling":  # its own experiment: scaling.py
        import scaling

        rec.run("scaling", scaling.run_scaling, cfg, zoo, graphs, dist, rec, depends_on=("graphs",))
        return _finish(results, rec, run_dir, t0, dist, S)
    splits = rec.run("split", S.make_splits, cfg, zoo, rec, depends_on=("zoo",))  # seed -> its split
    recipes = rec.run("recipe_comparison", S.compare_recipes, cfg, zoo, graphs, splits, dist, rec,
                      depends_on=("graphs", "split"))  # seed -> its recipes
    seeds = S.eval_seeds(cfg)
    runs: dict[int, S.Methods] = {}  # seed -> every method that got that far
    per_seed: dict[str, list] = {}
    for seed in seeds:
        split = (splits or {}).get(seed)  # None when a stage it needs did not finish: its dependents are skipped
        trained = rec.run(f"train_embed_seed{seed}", S.train_and_embed, cfg, zoo, graphs, split,
                          (recipes or {}).get(seed), seed, dist, run_dir / "checkpoints", rec,
                          depends_on=("graphs", "split", "recipe_comparison"))
        hyper = None
        if cfg.recon.hyperreps:
            hyper = rec.run(f"hyperreps_seed{seed}", H.train_hyperreps, cfg, zoo, graphs, split, seed, dist,
                            run_dir / "checkpoints", rec, depends_on=("graphs", "split"))
        if not dist.is_master:
            continue
        fitted = rec.run(f"baselines_seed{seed}", S.baseline_embeddings, cfg, zoo, split, seed, rec, depends_on=("split",))
        runs[seed] = S.Methods.join(trained, fitted, hyper)
        for method, emb in {**runs[seed].embeddings, **runs[seed].oracles}.items():
            per_seed.setdefault(method, []).append(
                rec.run(f"evaluate[{method}]_seed{seed}", S.evaluate_method, cfg, zoo, split, emb, seed, method))
    if dist.is_master:
        # the protocols below reuse the first seed's split, encoders, baselines and embeddings (transfer: every seed's)
        first, made_by = runs.get(seeds[0]), (f"train_embed_seed{seeds[0]}", f"baselines_seed{seeds[0]}")
        split = (splits or {}).get(seeds[0])
        rec.run("aggregate", S.aggregate, per_seed, rec, depends_on=("split",))
        rec.run("same_architecture", S.same_architecture, cfg, zoo, graphs, splits, recipes, runs, dist, rec,
                depends_on=("graphs", "split", "recipe_comparison"))
        rec.run("symmetry_robustness", S.symmetry_robustness, cfg, zoo, split, first, rec, depends_on=("split", *made_by))
        rec.run("merging", S.merging, cfg, zoo, first, rec, depends_on=("zoo", made_by[0]))
        rec.run("transfer", S.transfer, cfg, zoo, splits or {}, runs, rec, depends_on=("split", *made_by))
        rec.run("embedding_map", S.embedding_map, cfg, zoo, split, first, rec, depends_on=("split", *made_by))
    return _finish(results, rec, run_dir, t0, dist, S)


def _finish(results: dict, rec: RunRecorder, run_dir: Path, t0: float, dist, S) -> dict:
    """Total time and the report (master), then the process group is left."""
    if dist.is_master:
        results["timings"]["total"] = round(time.perf_counter() - t0, 2)
        rec.run("report", S.write_report, run_dir, rec)
        log.info("results in %s (%.1f s)", run_dir, time.perf_counter() - t0)
    S.teardown(dist)
    return results


if __name__ == "__main__":
    main()
