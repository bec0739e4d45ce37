import json
import os

import pytest

from quantbridge.plugin.files import write_atomic
from quantbridge.results.schema import BackendResult, Comparison, LayerRecord, load_json, save_csv, save_json


def _comp():
    layer = LayerRecord(name="model.layers.0.mlp.up_proj", shape=[768, 256], quantized=True, kernel="reference-torch",
                        weight_bytes=100, latency_us={"1": {"median": 3.0, "p10": 2.0, "p90": 4.0, "n": 20}},
                        error={"rel_isolated": 0.1, "rel_propagated": 0.12, "sqnr_db": float("inf"), "cosine": 0.99})
    return Comparison(model={"name": "m"}, device={"name": "cpu"}, settings={"m_values": [1]},
                      backends=[BackendResult(name="native", status="ok", kernel="reference-torch", weights="rtn", layers=[layer]),
                                BackendResult(name="x", status="failed", reason="boom")])


def test_json_round_trip_and_contract(tmp_path):
    p = tmp_path / "r" / "results.json"
    save_json(_comp(), p)
    raw = json.loads(p.read_text())
    assert raw["schema_version"] == 3
    assert set(raw) >= {"model", "device", "settings", "backends"}
    b = raw["backends"][0]
    assert set(b) >= {"name", "status", "reason", "kernel", "timing", "weight_bytes", "bits_per_weight", "layers",
                      "model_metrics"}
    assert set(b["layers"][0]) >= {"name", "shape", "latency_us", "host_us", "error"}
    assert b["layers"][0]["error"]["sqnr_db"] is None  # infinite SQNR is written as null
    back = load_json(p)
    assert back.backends[0].layers[0].latency_us["1"]["median"] == 3.0
    assert back.backends[1].status == "failed"


def test_bad_status_and_version():
    with pytest.raises(ValueError):
        BackendResult(name="a", status="weird")
    with pytest.raises(ValueError):
        Comparison.from_dict({"schema_version": 99})


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "f.txt"
    write_atomic(p, "old")


    with pytest.raises(TypeError):
        write_atomic(p, 123)  # fails inside the write
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]  # no temp file left behind


def test_csv_rows(tmp_path):
    save_csv(_comp(), tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("backend,status,weights,timing,layer,N,K")
    assert len(lines) == 3 and lines[1].startswith("native,ok,rtn,,model.layers.0.mlp.up_proj,768,256")
