"""Model zoo: sizes against the papers, the forward/feature contract, and input errors."""

import pytest
import torch

from colam.errors import ColamError
from colam.models import MODELS, build_model, count_parameters, list_models, model_size

# Exact trainable-parameter counts (default options, 3 input channels), measured when the
# architectures were written; a change here means an architecture changed.
EXACT_PARAMS = {
    "densenet_bc_100": {10: 769_162, 100: 800_032},
    "preact_resnet18": {10: 11_172_170, 100: 11_218_340},
    "preact_resnet34": {10: 21_280_330, 100: 21_326_500},
    "resnet50": {10: 23_528_522, 100: 23_712_932, 1000: 25_557_032},
    "resnet101": {10: 42_520_650, 100: 42_705_060, 1000: 44_549_160},
    "resnet20": {10: 269_722, 100: 275_572},
    "resnet32": {10: 464_154, 100: 470_004},
    "resnet44": {10: 658_586, 100: 664_436},
    "resnet56": {10: 853_018, 100: 858_868},
    "resnext29_8x64d": {10: 34_426_698, 100: 34_518_948},
    "small_cnn": {10: 94_762, 100: 106_372},
    "wide_resnet": {10: 8_949_210, 100: 8_972_340},
    "wrn40_4": {10: 8_949_210, 100: 8_972_340},
}

SMALL_INPUT = [name for name in list_models() if MODELS[name].input_size <= 32]


def test_every_model_has_an_exact_count():
    assert sorted(EXACT_PARAMS) == list_models()


@pytest.mark.parametrize("name", list_models())
def test_parameter_count_matches_paper(name):
    spec = MODELS[name]
    assert spec.published_params, f"{name} has no published size"
    for num_classes, published in spec.published_params.items():
        count = model_size(name, num_classes)
        assert abs(count - published) <= spec.published_precision, (name, num_classes, count)


@pytest.mark.parametrize("name", list_models())
def test_exact_parameter_counts(name):
    measured = {c: model_size(name, c) for c in EXACT_PARAMS[name]}
    assert measured == EXACT_PARAMS[name]


@pytest.mark.parametrize("name", SMALL_INPUT)
def test_forward_and_features_agree(name):
    torch.manual_seed(0)
    size = MODELS[name].input_size
    model = build_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        assert logits.shape == (2, 7)
        assert features.ndim == 2 and features.shape[0] == 2
        assert isinstance(model.fc, torch.nn.Linear) and model.fc.in_features == features.shape[1]
        torch.testing.assert_close(model.fc(features), logits)


@pytest.mark.parametrize("name", ["resnet50", "resnet101"])
def test_imagenet_resnet_contract_on_meta(name):
    with torch.device("meta"):
        model = build_model(name, num_classes=5, in_channels=1)
        x = torch.empty(2, 1, 224, 224)
        assert model.forward_features(x).shape == (2, 2048)
        assert model(x).shape == (2, 5)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 5


@pytest.mark.parametrize("name,size", [("small_cnn", 8), ("small_cnn", 32), ("preact_resnet18", 32),
                                       ("resnet20", 28), ("resnet56", 28)])
def test_one_input_channel(name, size):
    model = build_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


def test_cifar_resnets_on_grayscale_28x28():
    """The MNIST family's models: the stem takes one channel (432 - 144 weights fewer) and the three
    stages see 28, 14 and 7 pixels, so the pooled features are 64 wide as on CIFAR."""
    for depth, count in ((20, 269_434), (32, 463_866), (44, 658_298)):
        model = build_model(f"resnet{depth}", 10, in_channels=1)
        assert count_parameters(model) == count
        assert len(model.layers) == 3 * (depth - 2) // 6
        assert model.forward_features(torch.randn(2, 1, 28, 28)).shape == (2, 64)


def test_options_change_the_model():
    assert model_size("wide_resnet", 10, depth=16, widen_factor=8) == 10_961_370  # WRN-16-8, 11.0M
    assert count_parameters(build_model("small_cnn", 10, width=8)) < 10_000
    model = build_model("wrn40_4", 10, dropout=0.3)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in model.modules())


def test_count_parameters_ignores_frozen():
    model = build_model("small_cnn", 10, in_channels=1)
    model.fc.requires_grad_(False)
    assert count_parameters(model) == 94_186 - (128 * 10 + 10)


@pytest.mark.parametrize(
    "call,key,fragment",
    [
        (lambda: build_model("xyz", 10), "model.name", "unknown model 'xyz'; choose one of: densenet_bc_100,"),
        (lambda: build_model("wide_resnet", 10, foo=1), "model.options.foo",
         "not an option of model 'wide_resnet' (accepted: depth, widen_factor, dropout)"),
        (lambda: build_model("resnet56", 10, depth=20), "model.options.depth", "(accepted: none)"),
        (lambda: build_model("wide_resnet", 10, depth=41), "model.options.depth",
         "WideResNet depth must be 6n+4, got 41"),
        (lambda: build_model("wide_resnet", 10, depth="40"), "model.options.depth", "integer"),
        (lambda: build_model("small_cnn", 10, dropout=1.5), "model.options.dropout", "[0, 1)"),
        (lambda: build_model("small_cnn", 0), "model.num_classes", ">= 1"),
    ],
)
def test_bad_input_names_the_key(call, key, fragment):
    with pytest.raises(ColamError) as info:
        call()
    message = str(info.value)
    assert message.startswith(key + ": ") and fragment in message and "\n" not in message
