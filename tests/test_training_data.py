"""Dataset layouts (Oxford-IIIT Pet, CSV manifest, ImageFolder) and the saved split, on small
generated fixtures."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from catcascade.training.datasets import DatasetSpec, load_split, resolve_split, scan_csv_manifest, scan_oxford_pet
from catcascade.training.image_folder import Sample, stratified_split

OXFORD_HEADER = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n"


def _jpeg(path, color=(120, 80, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path, quality=80)


@pytest.fixture
def oxford(tmp_path):
    """Two cat breeds and one dog breed, 10 images each; test.txt holds images 9 and 10."""
    root = tmp_path / "oxford"
    rows = []
    for class_id, (breed, species) in enumerate((("Abyssinian", 1), ("Bengal", 1), ("beagle", 2)), 1):
        for n in range(1, 11):
            _jpeg(root / "images" / f"{breed}_{n}.jpg")
            rows.append((f"{breed}_{n}", class_id, species, n))
    ann = root / "annotations"
    ann.mkdir()
    fmt = lambda rs: OXFORD_HEADER + "".join(f"{a} {b} {c} {d}\n" for a, b, c, d in rs)  # noqa: E731
    (ann / "list.txt").write_text(fmt(rows))
    (ann / "trainval.txt").write_text(fmt([r for r in rows if r[3] <= 8]))
    (ann / "test.txt").write_text(fmt([r for r in rows if r[3] > 8]))
    return root


def test_oxford_list_cats_only_keeps_species_1(oxford):
    samples, labels = scan_oxford_pet(oxford, cats_only=True)
    assert labels == ["Abyssinian", "Bengal"]
    assert len(samples) == 20 and all(s.path.parent.name == "images" for s in samples)
    everything, all_labels = scan_oxford_pet(oxford)
    assert all_labels == ["Abyssinian", "Bengal", "beagle"] and len(everything) == 30
    # Label indices come from list.txt, so subsets agree with it.
    test, test_labels = scan_oxford_pet(oxford, cats_only=True, subset="test")
    assert test_labels == labels and len(test) == 4
    assert {s.path.name for s in test} == {"Abyssinian_9.jpg", "Abyssinian_10.jpg", "Bengal_9.jpg", "Bengal_10.jpg"}


def test_oxford_official_split_uses_test_txt(oxford, tmp_path):
    split = resolve_split(DatasetSpec(oxford, "oxford", cats_only=True, official_split=True),
                          save_to=tmp_path / "split.json")
    assert {s.path.name for s in split.test} == {"Abyssinian_9.jpg", "Abyssinian_10.jpg",
                                                 "Bengal_9.jpg", "Bengal_10.jpg"}
    assert len(split.train) + len(split.val) == 16 and split.val
    assert not {s.path for s in split.test} & {s.path for s in split.train + split.val}


def test_oxford_malformed_line_names_file_and_line(oxford):
    (oxford / "annotations" / "list.txt").write_text(OXFORD_HEADER + "Abyssinian_1 1 1 1\nBengal_2 two 1 2\n")
    with pytest.raises(ValueError, match=r"list.txt:5"):
        scan_oxford_pet(oxford)
    with pytest.raises(FileNotFoundError, match="annotation"):
        scan_oxford_pet(oxford / "nowhere")


def test_csv_manifest_relative_and_absolute_paths(tmp_path):
    _jpeg(tmp_path / "imgs" / "a.jpg")
    _jpeg(tmp_path / "elsewhere" / "b.jpg")
    manifest = tmp_path / "labels.csv"
    manifest.write_text(f"path,label,source\nimgs/a.jpg,Sphynx,x\n{tmp_path / 'elsewhere' / 'b.jpg'},Bengal,y\n")
    samples, labels = scan_csv_manifest(manifest)
    assert labels == ["Bengal", "Sphynx"]
    assert samples[0].path == tmp_path / "imgs" / "a.jpg" and samples[0].label == 1
    assert samples[1].path == tmp_path / "elsewhere" / "b.jpg" and samples[1].label == 0


def test_csv_manifest_bad_header_and_empty_cells(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,breed\na.jpg,Bengal\n")
    with pytest.raises(ValueError, match="path,label"):
        scan_csv_manifest(bad)
    bad.write_text("path,label\na.jpg,Bengal\nb.jpg,\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: empty"):
        scan_csv_manifest(bad)


def test_stratified_split_is_seeded_and_covers_every_class():
    samples = [Sample(Path(f"{c}_{i}.jpg"), c) for c in range(5) for i in range(10)]
    a = stratified_split(samples, seed=3)
    b = stratified_split(samples, seed=3)
    c = stratified_split(samples, seed=4)
    assert a == b and a != c
    assert [len(p) for p in a] == [40, 5, 5]
    for part in a:
        assert {s.label for s in part} == set(range(5))


def test_unreadable_images_are_skipped_counted_and_saved(tmp_path, caplog):
    root = tmp_path / "folder"
    for breed in ("Bengal", "Sphynx"):
        for i in range(10):
            _jpeg(root / breed / f"{i}.jpg")
    (root / "Bengal" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "Sphynx" / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="catcascade.training.datasets"):
        split = resolve_split(DatasetSpec(root), save_to=tmp_path / "split.json", seed=7)
    assert len(split.skipped) == 2 and any("broken.jpg" in p for p in split.skipped)
    assert "skipped 2 unreadable image(s) of 22" in caplog.text
    assert len(split.train) + len(split.val) + len(split.test) == 20
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["seed"] == 7 and len(saved["skipped"]) == 2
    assert saved["train"][0][0].count("/") == 1  # stored relative to the dataset root
    again = load_split(tmp_path / "split.json", root)
    assert again.labels == split.labels and again.train == split.train and again.test == split.test
    reused = resolve_split(DatasetSpec(root), split_file=tmp_path / "split.json", seed=99)
    assert reused.val == split.val


def test_dataset_spec_validation(tmp_path):
    with pytest.raises(ValueError, match="format"):
        DatasetSpec(tmp_path, "coco")
    with pytest.raises(ValueError, match="official_split"):
        DatasetSpec(tmp_path, "csv", official_split=True)
    with pytest.raises(ValueError, match="not a split file"):
        (tmp_path / "s.json").write_text('{"labels": ["a"]}')
        load_split(tmp_path / "s.json", tmp_path)
