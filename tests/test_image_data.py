"""Image datasets: VTAB-1k (on the real digits files), FGVC json, image folders, synthetic."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pointclora.data import DataError, build_dataset
from pointclora.data.images import generate_images, write_vtab_layout
from pointclora.data.vtab import VTAB_GROUPS, VTAB_TASKS

DIGITS_SPLITS = {"train800": 800, "val200": 200, "train800val200": 1000, "test": 797}


def test_the_19_vtab_tasks():
    assert len(VTAB_TASKS) == 19
    assert [len(g) for g in VTAB_GROUPS.values()] == [7, 4, 8]
    assert VTAB_TASKS["cifar"] == 100 and VTAB_TASKS["sun397"] == 397
    assert VTAB_TASKS["patch_camelyon"] == 2 and VTAB_TASKS["smallnorb_azi"] == 18


def test_vtab_loader_reads_the_real_digits(shared_data):
    root = shared_data / "vtab1k_digits"
    cfg = {"name": "vtab1k", "root": str(root), "task": "digits", "img_size": 48}
    for split, n in DIGITS_SPLITS.items():
        ds = build_dataset({**cfg, "train_split": split}, "train")
        assert len(ds) == n and ds.num_classes == 10
    ds = build_dataset(cfg, "test")
    lines = (root / "digits" / "test.txt").read_text().split("\n")
    labels = [int(line.split()[1]) for line in lines if line]
    assert ds.labels == labels and np.bincount(labels).min() > 60  # all ten digits present
    x, y = ds[5]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and y == labels[5]
    # the standard transform: bicubic resize to (size, size), then (v - 0.5) / 0.5
    raw = Image.open(root / "digits" / lines[5].split()[0]).convert("RGB")
    ref = torch.from_numpy(np.asarray(raw.resize((48, 48), Image.BICUBIC), dtype=np.float32))
    ref = (ref.permute(2, 0, 1) / 255 - 0.5) / 0.5
    assert (x - ref).abs().mean() < 0.02 and -1 <= x.min() and x.max() <= 1


def test_vtab_errors_name_the_file_and_line(tmp_path):
    cfg = {"name": "vtab1k", "root": str(tmp_path), "task": "cifar"}
    with pytest.raises(DataError, match="(?s)train800val200.txt.*Expected layout.*NOAH"):
        build_dataset(cfg, "train")
    folder = write_vtab_layout(tmp_path, "mini", num_classes=3, size=16, n_train=4, n_val=1,
                               n_test=2)
    cfg = {"name": "vtab1k", "root": str(tmp_path), "task": "mini", "img_size": 16}
    ds = build_dataset(cfg, "train")
    assert len(ds) == 15 and ds.num_classes == 3 and ds[0][0].shape == (3, 16, 16)
    lines = (folder / "test.txt").read_text().splitlines()
    (folder / "test.txt").write_text("\n".join([lines[0], "images/test/000001.png seven"]))
    with pytest.raises(DataError, match=r"test.txt:2: expected '<relative image path> <label>'"):
        build_dataset(cfg, "test")
    (folder / "test.txt").write_text("\n".join(lines))
    (folder / lines[1].split()[0]).write_bytes(b"not an image")
    ds = build_dataset(cfg, "test")
    with pytest.raises(DataError, match=r"000001.png \(listed at .*test.txt:2\): unreadable"):
        ds[1]
    with pytest.raises(DataError, match="VTAB-1k splits"):
        build_dataset({**cfg, "train_split": "train1000"}, "train")
    (folder / "val200.txt").write_text("images/val200/000000.png 3\n")
    with pytest.raises(DataError, match=r"val200.txt:1: label 3 is outside 0..2"):
        build_dataset({**cfg, "num_classes": 3, "train_split": "val200"}, "train")


def write_fgvc(root, dataset, image_dir, class_ids, per_split=2):
    folder = root / dataset
    for split in ("train", "val", "test"):
        anno = {}
        for cid in class_ids:
            for k in range(per_split):
                rel = f"{cid:03d}.cls/{split}_{k}.jpg"
                path = folder / image_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (20, 12), (cid * 40 % 256, k * 90, 30)).save(path)
                anno[rel] = cid
        (folder / f"{split}.json").write_text(json.dumps(anno))
    return folder


def test_fgvc_json_layout(tmp_path):
    write_fgvc(tmp_path, "StanfordDogs", "Images", [3, 7, 11])
    cfg = {"name": "fgvc", "root": str(tmp_path), "dataset": "StanfordDogs", "num_classes": 3,
           "img_size": 14}
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(train) == 6 and len(test) == 6 and train.num_classes == 3
    assert sorted(train.labels) == [0, 0, 1, 1, 2, 2]  # ids 3, 7, 11 made contiguous
    assert len(build_dataset({**cfg, "train_split": "trainval"}, "train")) == 12
    x, _ = train[0]
    assert x.shape == (3, 14, 14)  # resize to 16, random crop 14
    assert test[0][0].equal(test[0][0])  # the test transform is deterministic
    with pytest.raises(DataError, match="holds 3 class ids but StanfordDogs has 120"):
        build_dataset({**cfg, "num_classes": None}, "train")
    (tmp_path / "StanfordDogs" / "test.json").write_text(json.dumps({"003.cls/x.jpg": "3"}))
    with pytest.raises(DataError, match=r"test.json: entry '003.cls/x.jpg' has class id '3'"):
        build_dataset(cfg, "test")
    (tmp_path / "StanfordDogs" / "test.json").write_text(json.dumps({"003.cls/x.jpg": 3}))
    with pytest.raises(DataError, match=r"entry '003.cls/x.jpg': image .* does not exist"):
        build_dataset(cfg, "test")
    with pytest.raises(DataError, match="(?s)FGVC split file train.json.*VPT"):
        build_dataset({**cfg, "dataset": "CUB_200_2011"}, "train")


def test_image_folder(tmp_path):
    for split in ("train", "test"):
        for name, colour in (("cat", 10), ("dog", 200)):
            (tmp_path / split / name).mkdir(parents=True)
            for k in range(3):
                Image.new("RGB", (9, 9), (colour, k, 0)).save(tmp_path / split / name / f"{k}.png")
    ds = build_dataset({"name": "image_folder", "root": str(tmp_path), "img_size": 8}, "test")
    assert ds.class_names == ["cat", "dog"] and ds.labels == [0, 0, 0, 1, 1, 1]
    assert ds[4][0].shape == (3, 8, 8)
    with pytest.raises(DataError, match="image folder not found"):
        build_dataset({"name": "image_folder", "root": str(tmp_path / "no")}, "train")
    flat = {"name": "image_folder", "root": str(tmp_path / "test"), "img_size": 8}
    with pytest.raises(DataError, match="(?s)train split folder not found.*<root>/train"):
        build_dataset(flat, "train")  # never the same images for training and testing
    assert len(build_dataset({**flat, "train_split": "."}, "train")) == 6


def test_synthetic_images_are_seeded_and_split():
    a, la = generate_images(4, 5, 16, seed=1)
    b, _ = generate_images(4, 5, 16, seed=1)
    c, _ = generate_images(4, 5, 16, seed=1, split="test")
    five, _ = generate_images(5, 5, 16, seed=1)
    assert a.dtype == torch.uint8 and a.shape == (20, 3, 16, 16) and a.equal(b)
    assert not a.equal(c) and five[:20].equal(a)  # a class's images ignore the class count
    assert la.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    ds = build_dataset({"name": "synthetic_images", "num_classes": 4, "samples_per_class": 5,
                        "seed": 1, "img_size": 16}, "train")
    torch.testing.assert_close(ds[0][0], (a[0].float() / 255 - 0.5) / 0.5)


def test_synthetic_images_written_in_the_vtab_layout_read_back(tmp_path):
    folder = write_vtab_layout(tmp_path, "synth", num_classes=2, size=16, n_train=3, n_val=1,
                               n_test=2)
    ds = build_dataset({"name": "vtab1k", "root": str(tmp_path), "task": "synth",
                        "img_size": 16, "test_split": "val200"}, "test")
    images, _ = generate_images(2, 4, 16, split="train")
    assert len(ds) == 2 and ds.labels == [0, 1]
    assert torch.from_numpy(np.array(ds.load(1))).permute(2, 0, 1).equal(images[7])  # lossless
    with pytest.raises(FileExistsError):
        write_vtab_layout(tmp_path, "synth")
    assert (folder / "images" / "train800val200" / "000007.png").is_file()
