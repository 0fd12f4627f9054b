"""Prune a finished run: `python -m core.prune RUN_DIR --amount A [--structured] [--finetune-epochs K] --out NEW_RUN_DIR`.

`torch.nn.utils.prune` zeroes weights of every Conv2d and Linear: by default the globally smallest |w| (L1
unstructured, `global_unstructured` over all those layers together), with `--structured` whole output channels per
layer by L2 norm (`ln_structured`, n=2, dim=0; the classifier head is left alone, since removing its rows would remove
classes). The pruning stays a mask (`weight = weight_orig * weight_mask`, recomputed every forward) while the model is
fine-tuned for K epochs, so pruned weights stay exactly zero; only then `prune.remove` makes it permanent.

NEW_RUN_DIR is a complete run folder (config.yaml, labels.json, preprocess.json, split.json, checkpoints/best.pt,
predictions.jsonl, samples/, metrics.jsonl, report.json with a "pruning" section) and is exported like any other run
unless `--no-export`. The fine-tune reuses core.train's optimizer, schedule, loaders, epoch and evaluation functions.

Zeros are still stored densely: model.onnx keeps its size (bundle.zip, being deflated, shrinks). The gain is the
sparsity itself, for runtimes that exploit it, and a starting point for physically slimmer models.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from core import runfolder as rf
from core.config import Config, config_from_dict, save_config
from core.errors import ConfigError, CoreError, exit_code
from core.export import export_run

FINETUNE_LR_SCALE = 0.1
"""Fine-tuning learning rate as a fraction of the run's optim.lr (the model is already trained; no warm-up)."""


def prunable_layers(model: nn.Module, *, structured: bool) -> list[tuple[str, nn.Module]]:
    """Conv2d and Linear layers to prune; structured pruning skips the classifier head (its rows are the classes)."""
    head = getattr(model, "head_name", None)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not (structured and name == head)]


def apply_pruning(model: nn.Module, amount: float, *, structured: bool) -> list[tuple[str, nn.Module]]:
    """Attach the pruning masks (reparametrisation); returns the pruned layers."""
    layers = prunable_layers(model, structured=structured)
    if not layers:
        raise ConfigError(f"model {type(model).__name__} has no Conv2d or Linear layer to prune")
    if structured:
        for _, module in layers:
            prune.ln_structured(module, "weight", amount=amount, n=2, dim=0)
    else:
        prune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured,
                                  amount=amount)
    return layers


def make_permanent(layers: list[tuple[str, nn.Module]]) -> None:
    for _, module in layers:
        prune.remove(module, "weight")


def sparsity_stats(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> dict[str, Any]:
    """Sparsity over the pruned layers' weights, and non-zero / total counts over all of the model's parameters."""
    pruned_total = sum(m.weight.numel() for _, m in layers)
    pruned_zero = sum(int((m.weight == 0).sum()) for _, m in layers)
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {"sparsity": pruned_zero / max(pruned_total, 1), "pruned_layers": len(layers),
            "pruned_layer_params": pruned_total, "nonzero_params": nonzero, "total_params": total,
            "model_sparsity": 1 - nonzero / max(total, 1)}


def _finetune_config(cfg: Config, epochs: int, lr_scale: float) -> Config:
    """The run's config for fine-tuning: K epochs, lower lr, no warm-up, every layer trainable, no compile."""
    lr = float(f"{cfg.optim.lr * lr_scale:.6g}")  # 0.0003, not 0.00030000000000000003, in the report
    return config_from_dict(cfg.to_dict(), [f"train.epochs={max(epochs, 1)}", f"optim.lr={lr}",
                                            "sched.warmup_epochs=0", "model.freeze=none", "train.compile=false"])


def prune_run(run_dir: str | Path, out_dir: str | Path, *, amount: float, structured: bool = False,
              finetune_epochs: int = 1, lr_scale: float = FINETUNE_LR_SCALE, export: bool = True) -> dict[str, Any]:
    """Prune, fine-tune and evaluate `run_dir`'s best checkpoint into the new run folder `out_dir`; returns its report."""
    from core import train as T
    from core.data import build_datasets
    from core.events import JsonlSink, MultiSink, PrintSink, sink_from_env

    t0 = time.time()
    if not 0 < amount < 1:
        raise ConfigError(f"--amount: must be a fraction between 0 and 1 (exclusive), got {amount}")
    if finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs: must be >= 0, got {finetune_epochs}")
    run = rf.load_run(run_dir)
    out = Path(out_dir)
    if out.resolve() == run.path.resolve():
        raise ConfigError(f"--out: {str(out)!r} is the source run; choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out: {str(out)!r} is not empty; choose a new folder")
    cfg = run.cfg
    ft_cfg = _finetune_config(cfg, finetune_epochs, lr_scale)
    use_cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    device = torch.device("cuda" if use_cuda else "cpu")
    T.seed_everything(cfg.train.seed)

    (out / rf.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    sink = MultiSink(JsonlSink(out / rf.METRICS), PrintSink(), sink_from_env())
    stop_flag = {"stop": False}
    T.install_sigterm(stop_flag)
    try:
        rt = T.Runtime.create(ft_cfg, device, sink=sink, stop_flag=stop_flag)
        sink.emit("phase", {"phase": "data"})
        bundle = build_datasets(cfg)
        classes = run.classes
        model = rf.build_model(run).to(device)  # NCHW while pruning: global_unstructured views weights as vectors
        loaders = T.make_loaders(ft_cfg, bundle, rt.info, device)

        def evaluate(split: str) -> tuple[dict[str, Any], dict]:
            return T.evaluate_split(rt, model, loaders, split, classes)

        before, _ = evaluate("test")
        layers = apply_pruning(model, amount, structured=structured)
        if rt.channels_last:  # for the fine-tuning and evaluation that follow
            model = model.to(memory_format=torch.channels_last)
        pruned_only, _ = evaluate("test")
        print(f"prune: test accuracy {before['accuracy']:.4f} before, {pruned_only['accuracy']:.4f} right after "
              f"pruning {amount:g} ({'structured' if structured else 'global unstructured'})", flush=True)

        sink.emit("start", {"epochs": finetune_epochs, "world_size": 1, "classes": classes, "counts": bundle.counts,
                            "config": ft_cfg.to_dict(), "device": str(device), "resumed_from": None,
                            "pruning": {"source_run": str(run.path), "amount": amount, "structured": structured}})
        best_val, _ = evaluate("val")
        best_epoch, best_state = 0, {k: v.detach().clone() for k, v in model.state_dict().items()}
        if finetune_epochs:
            sink.emit("phase", {"phase": "train"})
            state = T.create_train_state(rt, model, len(loaders["train"]))
            for epoch in range(1, finetune_epochs + 1):
                T.set_epoch(loaders, ft_cfg, epoch, rt.info)
                stats = T.train_one_epoch(rt, state, loaders["train"], epoch)
                val, _ = evaluate("val")
                if val["accuracy"] > best_val["accuracy"]:
                    best_val, best_epoch = val, epoch
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                state.best_val_acc = best_val["accuracy"]
                sink.emit("epoch", T.epoch_event(rt, state, epoch, stats, val))
        model.load_state_dict(best_state)  # masks included: the chosen weights are pruned like the others
        make_permanent(layers)

        sink.emit("phase", {"phase": "test"})
        test, test_out = evaluate("test")
        stats = sparsity_stats(model, layers)
        pruning = {"amount": amount, "structured": structured, "method": "ln_structured n=2 dim=0 per layer"
                   if structured else "global_unstructured L1", **stats,
                   "before": {"test_accuracy": before["accuracy"]},
                   "pruned_before_finetune": {"test_accuracy": pruned_only["accuracy"]},
                   "after": {"test_accuracy": test["accuracy"]},
                   "finetune_epochs": finetune_epochs, "best_epoch": best_epoch,
                   "finetune_lr": ft_cfg.optim.lr, "source_run": str(run.path)}

        rf.save_best_checkpoint(out / rf.BEST_CHECKPOINT, model, epoch=best_epoch, cfg=cfg, val_metrics=best_val)
        save_config(cfg, out / rf.CONFIG)
        for name in (rf.LABELS, rf.PREPROCESS, rf.SPLIT):
            if (run.path / name).exists():
                shutil.copyfile(run.path / name, out / name)
        report = {
            "test": test,
            "val": {**best_val, "epoch": best_epoch},
            "data": run.report.get("data", {}),
            "skipped_files": run.report.get("skipped_files", []),
            "epochs_completed": finetune_epochs,
            "world_size": 1,
            "device": str(device),
            "seconds": time.time() - t0,
            "model": {"name": cfg.model.name, "parameters": stats["total_params"],
                      "nonzero_parameters": stats["nonzero_params"]},
            "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
            "pruning": pruning,
        }
        report["misclassified"] = T.write_predictions(out, bundle, test_out, classes)
        report["samples"] = T.write_samples(out, bundle, classes)
        rf.write_json(out / rf.REPORT, report)
        sink.emit("report", {k: v for k, v in report.items() if k != "misclassified"})
        print(f"prune: sparsity {stats['sparsity']:.4f} over {stats['pruned_layers']} layers, test accuracy "
              f"{before['accuracy']:.4f} → {test['accuracy']:.4f} after {finetune_epochs} fine-tune epoch(s)", flush=True)
        if export:
            sink.emit("phase", {"phase": "export"})
            export_run(out)
            report = rf.read_json(out / rf.REPORT)
        sink.emit("phase", {"phase": "done"})
        return report
    except BaseException as err:
        if not (out / rf.REPORT).exists():
            rf.mark(out, rf.marker_for(err), f"{type(err).__name__}: {err}")
        sink.emit("error", {"error": str(err), "kind": type(err).__name__})
        raise
    finally:
        sink.close()


# -------------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.prune",
                                description="Prune a finished run's model, fine-tune it, evaluate and export it.")
    p.add_argument("run_dir", help="a finished run folder")
    p.add_argument("--amount", type=float, required=True, help="fraction of weights (or channels) to zero, e.g. 0.5")
    p.add_argument("--structured", action="store_true",
                   help="zero whole output channels per layer (L2 norm) instead of global L1 unstructured")
    p.add_argument("--finetune-epochs", type=int, default=1, help="fine-tune epochs after pruning (default 1)")
    p.add_argument("--lr-scale", type=float, default=FINETUNE_LR_SCALE,
                   help=f"fine-tune lr as a fraction of the run's optim.lr (default {FINETUNE_LR_SCALE})")
    p.add_argument("--out", required=True, help="the new run folder (must not exist or be empty)")
    p.add_argument("--no-export", action="store_true", help="skip exporting the pruned run")
    args = p.parse_args(argv)
    try:
        report = prune_run(args.run_dir, args.out, amount=args.amount, structured=args.structured,
                           finetune_epochs=args.finetune_epochs, lr_scale=args.lr_scale, export=not args.no_export)
    except CoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_code(err)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print("error: pruning failed (traceback above)", file=sys.stderr)
        return 1
    pr = report["pruning"]
    print(f"done: sparsity {pr['sparsity']:.4f}, non-zero parameters {pr['nonzero_params']}/{pr['total_params']}, "
          f"test accuracy {pr['before']['test_accuracy']:.4f} → {pr['after']['test_accuracy']:.4f}  → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
