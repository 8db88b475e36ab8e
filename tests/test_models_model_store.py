"""The model store's pure parts: joining, checksums, package lookup, path handling, the registry.

Fast and offline: every file is made under tmp_path; no model is loaded and no weight package is needed.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from dataclasses import replace

import pytest

from dspark.models import model_store as ms
from dspark.models.registry import REGISTRY, ModelSpec, get_spec

CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"", b"second part\n" * 1000, b"\x00tail"]


def _write_parts(tmp_path, chunks=CHUNKS):
    paths = []
    for i, data in enumerate(chunks, 1):
        p = tmp_path / "parts" / f"part{i:02d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        paths.append(p)
    return paths


def _fake_package(tmp_path, monkeypatch, name, files):
    """A package `name` on sys.path holding `files` ({relpath: bytes}) next to its __init__.py."""
    root = tmp_path / "site"
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for rel, data in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_bytes(data)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return pkg


# join_parts ---------------------------------------------------------------------------------------


def test_join_parts_concatenates_in_order_and_returns_sha256(tmp_path):
    parts = _write_parts(tmp_path)
    want = b"".join(CHUNKS)
    dest = tmp_path / "out" / "model.gguf"
    got = ms.join_parts(parts, dest, None)
    assert dest.read_bytes() == want
    assert got == hashlib.sha256(want).hexdigest()
    assert not dest.with_suffix(".gguf.partial").exists()


def test_join_parts_order_matters(tmp_path):
    parts = _write_parts(tmp_path)
    fwd = ms.join_parts(parts, tmp_path / "a.gguf", None)
    rev = ms.join_parts(parts[::-1], tmp_path / "b.gguf", None)
    assert fwd != rev
    assert (tmp_path / "b.gguf").read_bytes() == b"".join(CHUNKS[::-1])


def test_join_parts_accepts_matching_pin(tmp_path):
    parts = _write_parts(tmp_path)
    pin = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    dest = tmp_path / "model.gguf"
    assert ms.join_parts(parts, dest, pin) == pin
    assert ms.file_sha256(dest) == pin


def test_join_parts_mismatching_pin_raises_and_leaves_no_file(tmp_path):
    parts = _write_parts(tmp_path)
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(ms.ChecksumError, match="does not match the pinned"):
        ms.join_parts(parts, dest, "0" * 64)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no .partial either


def test_file_sha256_matches_hashlib(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * (ms._CHUNK + 17))  # spans more than one read
    assert ms.file_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()


# package_file -------------------------------------------------------------------------------------


def test_package_file_missing_package_is_actionable():
    with pytest.raises(ms.ModelNotInstalledError) as e:
        ms.package_file("dspark_no_such_weights_pkg", "data/part01.bin")
    msg = str(e.value)
    assert "'dspark_no_such_weights_pkg'" in msg
    assert "not installed" in msg
    assert "make models" in msg


def test_package_file_finds_file_inside_package(tmp_path, monkeypatch):
    pkg = _fake_package(tmp_path, monkeypatch, "dspark_fake_weights_a", {"data/part01.bin": b"abc"})
    path = ms.package_file("dspark_fake_weights_a", "data/part01.bin")
    assert path == pkg / "data" / "part01.bin"
    assert path.read_bytes() == b"abc"


def test_package_file_missing_file_inside_installed_package(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch, "dspark_fake_weights_b", {"data/part01.bin": b"abc"})
    with pytest.raises(ms.ModelNotInstalledError, match=r"part02\.bin is missing from package 'dspark_fake_weights_b'"):
        ms.package_file("dspark_fake_weights_b", "data/part02.bin")


# gguf_file (joins into DSPARK_HOME) ---------------------------------------------------------------


def _fake_spec(tmp_path, monkeypatch, pkg, sha256):
    files = {f"data/part{i:02d}.bin": data for i, data in enumerate(CHUNKS, 1)}
    _fake_package(tmp_path, monkeypatch, pkg, files)
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "home"))
    return ModelSpec(
        name="fake-model",
        hf_name="nobody/fake",
        packages=(f"{pkg}==0",),
        parts=tuple((pkg, f"data/part{i:02d}.bin") for i in range(1, len(CHUNKS) + 1)),
        sha256=sha256,
    )


def test_gguf_file_joins_parts_under_dspark_home(tmp_path, monkeypatch):
    pin = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    spec = _fake_spec(tmp_path, monkeypatch, "dspark_fake_weights_c", pin)
    path = ms.gguf_file(spec)
    assert path == tmp_path / "home" / "gguf" / "fake-model.gguf"
    assert ms.file_sha256(path) == pin


def test_gguf_file_bad_pin_raises_and_leaves_nothing(tmp_path, monkeypatch):
    spec = _fake_spec(tmp_path, monkeypatch, "dspark_fake_weights_d", "f" * 64)
    with pytest.raises(ms.ChecksumError):
        ms.gguf_file(spec)
    gguf_dir = tmp_path / "home" / "gguf"
    assert not gguf_dir.exists() or list(gguf_dir.iterdir()) == []


def test_gguf_file_rejoins_a_cached_file_that_no_longer_matches(tmp_path, monkeypatch):
    pin = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    spec = _fake_spec(tmp_path, monkeypatch, "dspark_fake_weights_f", pin)
    path = ms.gguf_file(spec)
    path.write_bytes(b"tampered")
    assert ms.file_sha256(ms.gguf_file(spec)) == pin


def test_gguf_file_single_file_checks_pin(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch, "dspark_fake_weights_e", {"m.gguf": b"GGUF single"})
    spec = ModelSpec(
        name="one", hf_name="x", packages=(), parts=(("dspark_fake_weights_e", "m.gguf"),), sha256="0" * 64
    )
    with pytest.raises(ms.ChecksumError):
        ms.gguf_file(spec)
    good = replace(spec, sha256=hashlib.sha256(b"GGUF single").hexdigest())
    assert ms.gguf_file(good).read_bytes() == b"GGUF single"


# model_dir / get_spec -----------------------------------------------------------------------------


def test_dspark_home_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_HOME", str(tmp_path / "h"))
    assert ms.dspark_home() == tmp_path / "h"


def test_model_dir_rejects_nonexistent_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match="not a registry name, an HF folder with config.json, or a .gguf file"):
        ms.model_dir(str(missing))


def test_model_dir_rejects_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ms.model_dir(str(tmp_path / "empty"))


def test_model_dir_accepts_hf_folder_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert ms.model_dir(str(tmp_path)) == tmp_path


def test_get_spec_unknown_name_lists_known_models():
    with pytest.raises(KeyError) as e:
        get_spec("no-such-model")
    msg = str(e.value)
    assert "'no-such-model'" in msg
    for name in REGISTRY:
        assert name in msg


def test_model_dir_unknown_bare_name_is_keyerror():
    with pytest.raises(KeyError, match="known models"):
        ms.model_dir("no-such-model")


# registry -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registry_spec_is_pinned_and_consistent(name):
    spec = REGISTRY[name]
    assert spec.name == name
    assert get_spec(name) is spec
    assert spec.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", spec.sha256), f"{name}: sha256 not pinned"
    assert spec.parts, f"{name}: no parts"
    assert spec.packages, f"{name}: no packages"
    # every part comes from a package the spec installs (pip name -> import name: '-' becomes '_')
    import_names = {re.split(r"[=<>!~ ]", req, maxsplit=1)[0].replace("-", "_") for req in spec.packages}
    for pkg, rel in spec.parts:
        assert pkg in import_names, f"{name}: part package {pkg} is not among {spec.packages}"
        assert not rel.startswith("/") and ".." not in rel
    assert all("==" in req for req in spec.packages), f"{name}: packages must be pinned exactly"
    assert len(set(spec.parts)) == len(spec.parts)


def test_registry_hashes_are_distinct():
    hashes = [s.sha256 for s in REGISTRY.values()]
    assert len(set(hashes)) == len(hashes)
