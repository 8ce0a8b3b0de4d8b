"""Damaged atlases never read back silently wrong: checksums, required chunks, ``verify``.

Each case damages a freshly built atlas the way a disk, a sync tool or a person would
(a flipped byte, a deleted chunk, a stray file) and checks that ``verify`` names the
chunk and that queries fail with the same name instead of returning numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from flows.cli import main
from storage.atlas import Atlas
from storage.integrity import ChunkError, chunk_array, crc_ok, verify
from tests.storage.test_atlas import MODEL, build_atlas


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("integrity") / "a.zarr"
    build_atlas(path)
    return path


@pytest.fixture
def atlas(pristine: Path, tmp_path: Path) -> Path:
    """A private copy to damage."""
    dst = tmp_path / "a.zarr"
    shutil.copytree(pristine, dst)
    return dst


def _complete_part(rep: dict) -> list[str]:
    """Problems outside the deliberately unfinished model ``half`` of build_atlas."""
    return [k for kind in ("missing", "corrupt", "unexpected") for k in rep[kind]
            if not k.startswith("models/half/")]  # fmt: skip


def test_fresh_atlas_verifies_clean(pristine: Path) -> None:
    rep = verify(str(pristine))
    assert _complete_part(rep) == [] and rep["unchecked"] == []
    assert rep["arrays"] > 20 and rep["chunks"] > 20
    # the unfinished model's pre-sized arrays are reported as missing, never as data
    assert any(k.startswith("models/half/layers/0/stats/mean/c/") for k in rep["missing"])


def test_every_chunk_ends_with_its_crc32c(pristine: Path) -> None:
    """Independent of zarr: the trailing 4 bytes of every chunk file are its crc32c."""
    import google_crc32c

    files = [p for p in pristine.rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(files) > 20
    for f in files:
        b = f.read_bytes()
        assert google_crc32c.value(b[:-4]) == int.from_bytes(b[-4:], "little"), f


def test_flipped_bytes_are_reported_and_refused(atlas: Path) -> None:
    chunk = atlas / "models" / MODEL / "layers" / "0" / "stats" / "max" / "c" / "0"
    b = bytearray(chunk.read_bytes())
    b[len(b) // 2 : len(b) // 2 + 4] = b"\xff\xff\xff\x7f"  # the tester's 4 overwritten bytes
    chunk.write_bytes(bytes(b))
    rep = verify(str(atlas))
    assert rep["ok"] is False
    assert f"models/{MODEL}/layers/0/stats/max/c/0 (checksum mismatch)" in rep["corrupt"]
    with pytest.raises(ChunkError, match=f"models/{MODEL}/layers/0/stats/max/c/0 .* corrupt"):
        Atlas.open(atlas).stats(MODEL, 0)
    with pytest.raises(ChunkError, match="corrupt"):
        Atlas.open(atlas).neuron(MODEL, 0, 1)


@pytest.mark.parametrize("array", ["topk/positions", "stats/dead", "props/norm_out"])
def test_deleted_chunk_is_reported_and_refused(atlas: Path, array: str) -> None:
    layer = atlas / "models" / MODEL / "layers" / "0"
    if not (layer / array).exists():
        pytest.skip(f"{array} not in the test atlas")
    for c in (layer / array / "c").rglob("*"):
        if c.is_file():
            c.unlink()
    rep = verify(str(atlas))
    key = f"models/{MODEL}/layers/0/{array}/c/0"
    assert any(m.startswith(key) for m in rep["missing"]), rep["missing"]
    with pytest.raises(ChunkError, match="missing"):
        Atlas.open(atlas).neuron(MODEL, 0, 0)


def test_stray_chunk_is_unexpected(atlas: Path) -> None:
    stray = atlas / "models" / MODEL / "layers" / "0" / "stats" / "max" / "c" / "99"
    stray.write_bytes(b"junk")
    rep = verify(str(atlas))
    assert f"models/{MODEL}/layers/0/stats/max/c/99" in rep["unexpected"]


def test_killed_writer_leftovers_are_unexpected_and_removed(atlas: Path) -> None:
    from storage.integrity import remove_strays

    tmp = atlas / "corpus" / "tokens" / "c" / "0" / "0.3f2a.partial"
    tmp.write_bytes(b"half a chunk")
    assert "corpus/tokens/c/0/0.3f2a.partial" in verify(str(atlas))["unexpected"]
    assert remove_strays(str(atlas)) == ["corpus/tokens/c/0/0.3f2a.partial"]
    assert not tmp.exists() and (atlas / "corpus" / "tokens" / "c" / "0" / "0").exists()


def test_unparsable_metadata_is_corrupt(atlas: Path) -> None:
    meta = atlas / "models" / MODEL / "layers" / "0" / "stats" / "max" / "zarr.json"
    meta.write_bytes(b"\x00\xff not json")
    assert any("stats/max/zarr.json" in c for c in verify(str(atlas))["corrupt"])
    with pytest.raises(ChunkError, match="stats/max/zarr.json .* corrupt"):
        Atlas.open(atlas).neuron(MODEL, 0, 1)


def test_whole_array_gone_is_reported_and_refused(atlas: Path) -> None:
    """The group records its arrays: a deleted array is missing, not just absent."""
    shutil.rmtree(atlas / "models" / MODEL / "layers" / "0" / "stats" / "max")
    assert f"models/{MODEL}/layers/0/stats/max (whole array)" in verify(str(atlas))["missing"]
    with pytest.raises(ChunkError, match="array models/toy/layers/0/stats/max .* missing"):
        Atlas.open(atlas).neuron(MODEL, 0, 1)


def test_verify_cli(atlas: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(atlas / "models" / "half")  # leave only complete models
    zarr.open_group(str(atlas / "models"), mode="r")  # still a valid group
    assert main(["verify", str(atlas), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["chunks"] > 20
    (atlas / "corpus" / "tokens" / "c" / "0" / "0").unlink()
    assert main(["verify", str(atlas)]) == 1
    out = capsys.readouterr().out
    assert "missing    corpus/tokens/c/0/0" in out and "1 problems" in out
    assert main(["neuron", str(atlas), MODEL, "0", "1"]) == 2  # one line, not a traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corpus/tokens/c/0/0" in err and "missing" in err


def test_verify_cli_no_atlas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(tmp_path)]) == 2
    assert "no atlas" in capsys.readouterr().err


def test_arrays_describe_themselves(pristine: Path) -> None:
    """Plain zarr users see what each axis is and what the array holds."""
    root = zarr.open_group(str(pristine), mode="r")
    hist = root[f"models/{MODEL}/layers/0/stats/hist"]
    assert hist.metadata.dimension_names == ("neuron", "bin")
    assert "histogram" in hist.attrs["description"]
    assert root["corpus/tokens"].metadata.dimension_names == ("sequence", "position")
    assert root[f"models/{MODEL}/layers/0/topk/values"].metadata.dimension_names == (
        "neuron", "rank")  # fmt: skip
    assert root[f"models/{MODEL}/layers/1/sample"].metadata.dimension_names == (
        "sample", "neuron")  # fmt: skip


def test_chunk_key_parsing() -> None:
    assert chunk_array("models/c/layers/0/stats/max/c/0") == "models/c/layers/0/stats/max"
    assert chunk_array("a/b/c/0/1") == "a/b"
    assert chunk_array("a/b/zarr.json") is None
    assert chunk_array("c/3") == ""
    assert crc_ok(b"") is False
    data = np.arange(7, dtype=np.uint8).tobytes()
    import google_crc32c

    assert crc_ok(data + google_crc32c.value(data).to_bytes(4, "little"))
