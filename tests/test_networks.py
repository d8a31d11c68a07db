import io
import os
import pickle
import urllib.error

import pytest
import torch
import torchvision

from retrain.tasks import model_file, networks
from retrain.tasks.model_file import ModelFileError, load_model_file, model_record, save_model_file
from retrain.tasks.networks import (
    WeightsUnavailableError,
    build_network,
    configure_trainable,
    get_spec,
    parameter_groups,
    summarize,
    torchvision_classifiers,
)
from retrain.tasks.preprocessing import Preprocessing
from retrain.tasks.training.body_head import split_at_head

# One network of each torchvision family (the smallest), besides the seed's entries.
# (Transformers and ConvNeXt work the same way but take a minute each on two CPU cores.)
FAMILY_REPRESENTATIVES = [
    "squeezenet",
    "mobilenet_v3_small",
    "resnet18",
    "efficientnet_b0",
    "regnet_y_400mf",
    "googlenet",
    "shufflenet_v2_x0_5",
]


def _families() -> dict[str, str]:
    """The smallest network of each torchvision family (resnet, vit, swin_v2, ...)."""
    import re

    import torchvision

    smallest: dict[str, tuple[int, str]] = {}
    for name in torchvision_classifiers():
        family = re.sub(r"\d+$", "", name.split("_")[0])
        size = torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
        if family not in smallest or size < smallest[family][0]:
            smallest[family] = (size, name)
    return {family: name for family, (_, name) in sorted(smallest.items())}


def test_every_torchvision_family_has_its_head_and_preprocessing_from_the_weights_enum():
    families = _families()
    assert {"resnet", "vit", "swin", "convnext", "efficientnet", "regnet", "densenet", "maxvit"} <= set(families)
    for family, name in families.items():
        spec = get_spec(name)
        head = networks._skeleton(name, spec.preprocessing.input_size).get_submodule(spec.head_layer)
        outputs = head.out_features if isinstance(head, torch.nn.Linear) else head.out_channels
        assert outputs == spec.categories == 1000, family
        transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        assert spec.preprocessing.input_size == (transforms.crop_size[0],) * 2
        assert spec.preprocessing.mean == tuple(transforms.mean) and spec.preprocessing.std == tuple(transforms.std)


def test_a_typo_in_a_network_name_suggests_the_right_one():
    with pytest.raises(ValueError, match="did you mean.*resnet50"):
        get_spec("resnet_50")


@pytest.mark.parametrize("name", FAMILY_REPRESENTATIVES)
def test_network_from_a_state_dict_file_gets_a_new_head_and_splits_for_the_feature_cache(name, tmp_path):
    """Weights cannot be downloaded here: a state dict of the whole (1000-class) torchvision
    model, saved by hand, stands in for the pretrained file."""
    spec = get_spec(name)
    torch.manual_seed(0)
    original, _ = build_network(name, 1000, weights="none")
    path = tmp_path / "weights.pth"
    torch.save(original.state_dict(), path)
    model, origin = build_network(name, 3, weights=str(path))
    assert origin.startswith(f"file {path}")
    body_keys = [k for k in original.state_dict() if not k.startswith(spec.head_layer + ".")]
    assert body_keys and all(torch.equal(model.state_dict()[k], original.state_dict()[k]) for k in body_keys)
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, *spec.preprocessing.input_size)).shape == (1, 3)
    split_at_head(model, spec)  # checks rest(body(x)) == model(x) itself
    configure_trainable(model, spec, "transfer")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{spec.head_layer}.weight",
        f"{spec.head_layer}.bias",
    }


def test_a_split_that_does_not_reproduce_the_model_is_refused():
    spec = get_spec("resnet18")
    model, _ = build_network("resnet18", 3, weights="none")
    model.fc = torch.nn.Sequential(model.fc, torch.nn.Softmax(dim=1))  # something after the head
    spec = networks.replace(spec, head_layer="fc.0")
    with pytest.raises(NotImplementedError, match="not its last operation"):
        split_at_head(model, spec)


@pytest.mark.parametrize("name", ["squeezenet", "mobilenet_v3_small"])
def test_every_network_gets_a_head_for_k_classes(name):
    spec = get_spec(name)
    model, origin = build_network(name, 4, weights="none")
    assert origin == "random initialisation"
    out = model.eval()(torch.zeros(2, 3, *spec.preprocessing.input_size))
    assert out.shape == (2, 4)


def test_squeezenet_summary_names_conv10_and_input_size():
    spec = get_spec("squeezenet-caffe")
    model, _ = build_network(spec.name, 5, weights="none")
    summary = summarize(model, spec)
    assert summary.head_name == "conv10" and summary.head_layer == "classifier.1"
    assert summary.input_size == (227, 227) and summary.num_classes == 5
    assert summary.learnables == sum(p.numel() for p in model.parameters())
    text = summary.to_text()
    assert "head layer: conv10 (classifier.1) -> 5 classes" in text and "227x227x3" in text


def test_unknown_network_lists_the_choices():
    with pytest.raises(ValueError, match="squeezenet-caffe"):
        get_spec("alexnet9000")


def test_transfer_freezes_all_but_the_head_and_finetune_boosts_the_head():
    spec = get_spec("squeezenet-caffe")
    model, _ = build_network(spec.name, 3, weights="none")
    configure_trainable(model, spec, "transfer")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.1.weight", "classifier.1.bias"]
    configure_trainable(model, spec, "finetune")
    assert all(p.requires_grad for p in model.parameters())
    groups = {g["name"]: g["lr"] for g in parameter_groups(model, spec, "finetune", 1e-4, 10.0)}
    assert groups == {"body": 1e-4, "head": pytest.approx(1e-3)}
    assert {g["name"]: g["lr"] for g in parameter_groups(model, spec, "scratch", 1e-3, 10.0)} == {
        "body": 1e-3,
        "head": 1e-3,
    }


def test_caffe_weights_load_from_a_file_and_classify_imagenet(caffe_weights):
    model, origin = build_network("squeezenet-caffe", 2, weights=caffe_weights)
    assert "sha256 2c8907188084" in origin
    reference = torch.load(caffe_weights, weights_only=True)
    assert torch.equal(model.state_dict()["features.0.weight"], reference["features.0.weight"])


def test_missing_caffe_weights_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="--weights"):
        build_network("squeezenet-caffe", 2)


def test_offline_torchvision_download_says_how_to_use_a_local_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        build_network("squeezenet", 2)
    assert "--weights PATH" in str(err.value) and "squeezenet-caffe" in str(err.value)


def test_weights_for_another_architecture_are_refused(tmp_path):
    other, _ = build_network("resnet18", 2, weights="none")
    path = tmp_path / "resnet.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="does not fit"):
        build_network("squeezenet-caffe", 2, weights=str(path))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsUnavailableError, match="not a readable"):
        build_network("squeezenet-caffe", 2, weights=str(tmp_path / "junk.pth"))


def test_a_network_with_its_weights_in_a_file_is_one_more_row_of_the_registry(monkeypatch, tmp_path):
    """squeezenet-caffe is a row like any other: another one needs no code."""
    pre = Preprocessing(
        input_size=(160, 160), channel_order="BGR", scale=1.0, mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 1.0)
    )
    weights = networks.WeightsFile("resnet18-own.pth", pre, "ResNet-18 with our own weights", 1000)
    monkeypatch.setitem(networks.NAMED_ENTRIES, "resnet18-own", networks.Entry("resnet18", weights))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert "resnet18-own" in networks.network_names()
    spec = get_spec("resnet18-own")
    assert (spec.architecture, spec.head_layer, spec.preprocessing, spec.from_torchvision) == (
        "resnet18",
        "fc",
        pre,
        False,
    )
    with pytest.raises(WeightsUnavailableError, match="needs its weights file resnet18-own.pth"):
        build_network("resnet18-own", 2)
    original, _ = build_network("resnet18", 1000, weights="none")
    (tmp_path / "checkpoints").mkdir()
    torch.save(original.state_dict(), tmp_path / "checkpoints" / "resnet18-own.pth")
    model, origin = build_network("resnet18-own", 2)
    assert origin.startswith(f"file {tmp_path}") and torch.equal(model.conv1.weight, original.conv1.weight)


def test_a_store_failure_is_not_reported_as_a_corrupt_file(monkeypatch):
    def unreachable(url):
        raise ConnectionError(f"store unreachable: {url}")

    monkeypatch.setattr(networks.storage, "read_bytes", unreachable)
    with pytest.raises(ConnectionError):
        load_model_file("s3://bucket/model.pt")
    with pytest.raises(ConnectionError):
        build_network("squeezenet-caffe", 2, weights="s3://bucket/weights.pth")


def test_model_file_roundtrips_with_weights_only(tmp_path):
    spec = get_spec("squeezenet-caffe")
    model, origin = build_network(spec.name, 3, weights="none")
    url = str(tmp_path / "model.pt")
    save_model_file(url, model_record(model, spec, ["a", "b", "c"], origin, metrics={"test_accuracy": 0.5}))
    raw = torch.load(url, weights_only=True)  # what any user can do, safely
    assert raw["classes"] == ["a", "b", "c"] and raw["input_size"] == [227, 227]
    assert raw["preprocessing"]["channel_order"] == "BGR" and raw["architecture"] == "squeezenet1_1"
    loaded = load_model_file(url)
    x = torch.rand(1, 3, 227, 227)
    assert torch.allclose(loaded.model(x), model.eval()(x))


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/retrain-pwned",))


def test_malicious_pickle_model_is_refused_without_running_it(tmp_path):
    url = tmp_path / "evil.pt"
    with open(url, "wb") as f:
        torch.save({"format": model_file.MODEL_FORMAT, "payload": Payload()}, f)
    with pytest.raises(ModelFileError, match="refused"):
        load_model_file(str(url))
    assert not os.path.exists("/tmp/retrain-pwned")
    url.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelFileError):
        load_model_file(str(url))
    assert not os.path.exists("/tmp/retrain-pwned")


def test_truncated_tampered_and_foreign_model_files_give_clear_errors(tmp_path, random_model_file):
    data = open(random_model_file, "rb").read()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_model_file(str(tmp_path / "truncated.pt"))
    record = torch.load(random_model_file, weights_only=True)
    record["classes"] = ["just", "two"]  # tampered: the head has 3 outputs
    buffer = io.BytesIO()
    torch.save(record, buffer)
    (tmp_path / "tampered.pt").write_bytes(buffer.getvalue())
    with pytest.raises(ModelFileError, match="do not fit"):
        load_model_file(str(tmp_path / "tampered.pt"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ModelFileError, match="not a retrain model"):
        load_model_file(str(tmp_path / "foreign.pt"))
    with pytest.raises(ModelFileError, match="not found"):
        load_model_file(str(tmp_path / "missing.pt"))
