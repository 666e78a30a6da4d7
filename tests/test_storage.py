"""Location (pipeline/storage.py) and committed parts (pipeline/parts.py) behave the same on a local
disk and on an S3 server (moto's, over HTTP on 127.0.0.1)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.embed_output import committed, done_ids, remove_partial_files
from pipeline.manifests import IndexManifest
from pipeline.parts import committed_parts, remove_uncommitted, write_part
from pipeline.storage import Location, is_uri


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path: Path) -> Location:
    if request.param == "local":
        return Location(tmp_path / "store")
    return Location(f"{request.getfixturevalue('s3_bucket')}/store")


def test_files_round_trip(root: Location, tmp_path: Path) -> None:
    folder = root / "a" / "b"
    assert folder.list() == [] and not (folder / "x.json").is_file()
    with pytest.raises(FileNotFoundError, match="x.json"):
        (folder / "x.json").read_bytes()
    (folder / "x.json").write_json({"n": 1})
    (folder / "y.bin").write_bytes(b"\0" * 10)
    assert folder.list() == ["x.json", "y.bin"] and folder.list("*.json") == ["x.json"]
    assert (folder / "x.json").read_json() == {"n": 1} and (folder / "y.bin").size() == 10
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload")
    (folder / "z.bin").upload(source)
    digest = (folder / "z.bin").download(tmp_path / "copy" / "z.bin")
    assert (tmp_path / "copy" / "z.bin").read_bytes() == b"payload" and len(digest) == 64
    table = pa.table({"id": [3, 1, 2]})
    write_part(folder, "part-t.parquet", table)
    assert (folder / "part-t.parquet").read_parquet(["id"]).equals(table)
    assert (folder / "part-t.parquet").read_parquet().num_rows == 3
    # A Location pickles without its filesystem (each Ray worker resolves its own).
    assert pickle.loads(pickle.dumps(folder / "x.json")).read_json() == {"n": 1}
    (folder / "y.bin").delete()
    (folder / "y.bin").delete()  # deleting what is gone is fine
    root.delete_tree()
    assert folder.list() == [] and root.list() == [] and not (folder / "x.json").is_file()


def test_only_parts_with_a_record_count_and_a_resume_deletes_the_rest(root: Location) -> None:
    out = root / "emb"
    rows = pa.table({"id": pa.array([10, 11], pa.int64())})
    record = write_part(out / "embeddings", "part-a.parquet", rows)
    assert record["rows"] == 2 and record["bytes"] == (out / "embeddings" / "part-a.parquet").size()
    write_part(out / "errors", "part-e.parquet", pa.table({"id": pa.array([12], pa.int64())}))
    # A part whose writer died before its record, and a record whose part is gone.
    (out / "embeddings" / "part-b.parquet").write_bytes(b"PAR1 half")
    (out / "embeddings" / "part-c.json").write_json({"rows": 1, "sha256": "0", "bytes": 1})
    parts = committed(out)
    assert {k: sorted(v) for k, v in parts.items()} == {"embeddings": ["part-a.parquet"], "errors": ["part-e.parquet"]}
    np.testing.assert_array_equal(done_ids(out, parts), [10, 11, 12])
    assert remove_partial_files(out, parts) == 2
    assert (out / "embeddings").list() == ["part-a.json", "part-a.parquet"]
    # A part the manifest lists counts even without a record (outputs written before records).
    (out / "embeddings" / "part-a.json").delete()
    assert committed_parts(out / "embeddings") == {}
    assert list(committed_parts(out / "embeddings", {"part-a.parquet": record})) == ["part-a.parquet"]
    assert remove_uncommitted(out / "embeddings", {"part-a.parquet": record}) == 0


def test_manifest_errors_name_the_location(root: Location) -> None:
    with pytest.raises(FileNotFoundError, match=f"{root.uri}/index/manifest.json not found"):
        IndexManifest.read(root / "index")
    (root / "index" / "manifest.json").write_bytes(b"")
    with pytest.raises(ValueError, match="manifest.json is empty"):
        IndexManifest.read(root / "index")


def test_an_unreachable_bucket_is_one_clear_error_before_any_work(s3_bucket: str, tmp_path: Path, capsys) -> None:
    from jobs.build_index import main as build_index_main
    from jobs.embed import main as embed_main

    Location(f"{s3_bucket}/out").check_reachable()  # the fixture's bucket exists
    Location(tmp_path / "anything").check_reachable()  # local paths: nothing to check
    with pytest.raises(ValueError, match="bucket 'no-such-bucket' does not exist"):
        Location("s3://no-such-bucket/out").check_reachable()
    (tmp_path / "images").mkdir()
    assert embed_main(["--input", str(tmp_path / "images"), "--output", "s3://no-such-bucket/emb"]) == 2
    assert build_index_main(["--embeddings", str(tmp_path), "--output", "s3://no-such-bucket/index"]) == 2
    err = capsys.readouterr().err
    assert err.count("bucket 'no-such-bucket' does not exist") == 2


def test_uris_and_paths() -> None:
    assert is_uri("s3://b/p") and not is_uri("/tmp/x") and not is_uri("file:///tmp/x")
    assert Location("file:///tmp/x").uri == "/tmp/x" and not Location("rel/x").remote
    assert Location("rel/x").uri == str(Path("rel/x").absolute())
    assert Location("s3://b/p/") / "q" == Location("s3://b/p/q")
    with pytest.raises(ValueError, match="not a local path"):
        Location("s3://b/p").path
