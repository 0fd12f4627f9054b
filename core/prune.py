"""Prune a finished run: `python -m core.prune RUN_DIR --amount A [--structured] [--finetune-epochs K] --out NEW_RUN_DIR`.

`torch.nn.utils.prune` zeroes weights of every Conv2d and Linear: by default the globally smallest |w| (L1
unstructured, `global_unstructured` over all those layers together), with `--structured` whole output channels per
layer by L2 norm (`ln_structured`, n=2, dim=0; the classifier head is left alone, since removing its rows would remove
classes). The pruning stays a mask (`weight = weight_orig * weight_mask`, recomputed every forward) while the model is
fine-tuned for K epochs, so pruned weights stay exactly zero; only then `prune.remove` makes it permanent.

NEW_RUN_DIR is a complete run folder (config.yaml, labels.json, preprocess.json, split.json, checkpoints/best.pt,
predictions.jsonl, samples/, metrics.jsonl, report.json with a "pruning" section) and is exported like any other run
unless `--no-export`. It is a run like any other: core.train's frame (run folder, events, SIGTERM, FAILED/CANCELLED
markers), loaders, optimizer, schedule, epoch loop, checkpoints and report, around the pruning step.

Zeros are still stored densely: model.onnx keeps its size (bundle.zip, being deflated, shrinks). The gain is the
sparsity itself, for runtimes that exploit it, and a starting point for physically slimmer models.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from core import runfolder
from core.config import Config, config_from_dict, save_config
from core.errors import ConfigError, CoreError, exit_code
from core.evaluate import evaluate_split
from core.train import announce, create_train_state, finish_run, load_data, make_loaders, open_run, run_epochs

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
    """The run's config for fine-tuning: K epochs, lower lr, no warm-up, every layer trainable, no compile; no early
    stopping and no time limit (the fine-tune runs its K epochs), on the GPU when there is one unless the run was
    trained on the CPU on purpose."""
    lr = float(f"{cfg.optim.lr * lr_scale:.6g}")  # 0.0003, not 0.00030000000000000003, in the report
    raw = cfg.to_dict()
    raw["train"]["time_limit"] = None
    return config_from_dict(raw, [f"train.epochs={max(epochs, 1)}", f"optim.lr={lr}", "sched.warmup_epochs=0",
                                  "model.freeze=none", "train.compile=false", "train.early_stopping=0",
                                  f"train.device={'cpu' if cfg.train.device == 'cpu' else 'auto'}"])


def prune_run(run_dir: str | Path, out_dir: str | Path, *, amount: float, structured: bool = False,
              finetune_epochs: int = 1, lr_scale: float = FINETUNE_LR_SCALE, export: bool = True) -> dict[str, Any]:
    """Prune, fine-tune and evaluate `run_dir`'s best checkpoint into the new run folder `out_dir`; returns its report.

    The run's frame, epoch loop, checkpoints and report are core.train's (open_run, run_epochs, finish_run); what
    pruning adds is the step before the epochs (prune, the epoch-0 best.pt) and two hooks of the report: make the
    pruning permanent in the best weights, and the report's `pruning` section."""
    started = time.time()
    if not 0 < amount < 1:
        raise ConfigError(f"--amount: must be a fraction between 0 and 1 (exclusive), got {amount}")
    if finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs: must be >= 0, got {finetune_epochs}")
    run = runfolder.load_run(run_dir)
    out = Path(out_dir)
    if out.resolve() == run.path.resolve():
        raise ConfigError(f"--out: {str(out)!r} is the source run; choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out: {str(out)!r} is not empty; choose a new folder")
    ft_cfg = _finetune_config(run.cfg, finetune_epochs, lr_scale)
    with open_run(ft_cfg, out, started=started) as rt:
        save_config(run.cfg, out / runfolder.CONFIG)  # the pruned run is the source run's recipe
        bundle = load_data(rt, out)
        classes = list(bundle.classes)
        model = runfolder.build_model(run).to(rt.device)  # NCHW while pruning: global_unstructured sees vectors
        loaders = make_loaders(ft_cfg, bundle, rt.info, rt.device)
        before, _ = evaluate_split(rt, model, loaders, "test", classes)
        layers = apply_pruning(model, amount, structured=structured)
        if rt.channels_last:  # for the fine-tuning and evaluation that follow
            model = model.to(memory_format=torch.channels_last)
        pruned_only, _ = evaluate_split(rt, model, loaders, "test", classes)
        print(f"prune: test accuracy {before['accuracy']:.4f} before, {pruned_only['accuracy']:.4f} right after "
              f"pruning {amount:g} ({'structured' if structured else 'global unstructured'})", flush=True)

        state = create_train_state(rt, model, len(loaders.train))
        announce(rt, state, bundle, loaders, epochs=finetune_epochs,
                 pruning={"source_run": str(run.path), "amount": amount, "structured": structured})
        val, _ = evaluate_split(rt, model, loaders, "val", classes)
        state.best_val_acc = val["accuracy"]  # epoch 0, the pruned model: fine-tuning keeps only what beats it
        runfolder.save_best_checkpoint(out / runfolder.BEST_CHECKPOINT, model, epoch=0, cfg=run.cfg, val_metrics=val)
        if finetune_epochs:
            run_epochs(rt, state, loaders, classes, out)

        def make_permanent_in_best(model: nn.Module, best: dict[str, Any]) -> None:
            """The best weights still carry the masks (weight_orig, weight_mask): fold them into plain weights and
            rewrite best.pt so export and load_run see an ordinary model. last.pt keeps the masked form, which no
            plain model loads: a pruned run is not resumed, so it goes."""
            make_permanent(layers)
            runfolder.save_best_checkpoint(out / runfolder.BEST_CHECKPOINT, model, epoch=int(best["epoch"]),
                                           cfg=run.cfg, val_metrics=best["val_metrics"])
            (out / runfolder.LAST_CHECKPOINT).unlink(missing_ok=True)

        def pruning_section(report: dict[str, Any], model: nn.Module) -> None:
            stats = sparsity_stats(model, layers)
            report["model"]["nonzero_parameters"] = stats["nonzero_params"]
            report["pruning"] = {
                "amount": amount, "structured": structured,
                "method": "ln_structured n=2 dim=0 per layer" if structured else "global_unstructured L1", **stats,
                "before": {"test_accuracy": before["accuracy"]},
                "pruned_before_finetune": {"test_accuracy": pruned_only["accuracy"]},
                "after": {"test_accuracy": report["test"]["accuracy"]},
                "finetune_epochs": finetune_epochs, "best_epoch": report["val"]["epoch"],
                "finetune_lr": ft_cfg.optim.lr, "source_run": str(run.path)}
            print(f"prune: sparsity {stats['sparsity']:.4f} over {stats['pruned_layers']} layers, test accuracy "
                  f"{before['accuracy']:.4f} → {report['test']['accuracy']:.4f} after {finetune_epochs} fine-tune "
                  "epoch(s)", flush=True)

        return finish_run(rt, state, loaders, bundle, out, export=export, on_best=make_permanent_in_best,
                          extend=pruning_section)


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
