"""`catcascade data oxford-pets`: torchvision's real downloader (HTTP, md5 check, extraction)
against a loopback server holding a tiny archive in the release's layout; no internet."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest

CATS = {"Abyssinian": 1, "Bengal": 6, "British_Shorthair": 10}  # Oxford's CLASS-IDs
DOGS = {"beagle": 3}
PER_BREED = 3


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (seed * 40 % 256, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _release_archives(folder: Path) -> dict[str, str]:
    """images.tar.gz and annotations.tar.gz as published (images/*.jpg; annotations/list.txt,
    trainval.txt, test.txt with 'Image CLASS-ID SPECIES BREED-ID' rows); returns md5 per file."""
    rows = []
    with tarfile.open(folder / "images.tar.gz", "w:gz") as tar:
        for species, breeds in ((1, CATS), (2, DOGS)):
            for breed, class_id in breeds.items():
                for k in range(1, PER_BREED + 1):
                    _add(tar, f"images/{breed}_{k}.jpg", _jpeg(class_id * 10 + k))
                    rows.append(f"{breed}_{k} {class_id} {species} {k}")
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n"
    with tarfile.open(folder / "annotations.tar.gz", "w:gz") as tar:
        _add(tar, "annotations/list.txt", (header + "\n".join(rows) + "\n").encode())
        _add(tar, "annotations/trainval.txt", ("\n".join(rows[::2]) + "\n").encode())
        _add(tar, "annotations/test.txt", ("\n".join(rows[1::2]) + "\n").encode())
    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest()
            for name in ("images.tar.gz", "annotations.tar.gz")}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        _QuietHandler.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A loopback HTTP server with the archives; torchvision's URLs pointed at it."""
    from torchvision.datasets import OxfordIIITPet

    site = tmp_path / "site"
    site.mkdir()
    md5 = _release_archives(site)
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    # the real URL list with its base swapped, the md5s of the tiny archives
    resources = tuple((base + url.rsplit("/", 1)[1], md5[url.rsplit("/", 1)[1]]) for url, _ in OxfordIIITPet._RESOURCES)
    assert len(resources) == 2
    monkeypatch.setattr(OxfordIIITPet, "_RESOURCES", resources)
    _QuietHandler.requests = []
    yield site
    server.shutdown()
    server.server_close()


def test_oxford_pets_downloads_and_lays_out_the_cat_breeds_as_an_image_folder(mirror, tmp_path, capsys):
    from catcascade.cli import main
    from catcascade.training.datasets import scan_oxford_pet
    from catcascade.training.image_folder import scan_image_folder

    out = tmp_path / "data"
    assert main(["data", "oxford-pets", str(out)]) == 0
    assert set(_QuietHandler.requests) == {"/annotations.tar.gz", "/images.tar.gz"}  # torchvision asks twice each
    fetched = len(_QuietHandler.requests)
    train, labels = scan_image_folder(out / "train")
    test, test_labels = scan_image_folder(out / "test")
    assert labels == test_labels == sorted(CATS)  # the dog breed is left out
    # Oxford's split: trainval has rows 0, 2, 4, ... and test rows 1, 3, 5, ... (9 cat rows first)
    assert len(train) == 5 and len(test) == 4
    assert sorted(p.name for p in (out / "train" / "Bengal").iterdir()) == ["Bengal_2.jpg"]
    assert sorted(p.name for p in (out / "test" / "Bengal").iterdir()) == ["Bengal_1.jpg", "Bengal_3.jpg"]
    assert (out / "test" / "Bengal" / "Bengal_3.jpg").read_bytes() == _jpeg(63)
    # the release stays usable as --format oxford, and the archives are gone unless kept
    oxford, oxford_labels = scan_oxford_pet(out / "oxford-iiit-pet", cats_only=True)
    assert oxford_labels == sorted(CATS) and len(oxford) == len(CATS) * PER_BREED
    assert not list((out / "oxford-iiit-pet").glob("*.tar.gz"))
    text = capsys.readouterr().out
    assert "3 cat breeds" in text and "Bengal: 1 / 2" in text and "train-cnn --data" in text

    # a second run reuses the extracted release (no download) and rebuilds the folder
    (out / "train" / "Bengal" / "stray.jpg").write_bytes(b"x")
    assert main(["data", "oxford-pets", str(out)]) == 0
    assert len(_QuietHandler.requests) == fetched
    assert not (out / "train" / "Bengal" / "stray.jpg").exists()


def test_keep_archives_keeps_the_downloads(mirror, tmp_path):
    from catcascade.cli import main

    out = tmp_path / "data"
    assert main(["data", "oxford-pets", str(out), "--keep-archives"]) == 0
    assert sorted(p.name for p in (out / "oxford-iiit-pet").glob("*.tar.gz")) == ["annotations.tar.gz", "images.tar.gz"]


def test_a_corrupted_download_is_refused_by_its_md5(mirror, tmp_path, capsys):
    from catcascade.cli import main

    (mirror / "images.tar.gz").write_bytes((mirror / "images.tar.gz").read_bytes()[:-10] + b"0123456789")
    out = tmp_path / "data"
    assert main(["data", "oxford-pets", str(out)]) == 2
    assert "cannot download Oxford-IIIT Pet" in capsys.readouterr().err
    assert not (out / "train").exists()


def test_an_unreachable_server_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import socket

    from torchvision.datasets import OxfordIIITPet

    from catcascade.cli import main

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(OxfordIIITPet, "_RESOURCES", ((f"http://127.0.0.1:{port}/images.tar.gz", None),))
    assert main(["data", "oxford-pets", str(tmp_path / "data")]) == 2
    assert "cannot download Oxford-IIIT Pet" in capsys.readouterr().err
