"""download_dataset's library: resumable downloads, checksums, atomic extraction.

A local HTTP server (with Range support, like the real hosts) serves archives in the exact
format of the real ones; `urls=` points the sources at it.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fake_data
import pytest

from robustft.data.download import DownloadError, download_file, fetch_source
from robustft.data.sources import SOURCES


class Server:
    """Serves `files` {name: bytes}; honours `Range: bytes=N-`; records the requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                body, status = server.files[name], 200
                header = self.headers.get("Range")
                if header:
                    start = int(header.split("=")[1].rstrip("-"))
                    if start >= len(body):
                        self.send_error(416)
                        return
                    body, status = body[start:], 206
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    served = Server()
    yield served
    served.close()


def tar_of(folder, *, arcname: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(folder, arcname=arcname)
    return buffer.getvalue()


def imagenet_r_tar(tmp_path) -> bytes:
    root = fake_data.write_imagenet_ood(
        tmp_path / "src", folder="imagenet-r", classes=fake_data.R_WNIDS
    )
    return tar_of(root / "imagenet-r", arcname="imagenet-r")


def test_resumes_a_partial_download_with_a_range_request(server, tmp_path):
    body = bytes(range(256)) * 400
    server.files["big.bin"] = body
    target = tmp_path / "cache" / "big.bin"
    target.parent.mkdir()
    target.with_name("big.bin.part").write_bytes(body[:1000])
    download_file(server.url("big.bin"), target)
    assert target.read_bytes() == body
    assert server.requests == [("big.bin", "bytes=1000-")]
    assert not target.with_name("big.bin.part").exists()


def test_wrong_published_checksum_is_rejected_and_fetched_again(server, tmp_path):
    # CIFAR-10's real entry (published md5) served a well-formed but different archive.
    root = fake_data.write_cifar10(tmp_path / "src")
    server.files["c.tgz"] = tar_of(root / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    out, cache = tmp_path / "datasets" / "cifar10", tmp_path / "cache"
    urls = {"cifar-10-binary.tar.gz": server.url("c.tgz")}
    with pytest.raises(DownloadError) as error:
        fetch_source(source="cifar10", out_dir=out, cache_dir=cache, urls=urls)
    message = str(error.value)
    assert "checksum mismatch" in message and "md5" in message and "\n" not in message
    assert not out.exists() and not (cache / "cifar-10-binary.tar.gz").exists()
    assert not list((tmp_path / "datasets").glob("*partial*"))
    with pytest.raises(DownloadError):
        fetch_source(source="cifar10", out_dir=out, cache_dir=cache, urls=urls)
    assert [name for name, _ in server.requests] == ["c.tgz", "c.tgz"]  # downloaded again


def test_truncated_archive_leaves_nothing_and_the_next_run_succeeds(server, tmp_path):
    good = imagenet_r_tar(tmp_path)
    server.files["r.tar"] = good[: len(good) // 2]
    out, cache = tmp_path / "datasets" / "imagenet_r", tmp_path / "cache"
    urls = {"imagenet-r.tar": server.url("r.tar")}
    with pytest.raises(DownloadError) as error:
        fetch_source(source="imagenet_r", out_dir=out, cache_dir=cache, urls=urls)
    assert "imagenet-r.tar" in str(error.value) and "\n" not in str(error.value)
    assert not out.exists() and not (cache / "imagenet-r.tar").exists()
    assert not (cache / "checksums.json").exists()  # a broken file never becomes the reference
    assert not list((tmp_path / "datasets").glob("*partial*"))

    server.files["r.tar"] = good
    # The small copy holds 6 of ImageNet-R's 30,000 images: allowed knowingly.
    manifest = fetch_source(
        source="imagenet_r", out_dir=out, cache_dir=cache, urls=urls, allow_subset=True
    )
    assert sorted(p.name for p in (out / "imagenet-r").iterdir()) == list(fake_data.R_WNIDS)
    recorded = json.loads((cache / "checksums.json").read_text())
    assert recorded["imagenet-r.tar"] == manifest["files"]["imagenet-r.tar"]["sha256"]
    assert json.loads((out / "MANIFEST.json").read_text())["source"] == "imagenet_r"
    assert not (cache / "imagenet-r.tar").exists()  # archives go once unpacked

    # Trust on first use: a later download that differs from the first is rejected.
    server.files["r.tar"] = good + b"\0" * 1024
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch_source(
            source="imagenet_r",
            out_dir=tmp_path / "again",
            cache_dir=cache,
            urls=urls,
            allow_subset=True,
        )
    assert not (tmp_path / "again").exists()


def test_plain_files_and_layout(server, tmp_path):
    src = fake_data.write_cifar101(tmp_path / "src")
    for name in ("cifar10.1_v6_data.npy", "cifar10.1_v6_labels.npy"):
        server.files[name] = (src / name).read_bytes()
    out = tmp_path / "datasets" / "cifar101"
    out.mkdir(parents=True)  # Snakemake may have created the (empty) output folder
    fetch_source(
        source="cifar101",
        out_dir=out,
        cache_dir=tmp_path / "cache",
        urls={name: server.url(name) for name in server.files},
        allow_subset=True,  # 20 of CIFAR-10.1's 2,000 images
    )
    assert (out / "cifar10.1_v6_data.npy").read_bytes() == (
        src / "cifar10.1_v6_data.npy"
    ).read_bytes()


def test_an_archive_without_the_expected_layout_is_rejected(server, tmp_path):
    root = fake_data.write_imagenet_ood(tmp_path / "src", folder="wrong", classes=("n1",))
    server.files["r.tar"] = tar_of(root / "wrong", arcname="wrong")
    out = tmp_path / "datasets" / "imagenet_r"
    with pytest.raises(DownloadError, match="imagenet-r: folder missing"):
        fetch_source(
            source="imagenet_r",
            out_dir=out,
            cache_dir=tmp_path / "cache",
            urls={"imagenet-r.tar": server.url("r.tar")},
        )
    assert not out.exists()


def test_every_downloadable_source_has_a_checksum_policy():
    for source in SOURCES.values():
        for item in source.downloads:
            assert item.md5 is None or len(item.md5) == 32, item.filename
    assert SOURCES["stl10"].downloads[0].md5 == "91f7769df0f17e558f3565bffb0c7dfb"
    assert not SOURCES["imagenet"].downloads
