"""`python -m worker model register | alias | list | show | rm` (README "Models and deployments"): thin wrappers over
worker.models. A refusal prints one line naming what is wrong and exits 2, with nothing changed."""
from __future__ import annotations

import argparse
from typing import Any

from worker.cliutil import (
    acting_user,
    add_mine,
    checked_connection,
    human_bytes,
    owner_filter,
    print_json,
    refusing,
    timestamp,
)
from worker.errors import ArtifactError, ModelError

_refusing = refusing(ModelError, ArtifactError)


def cmd_register(args: argparse.Namespace) -> int:
    from worker.models import register

    conn = checked_connection()
    version = register(conn, args.job, args.name, actor=acting_user(conn))
    print(f"registered {version.ref} from job {version.job_id} (serves {version.deploy}; test accuracy "
          f"{version.metrics.get('accuracy', float('nan')):.4f})")
    print(version.ref)
    return 0


def cmd_alias(args: argparse.Namespace) -> int:
    from worker.models import remove_alias, set_alias

    conn = checked_connection()
    if args.delete:
        remove_alias(conn, args.name, args.alias, actor=acting_user(conn))
        print(f"removed alias {args.name}@{args.alias}")
        return 0
    if args.version is None:
        raise ModelError("give the VERSION the alias should point at (or --delete)")
    before = set_alias(conn, args.name, args.alias, args.version, actor=acting_user(conn))
    moved = f" (was {before})" if before is not None and before != args.version else ""
    print(f"{args.name}@{args.alias} → {args.version}{moved}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from worker.models import list_models, summary

    conn = checked_connection()
    rows = [summary(conn, name) for name in list_models(conn, owner=owner_filter(args, conn))]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no models registered (python -m worker model register JOB --name NAME)")
    for r in rows:
        aliases = ", ".join(f"{a}→{v}" for a, v in sorted(r["aliases"].items())) or "-"
        acc = r["metrics"].get("accuracy")
        print(f"{r['name']:<24} latest {r['latest']:<4} versions {len(r['versions']):<3} aliases {aliases:<24} "
              f"accuracy {'-' if acc is None else f'{acc:.4f}'}  owner {','.join(r['owners'])}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from worker.models import describe, model_versions, parse_ref, resolve

    conn = checked_connection()
    ref = parse_ref(args.ref)
    versions = [resolve(conn, ref)] if ref.version or ref.alias else model_versions(conn, ref.name)
    if not versions:
        resolve(conn, ref)  # the "no such model" error
    shown = [describe(conn, v) for v in versions]
    if args.json:
        print_json(shown[0] if ref.version or ref.alias else shown)
        return 0
    for v in shown:
        print(f"{v['ref']}  from job {v['job_id']} ({v['job_name']}), {timestamp(v['created_at'])} by {v['owner']}"
              + (f"  aliases: {', '.join(v['aliases'])}" if v["aliases"] else ""))
        print(f"  dataset {v['dataset'] or '-'}  serves {v['deploy']}: {v['deploy_reason']}")
        print("  metrics " + ", ".join(f"{k} {val:.4g}" for k, val in v["metrics"].items() if val is not None))
        print("  files " + ", ".join(f"{f} ({human_bytes(n)})" for f, n in v["files"].items()))
        if v.get("mlflow"):
            print(f"  mlflow {v['mlflow']['uri']} at {v['mlflow']['tracking_uri']}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from worker.deployments import in_use
    from worker.models import remove

    conn = checked_connection()
    for v in remove(conn, args.ref, in_use=in_use(conn), actor=acting_user(conn)):
        print(f"removed {v.ref}")
    return 0


def _positive(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1; got {text!r}")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    from worker.serving.server import ServeOptions, serve

    return serve(checked_connection(), args.ref, ServeOptions(
        host=args.host, port=args.port, max_batch=1 if args.no_batching else args.max_batch,
        max_delay_ms=args.max_delay_ms, use_gpu=args.gpu, instances=args.instances, deployment=args.deployment))


def cmd_deploy(args: argparse.Namespace) -> int:
    from worker.deployments import create

    conn = checked_connection()
    dep, token = create(conn, args.ref, replicas=args.replicas, gpus=args.gpus, max_batch=args.max_batch,
                        max_delay_ms=args.max_delay_ms, actor=acting_user(conn))
    print(f"deployment {dep.id} of {dep.ref}: {dep.replicas} replica(s), starting on the workers "
          "(python -m worker deployments shows their URLs)")
    print(f"bearer token (shown once; clients send Authorization: Bearer TOKEN): {token}")
    print(dep.id)
    return 0


def cmd_deployments(args: argparse.Namespace) -> int:
    from worker.deployments import listing

    conn = checked_connection()
    rows = listing(conn, owner=owner_filter(args, conn))
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no deployments (python -m worker deploy MODEL_REF)")
    for d in rows:
        where = ", ".join(f"{h.get('url') or '-'} on {h['worker']} ({h.get('state')})" for h in d["replica_hosts"])
        print(f"{d['id']}  {d['ref']:<24} {d['state']:<9} {d['owner']:<12} {where or 'no worker yet'}"
              + (f"  waiting: {d['waiting']}" if d["waiting"] else "")
              + (f"  error: {d['error']}" if d["error"] else ""))
    return 0


def cmd_deploy_token(args: argparse.Namespace) -> int:
    from worker.deployments import revoke_token, rotate_token

    conn = checked_connection()
    if args.revoke:
        revoke_token(conn, args.id, actor=acting_user(conn))
        print(f"deployment {args.id}: every token revoked (requests get 401 within a second; "
              f"python -m worker deploy-token {args.id} --rotate issues a new one)")
        return 0
    token = rotate_token(conn, args.id, actor=acting_user(conn))
    print(f"deployment {args.id}: new bearer token (shown once; the old one stops working within a second): {token}")
    return 0


def cmd_undeploy(args: argparse.Namespace) -> int:
    from worker.deployments import stop

    conn = checked_connection()
    dep = stop(conn, args.id, actor=acting_user(conn))
    print(f"deployment {dep.id} stopped (its servers end within seconds)")
    return 0


def add_model_commands(sub: Any) -> None:
    """`model register|alias|list|show|rm` under the `python -m worker` subparsers `sub`."""
    p = sub.add_parser("model", help="the model registry (register, alias, list, show, rm)")
    msub = p.add_subparsers(dest="model_command", required=True)
    s = msub.add_parser("register", help="make a new version of NAME from a finished, exported job")
    s.add_argument("job")
    s.add_argument("--name", required=True, help="lower-case letters, digits, . _ - (1-64 characters)")
    s.set_defaults(func=_refusing(cmd_register))
    s = msub.add_parser("alias", help="point ALIAS (production, staging, any name) at VERSION of NAME")
    s.add_argument("name")
    s.add_argument("alias")
    s.add_argument("version", type=int, nargs="?")
    s.add_argument("--delete", action="store_true", help="remove the alias instead")
    s.set_defaults(func=_refusing(cmd_alias))
    s = msub.add_parser("list", help="every registered model with its latest version and aliases")
    s.add_argument("--json", action="store_true")
    add_mine(s)
    s.set_defaults(func=_refusing(cmd_list))
    s = msub.add_parser("show", help="a model's versions (or one: NAME:VERSION or NAME@ALIAS)")
    s.add_argument("ref", metavar="NAME[:VERSION|@ALIAS]")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_refusing(cmd_show))
    s = msub.add_parser("rm", help="remove a version (NAME:VERSION) or a whole model (NAME); refused while served")
    s.add_argument("ref", metavar="NAME[:VERSION]")
    s.set_defaults(func=_refusing(cmd_rm))
    s = sub.add_parser("serve", help="serve a model version in the foreground (Open Inference Protocol v2)")
    s.add_argument("ref", metavar="MODEL_REF", help="NAME (latest), NAME:VERSION or NAME@ALIAS (followed as it moves)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback; elsewhere a bearer "
                                                        "token is required: SERVE_TOKEN, or one is made)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--max-batch", type=int, default=32, help="most samples per model run (dynamic batching)")
    s.add_argument("--max-delay-ms", type=float, default=0.0,
                   help="how long a batch waits for more requests after its first (0: none; batches still form "
                        "while the model is busy)")
    s.add_argument("--no-batching", action="store_true", help="one request per model run")
    s.add_argument("--instances", type=_positive, metavar="N",
                   help="model runs at once (default: 2 on a CPU of 2 cores or more, 1 on a GPU)")
    s.add_argument("--gpu", action="store_true", help="use CUDA/TensorRT execution providers when present")
    s.add_argument("--deployment", metavar="ID", help="accept this managed deployment's tokens, read live from Redis "
                                                      "(how the workers start their servers)")
    s.set_defaults(func=_refusing(cmd_serve))
    s = sub.add_parser("deploy", help="serve a model on the workers (managed; prints the deployment id last)")
    s.add_argument("ref", metavar="MODEL_REF", help="NAME, NAME:VERSION or NAME@ALIAS (followed as it moves)")
    s.add_argument("--replicas", type=int, default=1)
    s.add_argument("--gpus", type=int, default=0, help="GPUs per replica: hosted only by a worker with that many "
                                                       "GPUs free of its training job; CUDA/TensorRT providers there")
    s.add_argument("--max-batch", type=int, default=32)
    s.add_argument("--max-delay-ms", type=float, default=0.0)
    s.set_defaults(func=_refusing(cmd_deploy))
    s = sub.add_parser("deployments", help="every deployment: id, state, url, worker")
    s.add_argument("--json", action="store_true")
    add_mine(s)
    s.set_defaults(func=_refusing(cmd_deployments))
    s = sub.add_parser("deploy-token", help="a deployment's bearer token: --rotate (prints the new one) or --revoke")
    s.add_argument("id")
    how = s.add_mutually_exclusive_group(required=True)
    how.add_argument("--rotate", action="store_true", help="issue a new token; the old one stops working")
    how.add_argument("--revoke", action="store_true", help="no token works until the next --rotate")
    s.set_defaults(func=_refusing(cmd_deploy_token))
    s = sub.add_parser("undeploy", help="stop a deployment")
    s.add_argument("id")
    s.set_defaults(func=_refusing(cmd_undeploy))
