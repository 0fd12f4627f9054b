"""How many feature-cache views for how many epochs? The measurement behind `data.feature_views: auto`
(docs/benchmarks.md, "Feature cache"). Not a test: `python -m tests.feature_views` (about 3 minutes on 2 cores).

The transfer preset's data pipeline and frozen Lite0 embed 8 augmented views of 400 photo-like images
(tests.fixtures_images.make_photo_tree) once, with the code core.train runs (build_feature_loaders); then a head is
trained on each disjoint set of V views (V = 1, 2, 4, 8) with 2 seeds, for several epoch budgets, with core's own
optimizer, schedule and loss, and the mean (min-max) best val accuracy is printed per (epochs, views).
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from core.config import load_config
from core.features import FeatureBatchLoader, build_feature_loaders, plan_feature_cache
from core.runtime import Runtime, seed_everything
from core.train import build_training_model, create_train_state, load_data, prepare_inputs
from tests.fixtures_images import make_photo_tree

PRESET = "configs/transfer_efficientnet_lite0.yaml"
EPOCHS = (3, 5, 10, 20, 30)
VIEWS = (1, 2, 4, 8)
SEEDS = (0, 1)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="feature-views-") as tmp:
        photos = make_photo_tree(Path(tmp) / "photos", 100)
        cfg = load_config(PRESET, [f"data.path={photos}", f"data.feature_views={max(VIEWS)}"])
        rt = Runtime.create(cfg, torch.device("cpu"))
        run = Path(tmp) / "run"
        run.mkdir()
        bundle = load_data(rt, run)  # writes the split and labels there, as in a run folder
        model = build_training_model(rt, bundle)
        loaders = prepare_inputs(rt, bundle)
        plan, _ = plan_feature_cache(cfg, model, bundle)
        cached = build_feature_loaders(rt, plan, model, bundle, loaders)
        print("embedded:", cached.feature_cache, flush=True)
        feats, labels = cached.train.features, cached.train.labels
        val_feats, val_labels = cached.val.features[0], cached.val.labels
        head = cached.head
        for epochs in EPOCHS:
            for views in VIEWS:
                best_accs = []
                for first in range(0, max(VIEWS), views):
                    for seed in SEEDS:
                        best_accs.append(_train_head(model, head, feats[first:first + views], labels, val_feats,
                                                     val_labels, epochs, seed, photos))
                print(f"epochs {epochs:3d}  views {views}: best val acc {statistics.mean(best_accs):.3f} "
                      f"({min(best_accs):.3f}-{max(best_accs):.3f}), n={len(best_accs)}", flush=True)


def _train_head(model, head, feats, labels, val_feats, val_labels, epochs, seed, photos) -> float:
    cfg = load_config(PRESET, [f"data.path={photos}", f"train.epochs={epochs}", f"train.seed={seed}"])
    seed_everything(seed)
    torch.nn.init.normal_(head[1].weight, std=0.01)
    torch.nn.init.zeros_(head[1].bias)
    loader = FeatureBatchLoader(feats, labels, batch_size=cfg.train.batch_size, train=True, drop_last=True, seed=seed)
    state = create_train_state(Runtime.create(cfg, torch.device("cpu")), model, len(loader))
    best = 0.0
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        head.train()
        for x, y in loader:
            loss = state.criterion(head(x), y)
            state.optimizer.zero_grad()
            loss.backward()
            state.optimizer.step()
            state.scheduler.step()
        head.eval()
        with torch.no_grad():
            best = max(best, (head(val_feats).argmax(1) == val_labels).float().mean().item())
    return best


if __name__ == "__main__":
    main()
