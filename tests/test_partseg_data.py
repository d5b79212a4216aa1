"""ShapeNetPart loader on files in the official layout, synthetic parts, the part mIoU metric."""
import json

import numpy as np
import pytest
import torch

from pointclora.data import DataError, build_dataset
from pointclora.data.shapenetpart import (
    SHAPENETPART_PARTS,
    SYNSETS,
    PartAugment,
    ShapeNetPart,
)
from pointclora.data.synthetic_parts import generate_parts, write_shapenetpart_layout
from pointclora.engine.metrics import part_miou

CATEGORIES = list(SHAPENETPART_PARTS)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_shapenetpart_layout(tmp_path_factory.mktemp("snp") / "shapenet", 2, 300)


# ---------------------------------------------------------------- the official layout


def test_official_layout_is_written_and_read(root):
    assert (root / "synsetoffset2category.txt").read_text().split() == [
        v for name in CATEGORIES for v in (name, SYNSETS[name])]
    train = json.loads((root / "train_test_split/shuffled_train_file_list.json").read_text())
    assert len(train) == 32 and all(e.startswith("shape_data/") for e in train)
    sizes = {s: len(ShapeNetPart(root, s)) for s in ("train", "val", "trainval", "test")}
    assert sizes == {"train": 32, "val": 32, "trainval": 64, "test": 32}
    ds = ShapeNetPart(root, "trainval", npoints=512)
    assert ds.class_names == CATEGORIES and ds.num_classes == 16
    for i in (0, 20, 63):
        points, category, parts = ds[i]
        assert points.shape == (512, 3) and points.dtype == torch.float32
        assert parts.shape == (512,) and parts.dtype == torch.int64
        labels = SHAPENETPART_PARTS[CATEGORIES[category]]
        assert labels[0] <= int(parts.min()) and int(parts.max()) <= labels[-1]
        # the official path: category folder of the file
        assert ds.files[i][1].parent.name == SYNSETS[CATEGORIES[category]]


def test_sampling_and_normalisation_follow_the_official_loader(root):
    ds = ShapeNetPart(root, "trainval", npoints=2048, normals=True)
    rows = np.loadtxt(ds.files[5][1]).astype(np.float32)
    xyz = rows[:, :3] - rows[:, :3].mean(0)
    xyz /= np.sqrt((xyz**2).sum(1)).max()
    np.testing.assert_allclose(ds.shape(5)[0][:, :3], xyz, atol=1e-6)
    np.random.seed(3)
    points, _, parts = ds[5]
    np.random.seed(3)
    choice = np.random.choice(len(rows), 2048, replace=True)  # with replacement: 2048 > 300
    np.testing.assert_allclose(points[:, :3].numpy(), xyz[choice], atol=1e-6)
    assert points.shape == (2048, 6)  # normals after xyz
    np.testing.assert_array_equal(parts.numpy(), rows[choice, 6].astype(np.int64))
    # the test split draws one fixed subset per shape; training splits draw anew
    test = ShapeNetPart(root, "test", npoints=256)
    assert torch.equal(test[3][0], test[3][0])
    assert not torch.equal(ds[5][0], ds[5][0])


def test_missing_root_names_the_layout(tmp_path):
    with pytest.raises(DataError, match="synsetoffset2category.txt(.|\n)*train_test_split"
                                        "(.|\n)*shapenetcore_partanno_segmentation_benchmark_v0"):
        ShapeNetPart(tmp_path / "nowhere")


def corrupt_copy(root, tmp_path, line_number, text):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    ds = ShapeNetPart(copy, "trainval")
    path = ds.files[0][1]
    lines = path.read_text().splitlines()
    lines[line_number - 1] = text
    path.write_text("\n".join(lines) + "\n")
    return ds, path


@pytest.mark.parametrize("text, match", [
    ("0.1 0.2 abc 0 0 0 1", "line 7: not numbers"),
    ("0.1 0.2 0.3 0 0 0", "line 7: 6 values; expected 7"),
    ("0.1 0.2 0.3 0 0 0 12", "line 7: part label outside Airplane's parts 0..3"),
    ("0.1 nan 0.3 0 0 0 1", "line 7: NaN or inf"),
])
def test_bad_file_names_file_and_line(root, tmp_path, text, match):
    ds, path = corrupt_copy(root, tmp_path, 7, text)
    with pytest.raises(DataError, match=match) as err:
        ds[0]
    assert str(path) in str(err.value)


def test_bad_split_list_and_category_file(root, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "train_test_split/shuffled_val_file_list.json").write_text("{not json")
    with pytest.raises(DataError, match="shuffled_val_file_list.json: not a JSON list"):
        ShapeNetPart(copy, "trainval")
    (copy / "synsetoffset2category.txt").write_text("Spaceship 123\n")
    with pytest.raises(DataError, match="line 1: expected 'Category synset'"):
        ShapeNetPart(copy, "test")
    with pytest.raises(DataError, match="split must be one of"):
        ShapeNetPart(root, "training")


def test_build_dataset_and_keys(root):
    ds = build_dataset({"name": "shapenetpart", "root": str(root), "npoints": 128}, "train")
    assert len(ds) == 64 and ds.split == "trainval"
    test = build_dataset({"name": "shapenetpart", "root": str(root), "test_split": "val"},
                         "test")
    assert test.split == "val" and test[0][0].shape == (2048, 3)


# ---------------------------------------------------------------- synthetic parts


def test_synthetic_parts_are_seeded_and_use_the_part_map():
    points, category, parts = generate_parts(3, 256, seed=1, split="train")
    again = generate_parts(3, 256, seed=1, split="train")
    assert torch.equal(points, again[0]) and torch.equal(parts, again[2])
    assert not torch.equal(points, generate_parts(3, 256, seed=1, split="test")[0])
    assert points.shape == (48, 256, 3) and category.tolist() == sorted(category.tolist())
    torch.testing.assert_close(points.norm(dim=-1).amax(1), torch.ones(48))  # unit sphere
    for c, name in enumerate(CATEGORIES):
        used = set(parts[category == c].unique().tolist())
        assert used == set(SHAPENETPART_PARTS[name]), name  # every part present, none other


def test_synthetic_parts_dataset_from_config():
    ds = build_dataset({"name": "synthetic_parts", "samples_per_category": 2, "npoints": 64,
                        "num_categories": 4}, "test")
    assert len(ds) == 8 and ds.num_classes == 4 and ds.class_names == CATEGORIES[:4]
    points, category, parts = ds[7]
    assert points.shape == (64, 3) and category == 3 and parts.shape == (64,)


def test_layout_writer_refuses_to_overwrite(root):
    with pytest.raises(FileExistsError, match="--force"):
        write_shapenetpart_layout(root, 2, 300)


def test_augmentation_is_the_official_scale_then_shift():
    points = torch.randn(4, 100, 6)
    out = PartAugment((0.8, 1.25), 0.1)(points, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    scale = 0.8 + 0.45 * torch.rand(4, 1, 1, generator=g)
    shift = 0.1 * (2 * torch.rand(4, 1, 3, generator=g) - 1)
    torch.testing.assert_close(out[..., :3], points[..., :3] * scale + shift)
    assert torch.equal(out[..., 3:], points[..., 3:])  # normals untouched
    assert (scale >= 0.8).all() and (scale <= 1.25).all() and shift.abs().max() <= 0.1
    with pytest.raises(DataError, match="scale_range"):
        PartAugment((1.2, 0.8))


# ---------------------------------------------------------------- part mIoU


SEG_CLASSES = SHAPENETPART_PARTS


def official_loop(logits, target):
    """The official test loop (segmentation/main.py), literally, on numpy arrays."""
    seg_label_to_cat = {}
    for cat in SEG_CLASSES.keys():
        for label in SEG_CLASSES[cat]:
            seg_label_to_cat[label] = cat
    shape_ious = {cat: [] for cat in SEG_CLASSES.keys()}
    cur_pred_val = np.zeros(target.shape).astype(np.int32)
    for i in range(len(target)):
        cat = seg_label_to_cat[target[i, 0]]
        cur_pred_val[i, :] = np.argmax(logits[i][:, SEG_CLASSES[cat]], 1) + SEG_CLASSES[cat][0]
    for i in range(len(target)):
        segp = cur_pred_val[i, :]
        segl = target[i, :]
        cat = seg_label_to_cat[segl[0]]
        part_ious = [0.0 for _ in range(len(SEG_CLASSES[cat]))]
        for l in SEG_CLASSES[cat]:
            if (np.sum(segl == l) == 0) and (np.sum(segp == l) == 0):
                part_ious[l - SEG_CLASSES[cat][0]] = 1.0
            else:
                part_ious[l - SEG_CLASSES[cat][0]] = np.sum((segl == l) & (segp == l)) / float(
                    np.sum((segl == l) | (segp == l)))
        shape_ious[cat].append(np.mean(part_ious))
    all_shape_ious = []
    for cat in shape_ious.keys():
        for iou in shape_ious[cat]:
            all_shape_ious.append(iou)
        shape_ious[cat] = np.mean(shape_ious[cat])
    return np.mean(all_shape_ious), np.mean(list(shape_ious.values())), shape_ious


def test_part_miou_equals_the_official_loop():
    g = torch.Generator().manual_seed(0)
    S, N = 64, 40
    category = torch.arange(S) % 16  # every category present
    lo = torch.tensor([SEG_CLASSES[CATEGORIES[c]][0] for c in category])
    width = torch.tensor([len(SEG_CLASSES[CATEGORIES[c]]) for c in category])
    target = lo[:, None] + (torch.rand(S, N, generator=g) * width[:, None]).long()
    target[::3, :] = lo[::3, None]  # shapes with absent parts (IoU 1.0 when not predicted)
    logits = torch.randn(S, N, 50, generator=g)
    logits[:, :, :] += 3.0 * torch.nn.functional.one_hot(target, 50) * (
        torch.rand(S, N, 1, generator=g) < 0.7)
    logits[:, :, 49] += 10  # a part of another category: must never be predicted for others
    ours = part_miou(logits, target, category)
    instance, klass, per_cat = official_loop(logits.numpy(), target.numpy())
    assert ours["instance_miou"] == pytest.approx(instance, abs=1e-12)
    assert ours["class_miou"] == pytest.approx(klass, abs=1e-12)
    assert ours["per_category"] == pytest.approx(per_cat, abs=1e-12)
    assert 0.3 < instance < 0.95  # neither trivial nor perfect


def test_part_miou_simple_cases():
    category = torch.tensor([1])  # Bag: parts 4, 5
    target = torch.tensor([[4, 4, 5, 5]])
    assert part_miou(target, target, category)["instance_miou"] == 1.0
    result = part_miou(torch.tensor([[4, 4, 4, 5]]), target, category)
    assert result["instance_miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # part 5 absent from both: counts 1.0
    assert part_miou(torch.tensor([[4, 4, 4, 4]]), torch.tensor([[4, 4, 4, 4]]),
                     category)["instance_miou"] == 1.0
    assert part_miou(target, target, category)["per_category"]["Airplane"] is None
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        part_miou(torch.tensor([[4, 4, 4, 50]]), target, category)
