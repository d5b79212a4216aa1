"""Config loader: inheritance, overrides, defaults, validation, and the shipped configs."""
from pathlib import Path

import pytest
import yaml

from pointclora.config import DEFAULTS, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "_base_" not in p.parts)


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_base_inheritance_deep_merge_relative_paths_and_lists(tmp_path):
    write(tmp_path / "_base_/model.yaml",
          {"model": {"num_group": 64, "depth": 12, "trans_dim": 384}})
    write(tmp_path / "_base_/train.yaml", {"train": {"lr": 1.0e-3, "epochs": 50}})
    write(tmp_path / "_base_/more.yaml",
          {"_base_": "train.yaml", "train": {"epochs": 20}, "data": {"name": "synthetic"}})
    cfg = load_config(write(tmp_path / "sub/run.yaml", {
        "_base_": ["../_base_/model.yaml", "../_base_/more.yaml"],
        "model": {"depth": 2},
    }))
    assert cfg["model"]["depth"] == 2            # the file wins over its bases
    assert cfg["model"]["num_group"] == 64       # siblings of an overridden key survive
    assert cfg["model"]["name"] == "point_mae"   # defaults sit underneath everything
    assert cfg["train"]["lr"] == 1.0e-3          # grand-parent value
    assert cfg["train"]["epochs"] == 20          # parent overrides grand-parent
    assert cfg["train"]["warmup_epochs"] == DEFAULTS["train"]["warmup_epochs"]
    assert cfg["adapter"]["method"] == "clora"
    assert "_base_" not in cfg


def test_later_base_wins_over_earlier(tmp_path):
    write(tmp_path / "a.yaml", {"train": {"lr": 1.0}})
    write(tmp_path / "b.yaml", {"train": {"lr": 2.0}})
    cfg = load_config(write(tmp_path / "c.yaml", {"_base_": ["a.yaml", "b.yaml"],
                                                  "data": {"name": "synthetic"}}))
    assert cfg["train"]["lr"] == 2.0


def test_overrides_dotted_keys_and_yaml_values(tmp_path):
    path = write(tmp_path / "c.yaml", {"data": {"name": "synthetic"}})
    cfg = load_config(path, ["train.lr=1e-3", "train.epochs=7", "model.pretrained=null",
                             "adapter.target_modules=[qkv, proj]",
                             "data.name=modelnet40", "adapter.r=4", "train.amp=bf16",
                             "output_dir=runs/x"])
    assert cfg["train"]["lr"] == pytest.approx(1e-3) and isinstance(cfg["train"]["lr"], float)
    assert cfg["train"]["epochs"] == 7
    assert cfg["model"]["pretrained"] is None
    assert cfg["adapter"]["target_modules"] == ["qkv", "proj"]
    assert cfg["adapter"]["r"] == 4
    assert cfg["data"]["name"] == "modelnet40"
    assert cfg["train"]["amp"] == "bf16"
    assert cfg["output_dir"] == "runs/x"


def test_scientific_notation_in_files_is_float(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "data: {name: synthetic}\ntrain: {lr: 5e-4}\n"))
    assert cfg["train"]["lr"] == pytest.approx(5e-4)


@pytest.mark.parametrize("override, match", [
    ("train.lr", "section.key=value"),
    ("=3", "section.key=value"),
    ("train..lr=3", "section.key=value"),
    ("output_dir.x=3", "not a section"),
    ("optim.lr=3", "unknown top-level"),
    ("train.learning_rate=3", "unknown train key"),
    ("train.amp=fp8", "train.amp"),
    ("train.epochs=0", "train.epochs"),
    ("train.warmup_epochs=-1", "warmup_epochs"),
    # one rule in every section: the key, what it takes, what it got (a bool is no integer)
    ("train.epochs=true", r"train.epochs must be an integer >= 1; got True \(bool\)"),
    ("train.lr=abc", r"train.lr must be a number >= 0; got 'abc' \(str\)"),
    ("data.npoints=abc", "data.npoints must be an integer"),
    ("data.npoint=1024", r"unknown data key\(s\) \['data.npoint'\]; valid keys: .*'npoints'"),
    ("model.depth=abc", "model.depth must be an integer"),
    ("model.trust_pickle=true", r"unknown model key\(s\) \['model.trust_pickle'\]"),
    ("adapter.r=true", r"adapter.r must be an integer; got True"),
    ("adapter.rank=8", r"unknown adapter key\(s\) \['adapter.rank'\]; valid keys: .*'r'"),
    ("adapter.method=lora2", "adapter.method must be one of"),
])
def test_bad_overrides_are_rejected(tmp_path, override, match):
    path = write(tmp_path / "c.yaml", {"data": {"name": "synthetic"}})
    with pytest.raises(ValueError, match=match):
        load_config(path, [override])


def test_nullable_keys_take_null_and_ints_pass_as_numbers(tmp_path):
    path = write(tmp_path / "c.yaml", {"data": {"name": "synthetic"}})
    cfg = load_config(path, ["train.grad_clip=null", "train.lr=1", "model.cls_dim=null"])
    assert cfg["train"]["grad_clip"] is None and cfg["train"]["lr"] == 1


def test_unknown_section_missing_file_cycle_and_non_mapping(tmp_path):
    with pytest.raises(ValueError, match="unknown top-level section"):
        load_config(write(tmp_path / "a.yaml", {"data": {"name": "x"}, "optimizer": {}}))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(write(tmp_path / "b.yaml", {"_base_": "nope.yaml"}))
    write(tmp_path / "c1.yaml", {"_base_": "c2.yaml"})
    write(tmp_path / "c2.yaml", {"_base_": "c1.yaml"})
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "c1.yaml")
    with pytest.raises(ValueError, match="mapping"):
        load_config(write(tmp_path / "d.yaml", "- 1\n- 2\n"))
    with pytest.raises(ValueError, match="data.name"):
        load_config(write(tmp_path / "e.yaml", {"model": {"depth": 2}}))


def test_dump_round_trip(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", {"data": {"name": "synthetic"}}),
                      ["train.lr=1e-3", "train.min_lr=1e-6"])
    dump_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_shipped_configs_exist():
    names = {p.relative_to(REPO / "configs").as_posix() for p in SHIPPED}
    assert {"demo.yaml", "scanobjectnn/obj_bg.yaml", "scanobjectnn/obj_only.yaml",
            "scanobjectnn/pb_t50_rs.yaml", "modelnet40/1k.yaml", "modelnet40/8k.yaml",
            "modelnet40/fewshot.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_shipped_configs_load(path):
    cfg = load_config(path)
    from pointclora.adapters import DEFAULT_OPTIONS

    assert cfg["adapter"]["method"] in DEFAULT_OPTIONS
    assert cfg["data"]["name"]


# REFERENCE section 3: points, groups x size, classes for each official recipe.
RECIPES = {
    "scanobjectnn/obj_bg.yaml": (2048, 128, 32, 15, "obj_bg"),
    "scanobjectnn/obj_only.yaml": (2048, 128, 32, 15, "obj_only"),
    "scanobjectnn/pb_t50_rs.yaml": (2048, 128, 32, 15, "pb_t50_rs"),
    "modelnet40/1k.yaml": (1024, 64, 32, 40, None),
    "modelnet40/8k.yaml": (8192, 512, 32, 40, None),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_official_recipes(name):
    cfg = load_config(REPO / "configs" / name)
    npoints, groups, size, classes, variant = RECIPES[name]
    assert cfg["data"]["npoints"] == npoints
    assert (cfg["model"]["num_group"], cfg["model"]["group_size"]) == (groups, size)
    assert cfg["model"]["cls_dim"] == classes
    if variant:
        assert cfg["data"]["variant"] == variant
    model = cfg["model"]
    assert (model["trans_dim"], model["depth"], model["num_heads"], model["encoder_dims"],
            model["drop_path_rate"]) == (384, 12, 6, 384, 0.1)
    train = cfg["train"]
    assert (train["lr"], train["weight_decay"], train["batch_size"], train["grad_clip"],
            train["epochs"], train["warmup_epochs"], train["warmup_lr"], train["min_lr"],
            train["seed"]) == (5e-4, 0.05, 32, 10.0, 300, 10, 1e-6, 1e-6, 0)
    assert cfg["data"]["protocol"] == "A"


def test_fewshot_recipe():
    cfg = load_config(REPO / "configs/modelnet40/fewshot.yaml")
    assert cfg["data"]["name"] == "modelnet40_fewshot"
    assert cfg["data"]["npoints"] == 1024 and cfg["model"]["num_group"] == 64
    assert cfg["train"]["epochs"] == 150
    assert cfg["model"]["cls_dim"] is None  # follows data.way through the dataset
    assert (cfg["data"]["way"], cfg["data"]["shot"], cfg["data"]["fold"]) == (5, 10, 0)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_shipped_configs_use_only_keys_their_builders_read(path):
    import inspect

    from pointclora.adapters import DEFAULT_OPTIONS
    from pointclora.data.build import COMMON_KEYS, KEYS
    from pointclora.models import BACKBONES

    cfg = load_config(path)
    model = dict(cfg["model"])
    backbone = BACKBONES[model.pop("name")]
    assert set(model) - {"pretrained"} <= set(inspect.signature(backbone).parameters)
    adapter = dict(cfg["adapter"])
    assert set(adapter) - {"method"} <= set(DEFAULT_OPTIONS[adapter.pop("method")])
    data = cfg["data"]
    assert set(data) <= COMMON_KEYS | KEYS[data["name"]]
