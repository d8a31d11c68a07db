from retrain.tasks import storage


def test_join_and_absolute(tmp_path):
    assert storage.join("s3://bucket/store/", "/runs", "x") == "s3://bucket/store/runs/x"
    assert storage.absolute("memory://a/b") == "memory://a/b"
    assert storage.absolute("rel/dir").startswith("/")
    assert storage.absolute(f"file://{tmp_path}") == str(tmp_path)


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    url = str(tmp_path / "deep" / "file.json")
    storage.write_json(url, {"a": 1})
    storage.write_json(url, {"a": 2})  # replaces in place
    assert storage.read_json(url) == {"a": 2}
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["file.json"]


def test_list_files_ignores_unfinished_writes(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / f"b.txt{storage.TMP_MARKER}1234").write_text("half")
    assert [u.rsplit("/", 1)[-1] for u in storage.list_files(str(tmp_path))] == ["a.txt"]


def test_memory_filesystem_roundtrip():
    url = "memory://retrain-test/store/x.bin"
    storage.write_bytes(url, b"hello")
    assert storage.read_bytes(url) == b"hello"
    assert storage.exists(url) and not storage.isdir(url)
    assert storage.sha256_of(url) == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    storage.remove("memory://retrain-test", recursive=True)
