"""The ``distill`` command line.

distill data fetch                      fetch and build the bundled demo data
distill annotate CONFIG [--set k=v]... [--summary-json PATH] [--no-progress]
distill run CONFIG [--set k=v]... [--summary-json PATH] [--dry-run]   the whole DAG, ending in the gate
distill plan CONFIG [--set k=v]... [--json PATH]   requests, tokens, $ and time, before any request
distill predict FILE [--model models:/NAME@champion] [--output OUT] [--config predict.yaml]
distill teacher start|stop|status       a long-lived local teacher for repeated runs
distill up [--prefect-port P] [--mlflow-port M] [--labelstudio]   local Prefect + MLflow (+ Label Studio) servers
distill down | distill status           stop them / say what runs
distill serve [CONFIG] [--on-demand-config C] [--predict-config P]   serve the deployments
distill review export CONFIG [--select low_confidence|disagreement|random] [--n N] [--format F --out FILE]
distill review import CONFIG            reviewers' labels from Label Studio into a new human-label version
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

from distill.runtime import set_quiet_env

set_quiet_env()


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from distill.config import load_config

    return load_config(args.config, args.set)


def _write_summary_json(path: Optional[str], summary: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=2, default=str))
        print(f"  summary JSON: {path}")


def cmd_plan(args: argparse.Namespace) -> int:
    from tasks.pipeline.stages import plan_run
    from tasks.teacher.plan import plan_text

    cfg = _load(args)
    plan = plan_run(cfg)
    print(f"== distill plan: {cfg.run_name} (nothing sent) ==")
    print(plan_text(plan))
    _write_summary_json(args.json, plan.as_dict())
    return 0


def _print_plan(summary: dict, args: argparse.Namespace) -> int:
    print("== distill plan (dry run: nothing sent) ==")
    print(summary["plan_text"])
    _write_summary_json(args.summary_json, summary["plan"])
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    from flows.annotate import annotate_flow
    from tasks.pipeline.report import terminal_summary

    cfg = _load(args)
    summary = annotate_flow(cfg, show_progress=not args.no_progress, dry_run=args.dry_run)
    if args.dry_run:
        return _print_plan(summary, args)
    print("\n== distill annotate: summary ==")
    print(terminal_summary(summary))
    print(f"  votes written to {summary['votes_dir']}")
    _write_summary_json(args.summary_json, summary)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flows.distillation import distill_flow
    from tasks.pipeline.report import terminal_summary

    cfg = _load(args)
    summary = distill_flow(cfg, show_progress=not args.no_progress, dry_run=args.dry_run, fresh=args.fresh)
    if args.dry_run:
        return _print_plan(summary, args)
    ann = cfg.run_dir / "annotation_summary.json"
    if ann.exists():
        print("\n== annotation and vote ==")
        print(terminal_summary(json.loads(ann.read_text())))
    print("\n" + summary["table"])  # each task type's table opens with its own heading
    _write_summary_json(args.summary_json, {k: v for k, v in summary.items() if k != "table"})
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """The batch-predict flow on a file: every item labelled, written as Parquet (or CSV), logged to MLflow."""
    from distill.config import ConfigError, PredictConfig, config_from_dict, read_yaml

    raw: dict = read_yaml(Path(args.config), ConfigError, "predict config") if args.config else {}
    out = args.output or str(Path(args.file).with_suffix(".predictions.parquet"))
    raw.update({"input_path": args.file, "output_path": out})
    for key, val in (
        ("model_uri", args.model),
        ("text_column", args.text_column),
        ("id_column", args.id_column),
        ("shard_rows", args.batch_rows),
        ("tracking_uri", args.tracking_uri),
    ):
        if val is not None:
            raw[key] = val
    cfg = config_from_dict(raw, source=args.config or "distill predict", model=PredictConfig)
    from flows.batch_predict import batch_predict_flow

    s = batch_predict_flow(cfg)
    d = s["data"]
    print(
        f"labelled {s['items']:,} items -> {s['output_path']} with {s['model_uri']} (version {s['model_version']}); "
        f"{d['empty_text']} empty texts and {d['duplicate_ids']} repeated ids set aside"
    )
    if s["items_per_s"]:
        print(
            f"{s['items_per_s']:.1f} items/s, ${s['usd']:.6f} ({s['usd_method']}), "
            f"{s['kwh'] if s['kwh'] is not None else 'n/a'} kWh; MLflow run {s['mlflow_run_id']}"
        )
    import pandas as pd

    df = pd.read_csv(out) if out.endswith(".csv") else pd.read_parquet(out)
    if "label" in df:  # a classifier: how many of each label
        print(df["label"].value_counts().to_string())
    elif "text" in df:  # a generator: a few of its texts
        print("\n".join(f"  {t}" for t in df["text"].head(3)))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from tasks.data.demo import prepare_demo_data

    for info in prepare_demo_data(args.data_dir):
        what = (
            f"gold labels {info['labels']}"
            if "labels" in info  # a labelled corpus
            else f"human references ({info.get('repaired_mojibake_fields', 0)} repaired fields)"
        )  # a generation corpus (XSum)
        print(f"{info['corpus']}: pool {info['pool']}, dev {info['dev']}, gold {info['gold']}, {what}")
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    from tasks.teacher import local_server as lt

    if args.action == "start":
        st = lt.read_state()
        if st is not None and lt.healthy(st.base_url):
            print(f"already running: {st.base_url} (pid {st.pid})")
            return 0
        cfg = _load(args) if args.config else None
        t = cfg.teacher if cfg else None
        st = lt.start_server(
            t.gguf_path if t else None,
            n_ctx=t.n_ctx if t else 2048,
            n_threads=t.n_threads if t else 2,
            n_parallel=t.n_parallel if t else 1,
            alias=t.model if t else "teacher",
            startup_timeout_s=t.startup_timeout_s if t else 120.0,
        )
        print(f"started: {st.base_url} (pid {st.pid}, model {st.model_path}, log {st.log_path})")
        return 0
    if args.action == "stop":
        print("stopped" if lt.stop_server() else "not running")
        return 0
    st = lt.read_state()
    if st is None:
        print("not running")
        return 1
    ok = lt.healthy(st.base_url)
    print(f"{'healthy' if ok else 'UNHEALTHY'}: {st.base_url} (pid {st.pid}, model {st.model_path})")
    return 0 if ok else 1


def cmd_up(args: argparse.Namespace) -> int:
    from distill import servers

    got = servers.up(
        args.workdir,
        args.prefect_port,
        args.mlflow_port,
        prefect_database_url=args.prefect_database_url,
        mlflow_backend_uri=args.mlflow_backend_uri,
        mlflow_artifacts=args.mlflow_artifacts,
        which=("prefect", "mlflow", "labelstudio") if args.labelstudio else ("prefect", "mlflow"),
        labelstudio_port=args.labelstudio_port,
        timeout_s=240.0 if args.labelstudio else 120.0,
    )
    p, m = got["prefect"], got["mlflow"]
    print(f"Prefect UI   {p.ui}   (API {p.url}, pid {p.pid}, log {p.log})")
    print(f"MLflow UI    {m.ui}   (tracking and registry {m.url}, pid {m.pid}, log {m.log})")
    if "labelstudio" in got:
        ls = got["labelstudio"]
        cred = servers.state_dir(args.workdir) / "servers" / "labelstudio" / "credentials.json"
        print(
            f"Label Studio {ls.ui}   (pid {ls.pid}, log {ls.log}; sign in as distill@localhost, password and API "
            f"token in {cred}: distill commands here read the token themselves)"
        )
    print(
        f"written to {servers.state_dir(args.workdir) / 'servers.json'}: every distill command here uses these "
        f"servers; elsewhere `set -a; . {servers.state_dir(args.workdir) / 'servers.env'}; set +a`"
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from distill import servers

    stopped = servers.down(args.workdir)
    print("stopped: " + ", ".join(stopped) if stopped else "nothing was running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from distill import servers

    st = servers.status(args.workdir)
    if not st:
        print("no servers started here (distill up starts them)")
        return 1
    for name, s in st.items():
        print(
            f"{name:<8} {'healthy' if s['healthy'] else 'DOWN' if not s['alive'] else 'UNHEALTHY'}  {s['ui']}  "
            f"(pid {s['pid']}, log {s['log']})"
        )
    return 0 if all(s["healthy"] for s in st.values()) else 1


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from distill.config import load_config
    from distill.servers import ServerError

    if not os.environ.get("PREFECT_API_URL"):
        raise ServerError(
            "distill serve needs a Prefect server to register its deployments with: run `distill up` "
            "here first, or set PREFECT_API_URL"
        )
    from flows.deployments import distill_deployments, serve_deployments

    nightly = load_config(args.config, args.set)
    on_demand = load_config(args.on_demand_config) if args.on_demand_config else None
    deps = distill_deployments(nightly, on_demand)
    if args.predict_config:
        from distill.config import ConfigError, PredictConfig, config_from_dict, read_yaml
        from flows.deployments import batch_deployment

        raw = read_yaml(Path(args.predict_config), ConfigError, "predict config")
        deps.append(batch_deployment(config_from_dict(raw, source=args.predict_config, model=PredictConfig)))
    print(
        f"serving {', '.join(d.flow_name + '/' + d.name for d in deps)} on {os.environ['PREFECT_API_URL']} "
        f"(nightly: {nightly.schedule.cron} {nightly.schedule.timezone}); Ctrl-C or SIGTERM stops (and pauses them)"
    )
    serve_deployments(deps, args.limit)
    return 0


def _labels_of(cfg: Any) -> list[str]:
    from tasks.templates.load import load_prompt

    labels = list(getattr(load_prompt(cfg.prompt), "labels", None) or [])
    if not labels:
        from distill.config import ConfigError

        raise ConfigError(f"{cfg.prompt}: human review needs a label prompt (task: classify)")
    return labels


def cmd_review(args: argparse.Namespace) -> int:
    from tasks.review.loop import export_review, import_review, log_import

    cfg = _load(args)
    labels = _labels_of(cfg)
    if args.action == "export":
        ex = export_review(
            run_dir=cfg.run_dir,
            review=cfg.review,
            tracking=cfg.tracking,
            labels=labels,
            how=args.select,
            n=args.n,
            seed=args.seed,
            max_length=getattr(cfg.student, "max_length", 128),
            fmt=args.format,
            out=Path(args.out) if args.out else None,
        )
        short = f" (only {ex.selected} qualified)" if ex.selected < args.n else ""
        if args.format == "labelstudio":
            print(
                f"{ex.selected} items chosen by {args.select}{short}: {ex.sent} new tasks sent, "
                f"{ex.already_in_project} already in the project; review them at {ex.where}"
            )
        else:
            print(f"{ex.selected} items chosen by {args.select}{short}, written to {ex.where} ({args.format})")
        return 0
    im = import_review(review=cfg.review, labels=labels, project_id=args.project_id)
    w = im.written
    run_id = log_import(im, tracking=cfg.tracking, review=cfg.review)
    state = f"new version {w.version}" if w.new else f"unchanged: still version {w.version}"
    print(
        f"{im.annotations} annotations of {im.items} items from project {im.project_id} "
        f"({im.skipped} skipped or empty): {state}, {w.path} (digest {w.digest})"
        + (f"; logged to MLflow run {run_id}" if run_id else "")
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Distil a teacher LLM into a cheap student.")
    sub = p.add_subparsers(dest="command", required=True)
    _run_commands(sub)
    _local_commands(sub)
    _server_commands(sub)
    _review_commands(sub)
    return p


def _review_commands(sub: Any) -> None:
    """review export / import: items to reviewers in Label Studio, their labels back as a versioned file."""
    from tasks.review.select import STRATEGIES

    rv = sub.add_parser("review", help="send uncertain items to Label Studio reviewers, import their labels")
    rv.add_argument("action", choices=["export", "import"])
    rv.add_argument("config", help="the run's config: its run folder, labels and review section")
    rv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    rv.add_argument("--select", choices=STRATEGIES, default="low_confidence", help="export: which items")
    rv.add_argument("--n", type=int, default=100, help="export: at most this many items")
    rv.add_argument("--seed", type=int, default=0, help="export: seed of random and of ties")
    rv.add_argument(
        "--format",
        choices=["labelstudio", "labelstudio-json", "argilla-json"],
        default="labelstudio",
        help="export: into Label Studio through its API (default), or a file to import by hand",
    )
    rv.add_argument("--out", help="export: the file for --format labelstudio-json or argilla-json")
    rv.add_argument("--project-id", type=int, help="import: this project instead of the one export recorded")
    rv.set_defaults(func=cmd_review)


def _run_commands(sub: Any) -> None:
    """annotate, run, plan, predict: the commands that take a config or a file."""
    a = sub.add_parser("annotate", help="annotate a pool with the teacher and vote the samples")
    a.add_argument("config", help="YAML run config, e.g. configs/demo.yaml")
    a.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set teacher.samples=5 (repeatable)",
    )
    a.add_argument("--summary-json", help="also write the summary as JSON to this path")
    a.add_argument("--no-progress", action="store_true", help="no progress bar (logs still report progress)")
    a.add_argument("--dry-run", action="store_true", help="only the priced plan, through the flow; nothing is sent")
    a.set_defaults(func=cmd_annotate)

    r = sub.add_parser("run", help="the whole DAG: annotate, vote, train, evaluate, register behind the gate")
    r.add_argument("config")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--summary-json")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--dry-run", action="store_true", help="only the priced plan, through the flow; nothing is sent")
    r.add_argument(
        "--fresh",
        action="store_true",
        help="recompute every stage, even those an earlier run finished with the same inputs",
    )
    r.set_defaults(func=cmd_run)

    pl = sub.add_parser("plan", help="requests, tokens, $ and time of a run, before any request (no Prefect needed)")
    pl.add_argument("config")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--json", help="also write the plan as JSON to this path")
    pl.set_defaults(func=cmd_plan)

    pr = sub.add_parser("predict", help="label a file with a registered student (the batch-predict flow)")
    pr.add_argument("file", help=".csv, .jsonl, .parquet or a saved datasets folder")
    pr.add_argument("--model", help="default models:/distill-student@champion")
    pr.add_argument("--config", help="a PredictConfig YAML (runtime, pricing, energy, ...); the flags win over it")
    pr.add_argument("--text-column")
    pr.add_argument("--id-column")
    pr.add_argument("--output", help="output .parquet or .csv (default: FILE.predictions.parquet)")
    pr.add_argument("--batch-rows", type=int, help="items per shard")
    pr.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    pr.set_defaults(func=cmd_predict)


def _local_commands(sub: Any) -> None:
    """data, teacher: the bundled data and a long-lived local teacher."""
    d = sub.add_parser("data", help="bundled demo data")
    d.add_argument("action", choices=["fetch"])
    d.add_argument("--data-dir", default="data")
    d.set_defaults(func=cmd_data)

    t = sub.add_parser("teacher", help="manage a long-lived local teacher server")
    t.add_argument("action", choices=["start", "stop", "status"])
    t.add_argument("--config", help="take gguf_path, n_ctx, n_threads and model alias from this config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.set_defaults(func=cmd_teacher)


def _server_commands(sub: Any) -> None:
    """up, down, status, serve: local Prefect and MLflow servers and the deployments on them."""
    u = sub.add_parser("up", help="start a Prefect server and an MLflow tracking server on loopback, persistent here")
    u.add_argument("--prefect-port", type=int, default=4200)
    u.add_argument("--mlflow-port", type=int, default=5000)
    u.add_argument(
        "--prefect-database-url",
        help="Prefect's database (default: sqlite under .distill/servers; "
        "or $DISTILL_PREFECT_DATABASE_URL), e.g. postgresql+asyncpg://...",
    )
    u.add_argument(
        "--mlflow-backend-uri",
        help="MLflow's backend store (default: sqlite under .distill/servers; "
        "or $DISTILL_MLFLOW_BACKEND_URI), e.g. postgresql://...",
    )
    u.add_argument(
        "--mlflow-artifacts", help="where MLflow stores artifacts (default .distill/servers/mlflow/artifacts)"
    )
    u.add_argument(
        "--labelstudio", action="store_true", help="also start Label Studio for human review (make labelstudio)"
    )
    u.add_argument("--labelstudio-port", type=int, default=8080)
    u.set_defaults(func=cmd_up)
    dn = sub.add_parser("down", help="stop the servers `distill up` started")
    dn.set_defaults(func=cmd_down)
    stt = sub.add_parser("status", help="which servers run, and are they healthy")
    stt.set_defaults(func=cmd_status)
    sv = sub.add_parser("serve", help="serve the nightly and on-demand deployments on the Prefect server")
    sv.add_argument(
        "config", nargs="?", default="configs/demo.yaml", help="the nightly run's config (and its schedule)"
    )
    sv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sv.add_argument("--on-demand-config", help="defaults of the on-demand form (default: the nightly config)")
    sv.add_argument("--limit", type=int, help="flow runs at once (default: no limit)")
    sv.add_argument(
        "--predict-config", help="also serve the champion's scheduled batch job with this PredictConfig YAML"
    )
    sv.set_defaults(func=cmd_serve)
    for sp in (u, dn, stt):
        sp.add_argument("--workdir", default=".", help="the project folder whose .distill/ holds the servers' state")


# sysexits' EX_TEMPFAIL, "try again later": the run stopped waiting for its batches (teacher.batch.max_wait_s)
EXIT_BATCHES_PENDING = 75


def main(argv: Optional[list[str]] = None) -> int:
    from distill.config import ConfigError
    from distill.runtime import SecretError
    from distill.servers import ServerError, use_servers
    from tasks.accounting.budget import BudgetExhausted
    from tasks.accounting.pricing import PricingError
    from tasks.data.human_labels import HumanLabelsError
    from tasks.data.readers import DataError
    from tasks.pipeline.checkpoints import RunBusy
    from tasks.pipeline.preflight import PreflightError
    from tasks.review.labelstudio import LabelStudioError
    from tasks.review.loop import ReviewError
    from tasks.teacher.batch import BatchesPending
    from tasks.teacher.local_server import TeacherServerError
    from tasks.templates.base import PromptError

    args = build_parser().parse_args(argv)
    if args.command not in ("up", "down", "status"):
        use_servers()  # the servers of `distill up`, when they run (explicit env vars win)
    try:
        return args.func(args)
    except (
        ConfigError,
        DataError,
        PromptError,
        TeacherServerError,
        SecretError,
        PricingError,
        ServerError,
        RunBusy,
        PreflightError,
        ReviewError,
        LabelStudioError,
        HumanLabelsError,
    ) as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    except BatchesPending as e:  # not a failure: the batches run on at the provider; the next run collects them
        print(f"distill: waiting: {e}", file=sys.stderr)
        _write_summary_json(getattr(args, "summary_json", None), e.summary)
        return EXIT_BATCHES_PENDING
    except BudgetExhausted as e:
        print(f"distill: stopped: {e}", file=sys.stderr)
        _write_summary_json(getattr(args, "summary_json", None), e.summary)
        return 3
    except Exception as e:
        if type(e).__name__ == "MlflowException" and "API request to" in str(e):
            # the tracking server went away mid-run (MLflow's client had already retried with backoff)
            url = str(e).split("API request to ", 1)[1].split("/api/", 1)[0]
            print(
                f"distill: error: the MLflow tracking server at {url} stopped answering during the run "
                f"({str(e)[-200:]}). Answers already paid for are in the response cache and finished stages are "
                "recorded in the run folder: start the server again and rerun the same command to finish "
                "without paying or training again.",
                file=sys.stderr,
            )
            return 4
        away = _prefect_api_away(e)
        if away is not None:
            url, started = away
            if not started:
                print(
                    f"distill: error: the Prefect API at {url} is not reachable ({_last_cause(e)}); nothing was "
                    "sent to the teacher. Start it (`distill up`) or unset PREFECT_API_URL to run on a temporary "
                    "local server, then run the same command.",
                    file=sys.stderr,
                )
                return 2
            print(
                f"distill: error: the Prefect API at {url} stopped answering during the run "
                f"({_last_cause(e)}; Prefect's client had retried with backoff). Answers already paid for are in "
                "the response cache and finished stages are recorded in the run folder: start the server again "
                "and rerun the same command to finish without paying or training again.",
                file=sys.stderr,
            )
            if argv is None:  # the process is this command (not a caller in Python): leave now
                _exit_without_draining(4)
            return 4
        raise


def _exit_without_draining(code: int) -> NoReturn:
    """End the process without Prefect's exit-time drain of queued events and logs.

    Why: with the API gone, that drain tries each queued event for about 7 s (Prefect's
    events client makes 11 connection attempts, sleeping between the later ones) and logs
    two error lines per event: measured here, 104 s and 30 lines after the error above, for
    a server that is not there. Nothing of distill's is pending at this point (the cache,
    the checkpoints and the ledger are written as the run goes), so the wait buys nothing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _causes(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: Optional[BaseException] = e
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def _last_cause(e: BaseException) -> str:
    c = _causes(e)[-1]
    return f"{type(c).__name__}: {str(c)[:200]}"


def _prefect_api_away(e: BaseException) -> Optional[tuple[str, bool]]:
    """(Prefect API URL, whether the run had started) when ``e`` comes from that API not answering, else None.

    Why here: Prefect raises its transport error from deep in the engine (task runs keep
    going; the flow's own state update fails last), which users would otherwise read as a
    bare ``httpx.ConnectError`` traceback with no word on what was kept.
    """
    try:
        import httpx
        from prefect.settings import PREFECT_API_URL
    except ImportError:  # pragma: no cover - both are dependencies
        return None
    api = (PREFECT_API_URL.value() or "").rstrip("/")
    if not api:
        return None
    for c in _causes(e):
        if isinstance(c, RuntimeError) and str(c).startswith("Failed to reach API at"):
            return api, False  # the client's version check when the flow starts
        if isinstance(c, httpx.TransportError):
            try:
                url = str(c.request.url)
            except RuntimeError:  # an error raised without its request
                url = ""
            if url.startswith(api):
                return api, True
    return None


if __name__ == "__main__":
    sys.exit(main())
